"""Fused block scoring + per-token top-k block selection (``spla_kernels.select_blocks_fused``).

Equals ``select_blocks(block_scores(q, k, ...), ...)`` of ``spla_lit.ops`` (ties and rounding aside) for the
``taylor1`` and ``taylor2`` (``diag`` / ``lowrank``) scorers with ``query_block == 1``, without ever holding
the [B, Hkv, N, nK] score matrix: block statistics (mean, variance or top eigenpairs, O(N D) per head) are
computed in PyTorch, the (tokens x blocks) scoring, head reduction and exact top-k run in one Triton kernel
(``_select_kernels.select_kernel``). Other scorers and ``query_block > 1`` raise ``NotImplementedError``
so that the caller falls back to the reference.
"""

from __future__ import annotations

import functools

import torch

from spla_lit.ops.utils import next_pow2, sequence_segments
from spla_lit.options import Selection

from ._select_kernels import select_kernel
from ._utils import interpreting

BLOCKS_PER_STEP = 32  # key blocks scored per loop step (raised to the padded topk when that is larger)
ROWS = 128  # (token, head) rows per program: BT = ROWS // G tokens
QUAD_SPLIT = True  # bf16 hi/lo products for the covariance term too (3 products instead of 1)
# Launch config. Measured on an H100 at N = 32K: ROWS=128, BN=32, 8 warps, 3 stages 3.45 ms; ROWS=64, BN=64 4.90 ms;
# ROWS=128, BN=64 needs <= 2 stages (3 overflow the 227 KiB of shared memory). float32 inputs (tf32x3 operands
# twice as wide) get one stage fewer.
WARPS, STAGES = 8, 3
TOPK = True  # profiling switch: False skips the top-k merge (wrong output), to time the scoring alone
_REDUCE = {"lse": 0, "max": 1, "mean": 2}


@functools.lru_cache(maxsize=64)
def _tables(segments: tuple[tuple[int, int], ...], block_size: int, tokens_per_tile: int,
            device: torch.device) -> dict:
    """Block and query-tile tables for the packed token axis (tiles never straddle a sequence)."""
    blk_start, blk_count, tiles = [], [], []
    for s, e in segments:
        boff = len(blk_start)
        nk = -(-(e - s) // block_size)
        blk_start += range(s, e, block_size)
        blk_count += [min(block_size, e - b) for b in range(s, e, block_size)]
        tiles += [(t, min(t + tokens_per_tile, e), s, boff, nk) for t in range(s, e, tokens_per_tile)]

    def t(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    cols = list(zip(*tiles))
    return dict(blk_start=t(blk_start), blk_count=t(blk_count), n_tiles=len(tiles),
                tile_start=t(cols[0]), tile_end=t(cols[1]), tile_seq=t(cols[2]), tile_boff=t(cols[3]),
                tile_nk=t(cols[4]), max_nk=max(cols[4]))


def block_statistics(k: torch.Tensor, blk_start: torch.Tensor, blk_count: torch.Tensor, block_size: int,
                     covariance: str | None, rank: int):
    """Per-block key moments for packed keys ``k`` [T, Hkv, D], blocks given by start token and count.

    Same formulas as ``spla_lit.ops.block_key_stats`` (population moments, zero-padded blocks). Returns
    ``(count [nK], mean [Hkv, nK, D], second)`` in float32, ``second`` = variance [Hkv, nK, D] (diag),
    ``(U [Hkv, nK, D, r], lam [Hkv, nK, r])`` (lowrank) or None.
    """
    offs = torch.arange(block_size, device=k.device)
    valid = offs[None, :] < blk_count[:, None]  # [nK, bs]
    idx = torch.where(valid, blk_start[:, None] + offs, 0)
    kb = k.float()[idx.long()].permute(2, 0, 1, 3)  # [Hkv, nK, bs, D]
    w = valid.float()[None, :, :, None]
    count = blk_count.float()
    mean = (kb * w).sum(2) / count[:, None]
    if covariance is None:
        return count, mean, None
    centered = (kb - mean[:, :, None]) * w
    if covariance == "diag":
        return count, mean, centered.square().sum(2) / count[:, None]
    cov = torch.einsum("hksd,hkse->hkde", centered, centered) / count[:, None, None]
    lam, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    r = min(rank, cov.shape[-1])
    return count, mean, (vecs[..., -r:], lam[..., -r:].clamp_min(0))


def _need_forced(max_blocks: int, local_blocks: int, sink_blocks: int) -> int:
    """Most forced blocks of any token (the last block of the longest sequence has the most)."""
    d = max_blocks - 1
    lo = max(0, d - local_blocks + 1)
    return d - lo + 1 + min(sink_blocks, lo)


def select_blocks_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Selection,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score key blocks and pick each token's top-k, fused: int32 [B, Hkv, N, topk].

    Args: q [B, N, Hq, D]; k [B, N, Hkv, D] (same dtype); selection: a ``spla_lit.options.Selection`` (block
    geometry as in ``spla_lit.ops.select_blocks``; scorer ``taylor1`` | ``taylor2`` with covariance ``diag`` |
    ``lowrank``; head_reduce ``lse`` | ``max`` | ``mean``); cu_seqlens int [S + 1] packs sequences (B == 1,
    local indices). Returns ascending block indices, -1 padded; forced local / sink blocks always in.
    Raises NotImplementedError for window mode, query_block > 1, other scorers, full covariance, D > 256 or G > 128.
    """
    if selection.mode != "topk":
        raise NotImplementedError("select_blocks_fused scores blocks (mode='topk' only)")
    block_size, topk, query_block = selection.block_size, selection.topk, selection.query_block
    local_blocks, sink_blocks, scale = selection.local_blocks, selection.sink_blocks, selection.scale
    scorer, covariance, rank = selection.scorer, selection.covariance, selection.rank
    head_reduce = selection.head_reduce
    if query_block != 1:
        raise NotImplementedError("select_blocks_fused selects per token only (query_block == 1)")
    if scorer not in ("taylor1", "taylor2") or (scorer == "taylor2" and covariance not in ("diag", "lowrank")):
        raise NotImplementedError(f"select_blocks_fused has no {scorer}/{covariance} scorer")
    if head_reduce not in _REDUCE:
        raise ValueError(f"unknown head_reduce {head_reduce!r}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, N, Hq, D] and k [B, N, Hkv, D] do not match: {tuple(q.shape)}, {tuple(k.shape)}")
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    G = Hq // Hkv
    if D > 256 or G > ROWS or topk > 1024:
        raise NotImplementedError(f"head dim {D}, group {G} or topk {topk} too large for the fused kernel")
    if min(block_size, topk, local_blocks) < 1 or sink_blocks < 0:
        raise ValueError("block_size, topk and local_blocks must be >= 1, sink_blocks >= 0")
    scale = D**-0.5 if scale is None else float(scale)
    order = 1 if scorer == "taylor1" else (2 if covariance == "diag" else 3)

    GP = next_pow2(G)
    BT = max(1, ROWS // GP)
    segments = sequence_segments(cu_seqlens, batch=B, n=N)
    tab = _tables(segments, block_size, BT, q.device)
    need = _need_forced(tab["max_nk"], local_blocks, sink_blocks)
    if need > topk:
        raise ValueError(f"topk ({topk}) is smaller than the {need} forced blocks "
                         f"(local_blocks={local_blocks}, sink_blocks={sink_blocks}, query_block={query_block})")

    qf = q.contiguous().view(B * N, Hq, D)
    kf = k.detach().contiguous().view(B * N, Hkv, D)
    with torch.no_grad():
        count, mean, second = block_statistics(kf, tab["blk_start"], tab["blk_count"], block_size,
                                               None if order == 1 else covariance, rank)
        logc = count.log().contiguous()
        mu = (scale * mean).contiguous()  # [Hkv, nK, D]
        if order == 2:
            sec = (0.5 * scale * scale * second).contiguous()  # [Hkv, nK, D]
        elif order == 3:
            U, lam = second  # [Hkv, nK, D, r], [Hkv, nK, r]
            w = U * (0.5 * scale * scale * lam).sqrt()[:, :, None, :]
            sec = w.permute(0, 3, 1, 2).contiguous()  # [Hkv, r, nK, D]
        else:
            sec = mu
    R = sec.shape[1] if order == 3 else 1
    KP = next_pow2(topk)
    BN = max(BLOCKS_PER_STEP, KP)
    out = torch.empty(Hkv, B * N, topk, dtype=torch.int32, device=q.device)
    lowp = q.dtype == torch.bfloat16
    select_kernel[(tab["n_tiles"], Hkv)](
        qf, logc, mu, sec, out, tab["tile_start"], tab["tile_end"], tab["tile_seq"], tab["tile_boff"],
        tab["tile_nk"],
        qf.stride(0), qf.stride(1), mu.stride(0), sec.stride(0), sec.stride(1) if order == 3 else 0,
        out.stride(0), out.stride(1),
        G, D, block_size, local_blocks, sink_blocks, topk,
        BT=BT, GP=GP, BD=max(16, next_pow2(D)), BN=BN, KP=KP, ORDER=order, RANK=R, REDUCE=_REDUCE[head_reduce],
        QUAD_SPLIT=QUAD_SPLIT, MERGE=TOPK, LOWP=lowp, INTERP=interpreting(), num_warps=WARPS,
        num_stages=STAGES if lowp else max(1, STAGES - 1),
    )
    return out.view(Hkv, B, N, topk).permute(1, 0, 2, 3).contiguous()
