"""Block selection: the key blocks each query (block) attends to exactly (``docs/spla.md`` §2).

Both functions take the whole selection as one validated :class:`~spla_lit.options.Selection`; the decode path
(KV cache) reuses them as they are.
"""

from __future__ import annotations

import torch

from ..options import IMPLS, Selection
from ._checks import check_choice, check_cu_seqlens, check_qk, check_selection
from ._dispatch import run_kernel, use_triton
from .blocks import forced_blocks, position_block_masks, visible_blocks
from .scoring import block_scores
from .utils import cdiv


def _fusable(sel: Selection) -> bool:
    """Whether the fused Triton selection implements this scorer. The others (random, oracle, taylor2 with the
    full covariance) exist only as the PyTorch reference: nothing declines, so no fallback warning."""
    return sel.scorer == "taylor1" or (sel.scorer == "taylor2" and sel.covariance in ("diag", "lowrank"))


def select_blocks(scores: torch.Tensor, selection: Selection, *,
                  cu_seqlens: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the key blocks each query (block) attends to exactly.

    Args:
        scores: [B, Hkv, nQ, nK] block scores, ``-inf`` where not visible (from :func:`block_scores`).
        selection: reads ``block_size``, ``query_block``, ``local_blocks`` (the most recent visible blocks,
            always kept; every block that overlaps the query block itself is kept too), ``sink_blocks`` (the
            first blocks, always kept) and :attr:`~spla_lit.options.Selection.k` (blocks per row: ``topk``, or
            the forced blocks alone in ``window`` mode).
        cu_seqlens: packed sequences (see :func:`block_scores`); selection per sequence, local indices.
        positions: int [B, nQ], the token position of each query row (``query_block == 1``; not with
            ``cu_seqlens``): the forced and visible blocks follow them instead of ``arange(nQ)``. The decode
            path (KV cache) selects with it, rows at their own lengths.

    Returns:
        int32 [B, Hkv, nQ, selection.k]: block indices, ascending, padded with -1 at the end. A query block
        with fewer visible blocks than ``k`` gets all of them (short prefixes are dense).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 4-D tensor [B, Hkv, nQ, nK], got {shape}")
    sel = check_selection(selection)
    B, H, nQ, nK = scores.shape
    if positions is not None:
        if cu_seqlens is not None or sel.query_block != 1:
            raise ValueError("positions needs query_block == 1 and no cu_seqlens")
        if (not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (B, nQ)
                or positions.is_floating_point()):
            raise ValueError(f"positions must be an integer [B, nQ] = [{B}, {nQ}] tensor")
        forced, visible = position_block_masks(positions, nK, sel.block_size, sel.local_blocks, sel.sink_blocks)
        return _top_blocks(scores, sel, forced[:, None], visible[:, None])
    if cu_seqlens is not None:
        segments = check_cu_seqlens(cu_seqlens, batch=B, n=nQ, query_block=sel.query_block)
        return torch.cat([select_blocks(scores[:, :, s:e, : cdiv(e - s, sel.block_size)], sel)
                          for s, e in segments], dim=2)
    forced = forced_blocks(nQ, nK, sel.query_block, sel.block_size, sel.local_blocks, sel.sink_blocks, scores.device)
    visible = visible_blocks(nQ, nK, sel.query_block, sel.block_size, scores.device)
    return _top_blocks(scores, sel, forced, visible)


def _top_blocks(scores: torch.Tensor, sel: Selection, forced: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The forced blocks plus the best-scoring visible ones, ascending, -1 padded (:func:`select_blocks`)."""
    nK = scores.shape[-1]
    # Selection guarantees k >= the forced blocks of any row (Selection.forced), so they always fit.
    s = scores.detach().float().nan_to_num(nan=float("-inf"), neginf=float("-inf"))
    s = s.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    kk = min(sel.k, nK)
    vals, idx = s.topk(kk, dim=-1)
    # Sort ascending with the padding last: -inf picks (fewer candidates than k) become nK, then -1.
    idx = torch.where(vals == float("-inf"), nK, idx).sort(-1).values
    idx = torch.where(idx == nK, -1, idx).to(torch.int32)
    if kk < sel.k:
        idx = torch.nn.functional.pad(idx, (0, sel.k - kk), value=-1)
    return idx


def score_and_select(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Selection,
    *,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`block_scores` then :func:`select_blocks`: int32 [B, Hkv, nQ, selection.k].

    ``mode="window"`` scores nothing: only the forced (local and sink) blocks are kept, a sliding window.
    On CUDA the Triton kernel ``select_blocks_fused`` fuses scoring and top-k so the per-token score matrix
    [B, Hkv, N, nK] is never materialised (taylor1, taylor2 with diag or lowrank covariance); other scorers
    use the reference.
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    sel = check_selection(selection)
    check_choice("impl", impl, IMPLS)
    if sel.mode == "window":
        # Every candidate ruled out (-inf): the forced blocks alone are picked, -1 padded where fewer than k
        # (a partial last query block); a constant score would let ties add blocks outside the window there.
        scores = torch.full((B, Hkv, cdiv(N, sel.query_block), cdiv(N, sel.block_size)), float("-inf"),
                            device=q.device)
        return select_blocks(scores, sel, cu_seqlens=cu_seqlens)
    if _fusable(sel) and use_triton(impl, "select_blocks_fused", q, k):
        out = run_kernel(impl, "select_blocks_fused", q, k, sel, cu_seqlens=cu_seqlens)
        if out is not None:
            return out
    scores = block_scores(q, k, sel, generator=generator, cu_seqlens=cu_seqlens)
    return select_blocks(scores, sel, cu_seqlens=cu_seqlens)
