"""Top-k block selection from block scores (design note, section 2)."""

from __future__ import annotations

import torch

from ..options import Selection
from ._checks import check_cu_seqlens, check_positive_int, check_qk, check_query_block
from ._dispatch import run_kernel, use_triton
from .blocks import forced_blocks, visible_blocks
from .scoring import block_scores
from .utils import cdiv


def min_topk(*, block_size: int, query_block: int = 1, local_blocks: int = 1, sink_blocks: int = 0) -> int:
    """Smallest ``topk`` that holds the forced blocks at any sequence length."""
    overlap = max(1, query_block // block_size) if query_block > 1 else 1
    return max(local_blocks, overlap) + sink_blocks


def _check_forced(topk: int, need: int, local_blocks: int, sink_blocks: int, query_block: int) -> None:
    if need > topk:
        raise ValueError(f"topk ({topk}) is smaller than the {need} forced blocks "
                         f"(local_blocks={local_blocks}, sink_blocks={sink_blocks}, query_block={query_block})")


def select_blocks(
    scores: torch.Tensor,
    *,
    topk: int,
    block_size: int,
    query_block: int = 1,
    local_blocks: int = 1,
    sink_blocks: int = 0,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the key blocks each query (block) attends to exactly.

    Args:
        scores: [B, Hkv, nQ, nK] block scores, ``-inf`` where not visible (from :func:`block_scores`).
        topk: blocks per query (block), forced ones included.
        local_blocks: most recent visible blocks always kept (>= 1: the diagonal block); every block that
            overlaps the query block itself is kept too. sink_blocks: first blocks always kept.
        cu_seqlens: packed sequences (see :func:`block_scores`); selection per sequence, local indices.

    Returns:
        int32 [B, Hkv, nQ, topk]: block indices, ascending, padded with -1 at the end. A query block
        with fewer visible blocks than ``topk`` gets all of them (short prefixes are dense).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 4-D tensor [B, Hkv, nQ, nK], got {shape}")
    check_positive_int("topk", topk)
    check_query_block(query_block, block_size)
    check_positive_int("local_blocks", local_blocks)
    check_positive_int("sink_blocks", sink_blocks, minimum=0)
    B, H, nQ, nK = scores.shape
    if cu_seqlens is not None:
        segments = check_cu_seqlens(cu_seqlens, batch=B, n=nQ, query_block=query_block)
        return torch.cat([
            select_blocks(scores[:, :, s:e, : cdiv(e - s, block_size)], topk=topk, block_size=block_size,
                          local_blocks=local_blocks, sink_blocks=sink_blocks)
            for s, e in segments], dim=2)
    forced = forced_blocks(nQ, nK, query_block, block_size, local_blocks, sink_blocks, scores.device)
    _check_forced(topk, int(forced.sum(-1).max()), local_blocks, sink_blocks, query_block)
    visible = visible_blocks(nQ, nK, query_block, block_size, scores.device)
    s = scores.detach().float().nan_to_num(nan=float("-inf"), neginf=float("-inf"))
    s = s.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    kk = min(topk, nK)
    vals, idx = s.topk(kk, dim=-1)
    # Sort ascending with the padding last: -inf picks (fewer candidates than topk) become nK, then -1.
    idx = torch.where(vals == float("-inf"), nK, idx).sort(-1).values
    idx = torch.where(idx == nK, -1, idx).to(torch.int32)
    if kk < topk:
        idx = torch.nn.functional.pad(idx, (0, topk - kk), value=-1)
    return idx


def score_and_select(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    query_block: int = 1,
    local_blocks: int = 1,
    sink_blocks: int = 0,
    scorer: str = "taylor2",
    covariance: str = "diag",
    rank: int = 4,
    head_reduce: str = "lse",
    scale: float | None = None,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`block_scores` then :func:`select_blocks`: int32 [B, Hkv, nQ, topk].

    On CUDA the Triton kernel fuses the two so the per-token score matrix [B, Hkv, N, nK] is never
    materialised (taylor1, taylor2 with diag or lowrank covariance); other scorers use the reference.
    """
    check_qk(q, k)
    check_query_block(query_block, block_size)
    check_positive_int("topk", topk)
    check_positive_int("local_blocks", local_blocks)
    check_positive_int("sink_blocks", sink_blocks, minimum=0)
    need = min_topk(block_size=block_size, query_block=query_block, local_blocks=local_blocks, sink_blocks=sink_blocks)
    _check_forced(topk, need, local_blocks, sink_blocks, query_block)
    fusable = scorer in ("taylor1", "taylor2") and (scorer == "taylor1" or covariance in ("diag", "lowrank"))
    if fusable and use_triton(impl, "select_blocks_fused", q, k):
        out = run_kernel(impl, "select_blocks_fused", q, k, Selection(
            block_size=block_size, topk=topk, query_block=query_block, local_blocks=local_blocks,
            sink_blocks=sink_blocks, scorer=scorer, covariance=covariance, rank=rank, head_reduce=head_reduce,
            scale=scale), cu_seqlens=cu_seqlens)
        if out is not None:
            return out
    scores = block_scores(q, k, block_size=block_size, query_block=query_block, scorer=scorer, covariance=covariance,
                          rank=rank, head_reduce=head_reduce, scale=scale, generator=generator, cu_seqlens=cu_seqlens)
    return select_blocks(scores, topk=topk, block_size=block_size, query_block=query_block,
                         local_blocks=local_blocks, sink_blocks=sink_blocks, cu_seqlens=cu_seqlens)
