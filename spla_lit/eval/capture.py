"""Capture what each SPLA layer computed (q, k, v, its block selection, its sparse and final attention output).

Through the layer's own capture hooks (:meth:`SPLAAttention.register_capture_hook`, which hand over an
:class:`~spla_lit.layers.attention.SPLARecord` of every forward): nothing is recomputed, so the capture is
exactly what the layer used::

    with capture_spla(model, max_rows=1) as captures:
        model(input_ids)
    captures[0].q  # [rows, N, Hq, D] of the first SPLA layer
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import SPLAAttention
from ..layers.attention import SPLARecord
from ..options import Selection


@dataclass
class LayerCapture:
    """One forward call of one SPLA layer (detached tensors).

    Attributes:
        layer: index of the layer among the model's SPLA layers (model order).
        attn: the layer itself.
        selection: the layer's selection (block geometry and scorer), as it ran.
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D] as the layer saw them (after RoPE, in its dtype).
        block_idx: int32 [B, Hkv, nQ, k], the selection it used.
        o_sparse: [B, N, Hq, D], exact attention over the selected blocks.
        out: [B, N, Hq, D], the attention output before the output projection: sparse attention plus the
            residual (``o_sparse`` itself when the layer has no residual).
        cu_seqlens: packed-sequence boundaries of the call, or None.
    """

    layer: int
    attn: SPLAAttention
    selection: Selection
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_idx: torch.Tensor
    o_sparse: torch.Tensor
    out: torch.Tensor
    cu_seqlens: torch.Tensor | None = None


def spla_layers(model: nn.Module) -> list[SPLAAttention]:
    """The SPLA attention layers of ``model``, in module order (empty for dense / linear models)."""
    return [m for m in model.modules() if isinstance(m, SPLAAttention)]


def _keep(x: torch.Tensor, rows: int | None) -> torch.Tensor:
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

        def hook(layer: SPLAAttention, record: SPLARecord, index: int = index) -> None:
            rows = None if record.cu_seqlens is not None else max_rows
            captures.append(LayerCapture(
                layer=index, attn=layer, selection=layer.selection, q=_keep(record.q, rows), k=_keep(record.k, rows),
                v=_keep(record.v, rows), block_idx=_keep(record.block_idx, rows),
                o_sparse=_keep(record.o_sparse, rows), out=_keep(record.out, rows), cu_seqlens=record.cu_seqlens))

        handles.append(attn.register_capture_hook(hook))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()
