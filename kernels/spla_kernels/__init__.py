"""Triton kernels for SPLA (the package ``spla_kernels``, in the top-level folder ``kernels/``).

Entry points keep the signatures of their PyTorch references in ``spla_lit.ops``, which dispatches to them
on CUDA. Each is imported lazily so that a missing module or a missing Triton leaves the reference path
working.
"""

from __future__ import annotations

import importlib

_ENTRY_POINTS = {
    "block_sparse_attention": "sparse",
    "sparse_attention_with_selected_linear": "sparse",
    "selected_linear_attention": "sparse",
    "causal_linear_attention": "linear",
    "select_blocks_fused": "select",
    "subtract_residual": "residual",
    "decode_select_blocks": "decode",
    "decode_sparse_with_selected_linear": "decode",
    "decode_append": "decode",
}


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spla_kernels' has no attribute {name!r}")
    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as e:  # triton missing, or the kernel module not written yet
        raise AttributeError(f"spla_kernels.{name} is unavailable: {e}") from e
    return getattr(mod, name)


__all__ = list(_ENTRY_POINTS)
