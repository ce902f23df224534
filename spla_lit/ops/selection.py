"""Top-k block selection from block scores (design note, section 2)."""

from __future__ import annotations

import torch

from ._checks import check_positive_int, check_query_block
from .blocks import forced_blocks, visible_blocks


def min_topk(*, block_size: int, query_block: int = 1, local_blocks: int = 1, sink_blocks: int = 0) -> int:
    """Smallest ``topk`` that holds the forced blocks at any sequence length."""
    overlap = max(1, query_block // block_size) if query_block > 1 else 1
    return max(local_blocks, overlap) + sink_blocks


def select_blocks(
    scores: torch.Tensor,
    *,
    topk: int,
    block_size: int,
    query_block: int = 1,
    local_blocks: int = 1,
    sink_blocks: int = 0,
) -> torch.Tensor:
    """Pick the key blocks each query (block) attends to exactly.

    Args:
        scores: [B, Hkv, nQ, nK] block scores, ``-inf`` where not visible (from :func:`block_scores`).
        topk: blocks per query (block), forced ones included.
        local_blocks: most recent visible blocks always kept (>= 1: the diagonal block); every block that
            overlaps the query block itself is kept too. sink_blocks: first blocks always kept.

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
    forced = forced_blocks(nQ, nK, query_block, block_size, local_blocks, sink_blocks, scores.device)
    need = int(forced.sum(-1).max())
    if need > topk:
        raise ValueError(
            f"topk ({topk}) is smaller than the {need} forced blocks "
            f"(local_blocks={local_blocks}, sink_blocks={sink_blocks}, query_block={query_block})"
        )
    visible = visible_blocks(nQ, nK, query_block, block_size, scores.device)
    s = scores.detach().float().nan_to_num(nan=float("-inf"))
    s = s.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    kk = min(topk, nK)
    vals, idx = s.topk(kk, dim=-1)
    # Sort ascending with the padding last: -inf picks (fewer candidates than topk) become nK, then -1.
    idx = torch.where(vals == float("-inf"), nK, idx).sort(-1).values
    idx = torch.where(idx == nK, -1, idx).to(torch.int32)
    if kk < topk:
        idx = torch.nn.functional.pad(idx, (0, topk - kk), value=-1)
    return idx
