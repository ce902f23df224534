"""Capture what each SPLA layer computed (q, k, v, its block selection and its attention output).

Forward hooks only, on the component that receives all of them: the layer's residual linear attention
(``attn.rla``) or, without one, its sparse attention (``attn.sparse``). Nothing is recomputed, so the
capture is exactly what the layer used, and the layer files stay untouched::

    with capture_spla(model, max_rows=1) as captures:
        model(input_ids)
    captures[0].q  # [rows, N, Hq, D] of the first SPLA layer
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import SPLAAttention


@dataclass
class LayerCapture:
    """One forward call of one SPLA layer.

    Attributes:
        layer: index of the layer among the model's SPLA layers (model order).
        attn: the layer itself (for its geometry: ``attn.sparse.block_size``, ``topk``...).
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D] as the layer saw them (after RoPE, in its dtype).
        block_idx: int32 [B, Hkv, nQ, topk], the selection it used.
        out: [B, N, Hq, D], the attention output before the output projection: sparse attention plus the
            residual (or the sparse attention alone when the layer has no residual).
        cu_seqlens: packed-sequence boundaries of the call, or None.
    """

    layer: int
    attn: SPLAAttention
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_idx: torch.Tensor
    out: torch.Tensor
    cu_seqlens: torch.Tensor | None = None


def spla_layers(model: nn.Module) -> list[SPLAAttention]:
    """The SPLA attention layers of ``model``, in module order (empty for dense / linear models)."""
    return [m for m in model.modules() if isinstance(m, SPLAAttention)]


def _bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _keep(x: torch.Tensor | None, rows: int | None) -> torch.Tensor | None:
    if x is None:
        return None
    x = x.detach()
    # clone the slice so the full batch can be freed
    return x[:rows].clone() if rows is not None and rows < x.shape[0] else x


@contextmanager
def capture_spla(model: nn.Module, max_rows: int | None = None) -> Iterator[list[LayerCapture]]:
    """Record a :class:`LayerCapture` per SPLA layer and forward call while the context is open.

    ``max_rows`` keeps only the first rows of the batch (bounds the memory of long contexts). Packed rows
    (``cu_seqlens``) are recorded with their boundaries; keep ``max_rows`` None for them.
    """
    captures: list[LayerCapture] = []
    handles = []
    for index, attn in enumerate(spla_layers(model)):
        target = attn.rla if attn.rla is not None else attn.sparse

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index,
                 attn: SPLAAttention = attn) -> None:
            a = _bound_arguments(module, args, kwargs)
            cu = a.get("cu_seqlens")
            rows = None if cu is not None else max_rows
            captures.append(LayerCapture(
                layer=index, attn=attn, q=_keep(a["q"], rows), k=_keep(a["k"], rows), v=_keep(a["v"], rows),
                block_idx=_keep(a["block_idx"], rows), out=_keep(output[0], rows), cu_seqlens=cu))

        handles.append(target.register_forward_hook(hook, with_kwargs=True))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()
