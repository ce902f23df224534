"""Inference: the KV cache (keys, values, block statistics and linear states), decode steps and generation.

``model.new_cache(batch_size, max_seq_len)`` -> :class:`KVCache`; ``model(input_ids, cache=cache)`` appends tokens
and returns their logits; ``model.generate(...)`` (:func:`generate`) prefills and decodes. The per-layer decode
math is in ``spla_lit.ops.decode``; :class:`DecodeStep` replays a decode step as a CUDA graph.
"""

from .cache import KVCache, LayerCache, LayerCacheSpec
from .generate import Decoder, fill_greedy, generate, sample
from .step import DecodeStep, graph_supported

__all__ = ["DecodeStep", "Decoder", "KVCache", "LayerCache", "LayerCacheSpec", "fill_greedy", "generate",
           "graph_supported", "sample"]
