"""Fused block scoring + per-token top-k block selection (``spla_kernels.select_blocks_fused``).

Equals ``select_blocks(block_scores(q, k, ...), ...)`` of ``spla_lit.ops`` (ties and rounding aside) for the
``taylor1`` and ``taylor2`` (``diag`` / ``lowrank``) scorers with ``query_block == 1``, without ever holding
the [B, Hkv, N, nK] score matrix: block statistics (mean, variance or top eigenpairs, O(N D) per head) come
from ``spla_lit.ops.block_key_stats``; the (tokens x blocks) scoring, head reduction and exact top-k run in
one Triton kernel (``_select_kernels.select_kernel``). Other selections raise ``NotImplementedError`` so that
the caller falls back to the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from spla_lit.ops import block_key_stats
from spla_lit.ops.utils import next_pow2, sequence_segments
from spla_lit.options import COVARIANCES, Selection

from ._select_kernels import select_kernel
from ._utils import interpreting
from .config import SelectConfig, arch_of, select_config

_REDUCE = {"lse": 0, "max": 1, "mean": 2}
# The kernel's ORDER constexpr: 1 taylor1 (any covariance: unused), 2 taylor2 / diag, 3 taylor2 / lowrank.
_ORDER = {("taylor1", c): 1 for c in COVARIANCES} | {("taylor2", "diag"): 2, ("taylor2", "lowrank"): 3}


@functools.lru_cache(maxsize=64)
def _tables(segments: tuple[tuple[int, int], ...], block_size: int, tokens_per_tile: int,
            device: torch.device) -> dict:
    """Block and query-tile tables for the packed token axis (tiles never straddle a sequence)."""
    tiles, boff = [], 0
    for s, e in segments:
        nk = -(-(e - s) // block_size)
        tiles += [(t, min(t + tokens_per_tile, e), s, boff, nk) for t in range(s, e, tokens_per_tile)]
        boff += nk

    def t(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    cols = list(zip(*tiles))
    return dict(n_tiles=len(tiles), tile_start=t(cols[0]), tile_end=t(cols[1]), tile_seq=t(cols[2]),
                tile_boff=t(cols[3]), tile_nk=t(cols[4]))


def _block_stats(k: torch.Tensor, segments: tuple[tuple[int, int], ...], block_size: int, covariance: str | None,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """``spla_lit.ops.block_key_stats`` of every sequence of the packed keys ``k`` [T, Hkv, D], its blocks
    laid end to end in sequence order: ``(count [nK], mean [Hkv, nK, D], second)`` float32, ``second`` as
    there with the batch dim folded into the blocks (variance [Hkv, nK, D], or (U [Hkv, nK, D, r],
    lam [Hkv, nK, r])), or None. Sequences of one length go through one call (all of them without packing)."""
    by_len: dict[int, list[int]] = {}
    for i, (s, e) in enumerate(segments):
        by_len.setdefault(e - s, []).append(i)
    nks = [-(-(e - s) // block_size) for s, e in segments]
    first = [sum(nks[:i]) for i in range(len(nks))]
    parts = []  # per length: (global block indices [n * nk], count [nk], mean, second)
    for length, seqs in by_len.items():
        if len(seqs) == len(segments):  # every sequence has this length: a view, no copy
            kk = k.view(len(seqs), length, *k.shape[1:])
        else:
            kk = torch.stack([k[segments[i][0]:segments[i][1]] for i in seqs])  # [n, L, Hkv, D]
        count, mean, second = block_key_stats(kk, block_size, covariance, rank)
        where = torch.tensor([first[i] + j for i in seqs for j in range(count.numel())], device=k.device)
        parts.append((where, count, mean, second))
    Hkv, n_blocks = k.shape[1], sum(nks)

    def gather(pieces: list[torch.Tensor]) -> torch.Tensor:
        """Per-length [n, Hkv, nk, ...] pieces -> [Hkv, nK, ...] float32 in global block order."""
        out = torch.empty((Hkv, n_blocks, *pieces[0].shape[3:]), device=k.device)
        for (where, *_), x in zip(parts, pieces):
            out[:, where] = x.transpose(0, 1).reshape(Hkv, -1, *x.shape[3:]).float()
        return out

    count = torch.empty(n_blocks, device=k.device)
    for where, c, _, _ in parts:
        count[where] = c.float().repeat(len(where) // c.numel())
    mean = gather([p[2] for p in parts])
    if covariance is None:
        return count, mean, None
    if covariance == "diag":
        return count, mean, gather([p[3] for p in parts])
    return count, mean, (gather([p[3][0] for p in parts]), gather([p[3][1] for p in parts]))


@dataclass
class _Launch:
    """One launch of ``select_kernel``: grid, arguments and constexprs (without ``MERGE``), and the output
    ``out`` [Hkv, B * N, topk] it fills."""

    grid: tuple[int, int]
    args: tuple
    meta: dict
    out: torch.Tensor
    shape: tuple[int, int, int, int]  # (B, Hkv, N, topk) of the result

    def result(self) -> torch.Tensor:
        B, Hkv, N, topk = self.shape
        return self.out.view(Hkv, B, N, topk).permute(1, 0, 2, 3).contiguous()


def _prepare(q: torch.Tensor, k: torch.Tensor, selection: Selection, cu_seqlens: torch.Tensor | None,
             config: SelectConfig | None) -> _Launch:
    """Check the arguments, compute the block statistics and lay out the kernel launch."""
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a spla_lit.options.Selection, got {type(selection).__name__}")
    sel = selection
    if sel.mode != "topk":
        raise NotImplementedError(f"select_blocks_fused scores blocks (mode='topk'), got mode={sel.mode!r}")
    if sel.query_block != 1:
        raise NotImplementedError("select_blocks_fused selects per token only (query_block == 1)")
    order = _ORDER.get((sel.scorer, sel.covariance))
    if order is None:
        raise NotImplementedError(f"select_blocks_fused has no {sel.scorer}/{sel.covariance} scorer")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, N, Hq, D] and k [B, N, Hkv, D] do not match: {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q's {Hq} heads are not a multiple of k's {Hkv}")
    G = Hq // Hkv
    cfg = config or select_config(arch_of(q.device), dtype=q.dtype, head_dim=D)
    if D > 256 or cfg.rows < G or sel.topk > 1024:
        raise NotImplementedError(f"head dim {D}, group {G} or topk {sel.topk} too large for the fused kernel")
    scale = D**-0.5 if sel.scale is None else float(sel.scale)
    GP = next_pow2(G)
    BT = max(1, cfg.rows // GP)
    segments = sequence_segments(cu_seqlens, batch=B, n=N)
    tab = _tables(segments, sel.block_size, BT, q.device)

    qf = q.detach().contiguous().view(B * N, Hq, D)
    kf = k.detach().contiguous().view(B * N, Hkv, D)
    with torch.no_grad(), record_function("spla_kernels.select: block statistics"):
        count, mean, second = _block_stats(kf, segments, sel.block_size, None if order == 1 else sel.covariance,
                                           sel.rank)
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
    KP = next_pow2(sel.topk)
    out = torch.empty(Hkv, B * N, sel.topk, dtype=torch.int32, device=q.device)
    lowp = q.dtype == torch.bfloat16
    args = (qf, logc, mu, sec, out, tab["tile_start"], tab["tile_end"], tab["tile_seq"], tab["tile_boff"],
            tab["tile_nk"], qf.stride(0), qf.stride(1), mu.stride(0), sec.stride(0),
            sec.stride(1) if order == 3 else 0, out.stride(0), out.stride(1),
            G, D, sel.block_size, sel.local_blocks, sel.sink_blocks, sel.topk)
    meta = dict(BT=BT, GP=GP, BD=max(16, next_pow2(D)), BN=max(cfg.blocks_per_step, KP), KP=KP, ORDER=order,
                RANK=sec.shape[1] if order == 3 else 1, REDUCE=_REDUCE[sel.head_reduce], QUAD_SPLIT=cfg.quad_split,
                LOWP=lowp, INTERP=interpreting(), num_warps=cfg.warps, num_stages=cfg.stages)
    return _Launch((tab["n_tiles"], Hkv), args, meta, out, (B, Hkv, N, sel.topk))


def select_blocks_fused(q: torch.Tensor, k: torch.Tensor, selection: Selection, *,
                        cu_seqlens: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        config: SelectConfig | None = None) -> torch.Tensor:
    """Score key blocks and pick each token's top-k, fused: int32 [B, Hkv, N, selection.topk].

    Args:
        q [B, N, Hq, D], k [B, N, Hkv, D]: one dtype and device; not differentiated.
        selection: block geometry and scorer (``spla_lit.options.Selection``): block_size, topk, local_blocks,
            sink_blocks, scorer ``taylor1`` | ``taylor2`` (covariance ``diag`` | ``lowrank``, rank),
            head_reduce, scale.
        cu_seqlens: int [S + 1] packs sequences (B == 1); block indices are local to each sequence.
        generator: unused (the fused scorers draw nothing); accepted so callers pass the reference's arguments.
        config: tiles; None takes the per-device table (``spla_kernels.config``).

    Returns ascending block indices, -1 padded; the forced local / sink blocks are always in.
    Raises NotImplementedError for what it does not fuse (mode ``window``, query_block > 1, the ``random`` /
    ``oracle`` scorers, full covariance, D > 256, more query heads per KV head than ``config.rows``,
    topk > 1024) or a GPU without table tiles, so that ``spla_lit.ops`` falls back to its reference.
    """
    del generator
    launch = _prepare(q, k, selection, cu_seqlens, config)
    with record_function("spla_kernels.select: kernel"):
        select_kernel[launch.grid](*launch.args, MERGE=True, **launch.meta)
    return launch.result()
