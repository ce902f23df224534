"""Triton kernels for SPLA (the package ``spla_kernels``, in the top-level folder ``kernels/``).

Entry points keep the signatures of their PyTorch references in ``spla_lit.ops``, which dispatches to them
on CUDA, plus a ``config`` argument for their tiles (the config dataclasses; None takes the per-device table
of ``spla_kernels.config``). Names are imported lazily, so that a missing Triton leaves the reference path
working. Design, measurements and the tile table: ``docs/kernels.md``.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "block_sparse_attention": "sparse",
    "sparse_attention_with_selected_linear": "sparse",
    "selected_linear_attention": "sparse",
    "causal_linear_attention": "linear",
    "select_blocks_fused": "select",
    "subtract_residual": "residual",
    "combine_add": "combine",
    "decode_select_blocks": "decode",
    "decode_sparse_with_selected_linear": "decode",
    "decode_append": "decode",
    "SparseConfig": "config",
    "SelectConfig": "config",
    "LinearConfig": "config",
    "CombineConfig": "config",
}


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'spla_kernels' has no attribute {name!r}")
    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as e:  # triton missing
        raise AttributeError(f"spla_kernels.{name} is unavailable: {e}") from e
    return getattr(mod, name)


__all__ = list(_NAMES)
