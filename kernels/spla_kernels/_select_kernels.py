"""Triton kernel of the fused block scoring + per-token top-k selection (launched from ``select.py``).

One program takes ``BT`` tokens of one sequence and one KV head, all G query heads of that KV head packed as
rows ``(token, g)``; it walks the causally visible key blocks ``BN`` at a time, scores them with
``tl.dot`` against per-block statistics, reduces over the heads and folds the chunk into a running top-k.

Scores, per (token, head): ``log|b| + q.mu'_b [+ q^2.var'_b | + sum_r (q.w'_rb)^2]`` with the scale folded
into the statistics (``mu' = scale mu``, ``var' = scale^2/2 var``, ``w'_r = sqrt(scale^2/2 lam_r) u_r``).

Top-k: each (score, block) pair is packed into one int64 key, ``order-preserving(score) << 32 | (2^31-1-b)``
(ties go to the lower block), so the running top-k is a sort of integers: ``tl.topk`` of the chunk, then a
bitonic merge with the running list. Forced blocks score +inf, invisible ones (and -inf / NaN scores) get
the sentinel ``INT64_MIN`` and become -1 padding.

Statistics operands (``PRESPLIT``): either float32 ``[nK, D]`` arrays split into bf16 hi / lo halves inside
the loop (every program splits every block it reads), or ``block_stats_kernel``'s bf16 ``[nK, 4, D]`` rows
``(mu'_hi, mu'_lo, var'_hi, var'_lo)`` loaded as they are. ``RELAYOUT``: the step's keys go through a
``tl.gather`` by the identity index ``IOTA`` (loaded once, so its layout is a plain blocked one: a token per
warp, a block per lane); the gather's result takes that layout (one shared-memory layout conversion per step),
so the sort holds one key per thread instead of the head reduction's eight per thread (replicated across
lanes) and each compare-and-swap round is one shuffle instead of eight serial steps. A global scratch buffer
with a barrier did the same but stopped Triton from pipelining the statistics loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._linear_tl import dot, dot_rhs32, op


@triton.jit
def _sortable(x):
    """float32 -> int32 with the same order (for non-NaN values)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def select_kernel(
    Q, LOGC, MU, SEC, OUT, IOTA, tile_start, tile_end, tile_seq, tile_boff, tile_nk,
    sq_t, sq_h, s_mu_h, s_mu_b, s_sec_h, s_sec_r, so_h, so_t,
    G, D, block_size, local_blocks, sink_blocks, topk,
    BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    ORDER: tl.constexpr, RANK: tl.constexpr, REDUCE: tl.constexpr, QUAD_SPLIT: tl.constexpr,
    MEAN_SPLIT: tl.constexpr, PRESPLIT: tl.constexpr, RELAYOUT: tl.constexpr, MERGE: tl.constexpr,
    LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """grid (query tiles, Hkv). ORDER: 1 taylor1, 2 taylor2-diag, 3 taylor2-lowrank. REDUCE: 0 lse, 1 max, 2 mean.
    MU: float32 [Hkv, nK, D] (row stride s_mu_b = D), or with PRESPLIT bf16 [Hkv, nK, 4, D] (s_mu_b = 4 D; SEC
    unused). IOTA (RELAYOUT): int32 [BT * BN], ``j % BN``. OUT [Hkv, T, topk] int32: ascending local
    block indices, -1 padded."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(tile_start + pid)
    t1 = tl.load(tile_end + pid)
    seq0 = tl.load(tile_seq + pid)
    boff = tl.load(tile_boff + pid)
    nk = tl.load(tile_nk + pid)
    BM: tl.constexpr = BT * GP
    MAXB: tl.constexpr = 2147483647  # 2^31 - 1: block b is stored as MAXB - b in the low 32 bits of a key
    SENT: tl.constexpr = -9223372036854775808  # INT64_MIN: no block
    rows = tl.arange(0, BM)
    rtok = t0 + rows // GP
    rg = rows % GP
    row_ok = (rtok < t1) & (rg < G)
    ds = tl.arange(0, BD)
    dm = ds < D
    qf = tl.load(Q + rtok.to(tl.int64)[:, None] * sq_t + (h * G + rg)[:, None] * sq_h + ds[None, :],
                 mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
    q = op(qf, LOWP)
    if ORDER == 2:
        q2 = qf * qf  # exact in float32 for bf16 q
        q2h = op(q2, LOWP)
        q2l = op(q2 - q2h.to(tl.float32), LOWP)

    toks = t0 + tl.arange(0, BT)
    diag = (toks - seq0) // block_size  # the block holding the token
    lo = tl.maximum(diag - local_blocks + 1, 0)  # first forced local block
    n_vis = (t1 - 1 - seq0) // block_size + 1  # blocks visible to the tile's last token
    best = tl.full([BT, KP], SENT, dtype=tl.int64)
    if RELAYOUT:
        iota = tl.load(IOTA + tl.arange(0, BT)[:, None] * BN + tl.arange(0, BN)[None, :])
    for b0 in range(0, n_vis, BN):
        blk = b0 + tl.arange(0, BN)
        bok = blk < nk
        gb = (boff + blk).to(tl.int64)
        st_off = gb[None, :] * s_mu_b + ds[:, None]  # [BD, BN] view of the [nK, (4,) D] statistics
        st_m = dm[:, None] & bok[None, :]
        s = tl.zeros([BM, BN], dtype=tl.float32)
        if PRESPLIT:
            # bf16 halves as stored: (mu_hi, mu_lo, var_hi, var_lo) at offsets 0, D, 2D, 3D of each block row.
            st = MU + h * s_mu_h + st_off
            s = dot(q, tl.load(st, mask=st_m, other=0.0), s, LOWP, INTERP)
            if MEAN_SPLIT:
                s = dot(q, tl.load(st + D, mask=st_m, other=0.0), s, LOWP, INTERP)
            if ORDER == 2:
                vh = tl.load(st + 2 * D, mask=st_m, other=0.0)
                s = dot(q2h, vh, s, LOWP, INTERP)
                if QUAD_SPLIT:
                    s = dot(q2l, vh, s, LOWP, INTERP)
                    s = dot(q2h, tl.load(st + 3 * D, mask=st_m, other=0.0), s, LOWP, INTERP)
        else:
            mu = tl.load(MU + h * s_mu_h + st_off, mask=st_m, other=0.0)
            s = dot_rhs32(q, mu, s, MEAN_SPLIT, LOWP, INTERP)
            if ORDER == 2:
                var = tl.load(SEC + h * s_sec_h + st_off, mask=st_m, other=0.0)
                if LOWP:
                    vh = var.to(tl.bfloat16)
                    s = dot(q2h, vh, s, LOWP, INTERP)
                    if QUAD_SPLIT:
                        s = dot(q2l, vh, s, LOWP, INTERP)
                        s = dot(q2h, (var - vh.to(tl.float32)).to(tl.bfloat16), s, LOWP, INTERP)
                else:
                    s = dot(q2h, var, s, LOWP, INTERP)
        if ORDER == 3:
            for r in tl.static_range(RANK):
                w = tl.load(SEC + h * s_sec_h + r * s_sec_r + st_off, mask=st_m, other=0.0)
                p = dot_rhs32(q, w, tl.zeros([BM, BN], dtype=tl.float32), QUAD_SPLIT, LOWP, INTERP)
                s += p * p
        s += tl.load(LOGC + gb, mask=bok, other=0.0)[None, :]
        # Reduce the G heads of each token: rows (token, g) -> [BT, GP, BN].
        s3 = tl.reshape(s, [BT, GP, BN])
        g_ok = (tl.arange(0, GP) < G)[None, :, None]
        if REDUCE == 0:
            s3 = tl.where(g_ok, s3, float("-inf"))
            m = tl.max(s3, axis=1)
            red = m + tl.log(tl.sum(tl.exp(s3 - m[:, None, :]), axis=1))
        elif REDUCE == 1:
            red = tl.max(tl.where(g_ok, s3, float("-inf")), axis=1)
        else:
            red = tl.sum(tl.where(g_ok, s3, 0.0), axis=1) / G
        vis = (blk[None, :] <= diag[:, None]) & bok[None, :]
        forced = vis & ((blk[None, :] >= lo[:, None]) | (blk[None, :] < sink_blocks))
        red = tl.where(forced, float("inf"), red)
        red = tl.where(red != red, float("-inf"), red)  # NaN scores are never picked, like the reference
        key = (_sortable(red).to(tl.int64) << 32) + (MAXB - blk)[None, :].to(tl.int64)
        key = tl.where(vis & (red != float("-inf")), key, SENT)
        if RELAYOUT:
            key = tl.gather(key, iota, 1)  # the identity permutation: only the layout changes
        if MERGE:
            cand = tl.topk(key, KP, dim=1)  # descending
            # best (descending) and cand reversed (ascending): their elementwise max holds the top KP of both
            # and is bitonic, so one merge sorts it.
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(cand, 1)), dim=1, descending=True)
        else:
            best = tl.maximum(best, tl.max(key, axis=1)[:, None])
    rank = tl.arange(0, KP)[None, :]
    keep = (best != SENT) & (rank < topk)
    idx = tl.where(keep, MAXB - (best & 0xFFFFFFFF).to(tl.int32), MAXB)
    idx = tl.sort(idx, dim=1)  # ascending, padding (MAXB) last
    idx = tl.where(idx == MAXB, -1, idx)
    tok_ok = toks < t1
    tl.store(OUT + h * so_h + toks.to(tl.int64)[:, None] * so_t + rank, idx, mask=tok_ok[:, None] & (rank < topk))


@triton.jit
def block_stats_kernel(K, blk_start, blk_len, ST, LOGC, sk_t, sk_h, s_st_h, s_st_b, scale, half_scale2, D,
                       BS: tl.constexpr, BD: tl.constexpr, ORDER: tl.constexpr):
    """grid (blocks, Hkv). The selection's operands of one key block, in one pass over its keys K [T, Hkv, D]
    (the block: tokens ``[blk_start[b], blk_start[b] + blk_len[b])``): ST [Hkv, nK, 2 | 4, D] bf16 rows
    ``(mu'_hi, mu'_lo[, var'_hi, var'_lo])`` with ``mu' = scale * mean`` and ``var' = scale^2 / 2 * var``
    (population moments, float32 sums, the centered form of ``spla_lit.ops.block_key_stats``), hi / lo the
    bf16 rounding of the float32 value and of its remainder; LOGC [nK] float32 ``log(count)``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(blk_start + b)
    n = tl.load(blk_len + b)
    ds = tl.arange(0, BD)
    dm = ds < D
    base = K + h * sk_h + ds[None, :]
    acc = tl.zeros([BD], dtype=tl.float32)
    for t0 in range(0, n, BS):
        t = t0 + tl.arange(0, BS)
        m = (t < n)[:, None] & dm[None, :]
        acc += tl.sum(tl.load(base + (start + t).to(tl.int64)[:, None] * sk_t, mask=m, other=0.0).to(tl.float32), 0)
    cnt = n.to(tl.float32)
    mean = acc / cnt
    row = ST + h * s_st_h + b.to(tl.int64) * s_st_b + ds
    mu = scale * mean
    mh = mu.to(tl.bfloat16)
    tl.store(row, mh, mask=dm)
    tl.store(row + D, (mu - mh.to(tl.float32)).to(tl.bfloat16), mask=dm)
    if ORDER == 2:
        acc2 = tl.zeros([BD], dtype=tl.float32)
        for t0 in range(0, n, BS):
            t = t0 + tl.arange(0, BS)
            m = (t < n)[:, None] & dm[None, :]
            x = tl.load(base + (start + t).to(tl.int64)[:, None] * sk_t, mask=m, other=0.0).to(tl.float32)
            c = tl.where(m, x - mean[None, :], 0.0)
            acc2 += tl.sum(c * c, 0)
        var = half_scale2 * (acc2 / cnt)
        vh = var.to(tl.bfloat16)
        tl.store(row + 2 * D, vh, mask=dm)
        tl.store(row + 3 * D, (var - vh.to(tl.float32)).to(tl.bfloat16), mask=dm)
    if h == 0:
        tl.store(LOGC + b, tl.log(cnt))
