"""Functional SPLA ops (``[B, N, H, D]`` layout, like flash-attn and fla).

PyTorch references here; Triton kernels in ``spla_kernels`` are dispatched on CUDA (``impl="auto"``).
:func:`spla_attention` is the whole method in one call; the model's ``SPLAAttention`` layer wraps it.
"""

from ..options import Selection, min_topk
from ._dispatch import ReferenceFallbackWarning
from .blocks import selected_causal_counts, selected_key_mask, token_block_idx, visible_blocks
from .decode import (
    decode_block_scores,
    decode_linear_attention,
    decode_select,
    decode_sparse_attention,
    dense_decode,
    spla_decode,
)
from .feature_maps import FEATURE_MAPS, feature_dim, feature_map
from .linear_attention import (
    causal_linear_attention,
    explicit_residual_linear_attention,
    has_unselected_keys,
    residual_linear_attention,
    selected_linear_attention,
)
from .scoring import block_key_stats, block_scores, exact_block_log_mass
from .selection import score_and_select, select_blocks
from .sparse_attention import block_sparse_attention
from .spla import SPLAAux, combine_residual, rms_norm, sparse_attention_with_residual, spla_attention

__all__ = [
    "FEATURE_MAPS",
    "ReferenceFallbackWarning",
    "SPLAAux",
    "Selection",
    "block_key_stats",
    "block_scores",
    "block_sparse_attention",
    "causal_linear_attention",
    "combine_residual",
    "decode_block_scores",
    "decode_linear_attention",
    "decode_select",
    "decode_sparse_attention",
    "dense_decode",
    "exact_block_log_mass",
    "explicit_residual_linear_attention",
    "feature_dim",
    "feature_map",
    "has_unselected_keys",
    "min_topk",
    "residual_linear_attention",
    "rms_norm",
    "score_and_select",
    "select_blocks",
    "selected_causal_counts",
    "selected_key_mask",
    "selected_linear_attention",
    "sparse_attention_with_residual",
    "spla_attention",
    "spla_decode",
    "token_block_idx",
    "visible_blocks",
]
