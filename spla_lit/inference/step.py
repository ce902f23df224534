"""One decode step (one token per row) through a model and its KV cache, eagerly or replayed as a CUDA graph.

At batch 1 a decode step is a few hundred small kernels: launching them costs more than running them.
:class:`DecodeStep` captures the whole step (``model(tokens[:, None], cache=cache)``) in a CUDA graph once and
replays it: the cache's tensors are static, the rows' lengths live on the device and advance inside the graph,
and nothing in the step reads the device from the host. The captured function is the eager step itself (the
one the CPU tests run), so both modes compute the same thing.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .cache import KVCache


def graph_supported(model: nn.Module) -> str | None:
    """None if a decode step of ``model`` can be captured in a CUDA graph, else the reason: the random scorer
    draws from a per-call generator, and the low-rank scorer computes eigenpairs when the host sees a block
    complete (a branch a graph cannot take)."""
    for i, layer in enumerate(getattr(model, "layers", ())):
        sel = getattr(layer.attn, "selection", None)
        if sel is not None and sel.mode == "topk" and sel.scorer == "random":
            return f"layer {i} uses scorer=random"
        if sel is not None and sel.mode == "topk" and sel.scorer == "taylor2" and sel.covariance == "lowrank":
            return f"layer {i} uses scorer.covariance=lowrank"
    return None


class DecodeStep:
    """``step(tokens [B]) -> logits [B, vocab]``: feed one token per row to ``model`` with ``cache``.

    ``cuda_graph``: None (auto: a graph on CUDA when :func:`graph_supported`), True (a graph; ``ValueError``
    where impossible) or False (eager). The graph is captured at the first call, after two warm-up steps whose
    effects on the cache are undone; the cache must not be empty (prefill first) and switches to static shapes
    (steps read its whole capacity, as a graph must).
    """

    def __init__(self, model: nn.Module, cache: KVCache, *, cuda_graph: bool | None = None) -> None:
        self.model, self.cache = model, cache
        reason = graph_supported(model)
        if cache.device.type != "cuda":
            reason = reason or f"the cache is on {cache.device}"
        if cuda_graph and reason:
            raise ValueError(f"cuda_graph: a CUDA graph cannot capture this decode step ({reason})")
        self.use_graph = bool(cuda_graph if cuda_graph is not None else reason is None)
        self._graph: torch.cuda.CUDAGraph | None = None

    def eager(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step itself: logits [B, vocab] of one more token per row."""
        return self.model(tokens[:, None], cache=self.cache)[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self.eager(tokens)
        self.cache.check(self.model, tokens[:, None])  # on the host copy of the lengths: no sync
        if self._graph is None:
            self._capture(tokens)
        self._tokens.copy_(tokens)
        self._graph.replay()
        self.cache.host_lengths += 1  # the device lengths advanced inside the graph
        return self._logits.clone()

    def _capture(self, tokens: torch.Tensor) -> None:
        cache = self.cache
        if cache.empty:
            raise ValueError("cache: prefill the prompts before capturing a decode step")
        cache.static = True
        self._tokens = tokens.clone()
        snapshot = _mutable_state(cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up: lazy initialisation and Triton compilation happen here
                for _ in range(2):
                    self.eager(self._tokens)
                    _restore(cache, snapshot)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = self.eager(self._tokens)
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager steps
            _restore(cache, snapshot)
            cache.static = False
            self.use_graph = False
            warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly", RuntimeWarning,
                          stacklevel=3)
            return
        _restore(cache, snapshot)  # the capture ran the host side of one step (host lengths + 1)
        self._graph = graph


def _mutable_state(cache: KVCache) -> dict[str, torch.Tensor]:
    """Copies of what a decode step changes besides the slots it rewrites anyway: lengths, running block sums,
    linear states (a step writes the new token's K/V and its block's moments at the row's length, which the
    next real step overwrites)."""
    out = {"lengths": cache.lengths.clone(), "host_lengths": cache.host_lengths.clone()}
    for i, layer in enumerate(cache.layers):
        for name, t in layer.tensors().items():
            if name in ("state", "run_sum", "run_sq", "run_outer"):
                out[f"{i}.{name}"] = t.clone()
    return out


def _restore(cache: KVCache, snapshot: dict[str, torch.Tensor]) -> None:
    cache.lengths.copy_(snapshot["lengths"])
    cache.host_lengths.copy_(snapshot["host_lengths"])
    for i, layer in enumerate(cache.layers):
        for name, t in layer.tensors().items():
            if f"{i}.{name}" in snapshot:
                t.copy_(snapshot[f"{i}.{name}"])
    cache.broken = False
