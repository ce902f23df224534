"""Forward kernel: block-sparse softmax attention and the selected-linear term over the same K/V tiles.

One program per (query group, batch x KV head). Its rows are the ``BQ`` consecutive tokens of the group
times the ``G`` query heads of the KV head (``BM = next_pow2(BQ * G)`` rows, padding masked). It walks the
sorted union of the group's selected units once; a unit's keys count for row (token t, head g) only if
token t selected the unit (a bit of ``bits``) and the key is causal (``j <= t``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ld(P, rows, rmask, C: tl.constexpr, BC: tl.constexpr, STRIDE: tl.constexpr, UPCAST: tl.constexpr):
    """Tile ``[R, BC]`` of the rows ``rows`` (int64 row indices, ``STRIDE`` elements apart), columns < C.

    The column mask is left out when ``C == BC``: a mask that varies along the contiguous dimension stops
    Triton from vectorising the loads (one 2-byte load per element instead of 16-byte vectors).
    """
    c = tl.arange(0, BC)
    ptrs = P + rows[:, None] * STRIDE + c[None, :]
    if BC == C:
        x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=rmask[:, None] & (c[None, :] < C), other=0.0)
    if UPCAST:  # the interpreter cannot multiply bf16 tiles
        x = x.to(tl.float32)
    return x


@triton.jit
def _st(P, rows, x, rmask, C: tl.constexpr, BC: tl.constexpr, STRIDE: tl.constexpr):
    """Store tile ``x [R, BC]`` into rows ``rows`` (columns < C), converting to the pointer's dtype."""
    c = tl.arange(0, BC)
    ptrs = P + rows[:, None] * STRIDE + c[None, :]
    if BC == C:
        tl.store(ptrs, x.to(P.dtype.element_ty), mask=rmask[:, None])
    else:
        tl.store(ptrs, x.to(P.dtype.element_ty), mask=rmask[:, None] & (c[None, :] < C))


@triton.jit
def _group_rows(N, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr):
    """The program's query group (grid: query groups x batch * KV heads) and its rows: row r is token
    ``r // G`` of the group, query head ``r % G`` of the KV head. Returns ``(pid_g, bh, b, h, tq, tok, hg,
    rvalid, q_row)``: group, batch x KV head, batch, KV head, token index in the group, token, head in the
    group, row valid, and the row's index in the ``[B, N, HQ]`` rows of q / o."""
    pid_g = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    r = tl.arange(0, BM)
    tq = r // G
    tok = pid_g * BQ + tq
    hg = r % G
    rvalid = (tq < BQ) & (tok < N)
    q_row = (b * N + tok).to(tl.int64) * HQ + h * G + hg
    return pid_g, bh, b, h, tq, tok, hg, rvalid, q_row


@triton.jit
def _group_unit(g_start, g_bits, gi, W, i, kr, kin, N, b, h, tq, tok, rvalid, HKV: tl.constexpr, BQ: tl.constexpr):
    """Unit ``i`` of query group ``gi``'s union: ``(kvalid, k_row, allowed)``, the unit's valid keys, their
    rows in the ``[B, N, HKV]`` rows of k / v, and the (row, key) mask: the row's token selected the unit
    (its bit) and the key is causal for it."""
    kpos = tl.load(g_start + gi * W + i) + kr
    kvalid = kin & (kpos < N)
    k_row = (b * N + kpos).to(tl.int64) * HKV + h
    if BQ == 1:  # noqa: SIM108 - one token per group: every listed unit is its own
        allowed = rvalid
    else:
        allowed = (((tl.load(g_bits + gi * W + i) >> tq) & 1) != 0) & rvalid
    allowed = allowed[:, None] & (kpos[None, :] <= tok[:, None]) & kvalid[None, :]
    return kvalid, k_row, allowed


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, PQ, PK, O, LSE, SEL,
    g_start, g_bits, g_count,
    qk_scale, N, NG, W,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DVS: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    BQ: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr,
    SPARSE: tl.constexpr, SELECTED: tl.constexpr, NORM: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_g, bh, b, h, tq, tok, hg, rvalid, q_row = _group_rows(N, HQ, HKV, G, BQ, BM)
    kr = tl.arange(0, BSP)
    kin = kr < BS  # the padded tail of a short block (block_size < 16)
    LN2: tl.constexpr = 0.6931471805599453

    if SPARSE:
        q = _ld(Q, q_row, rvalid, D, BD, D, UPCAST)
        m = tl.full([BM], float("-inf"), tl.float32)
        lsum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BDV], tl.float32)
    if SELECTED:
        pq = _ld(PQ, q_row, rvalid, F, BF, F, UPCAST)
        sacc = tl.zeros([BM, BDV], tl.float32)
        nacc = tl.zeros([BM], tl.float32)

    gi = bh.to(tl.int64) * NG + pid_g
    n_units = tl.load(g_count + gi)
    for i in range(n_units):
        kvalid, k_row, allowed = _group_unit(g_start, g_bits, gi, W, i, kr, kin, N, b, h, tq, tok, rvalid, HKV, BQ)
        v = _ld(V, k_row, kvalid, DV, BDV, DV, UPCAST)
        if SPARSE:
            k = _ld(K, k_row, kvalid, D, BD, D, UPCAST)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SELECTED:
            pk = _ld(PK, k_row, kvalid, F, BF, F, UPCAST)
            a = tl.dot(pq, tl.trans(pk))
            a = tl.where(allowed, a, 0.0)
            sacc += tl.dot(a.to(v.dtype), v)
            if NORM:
                nacc += tl.sum(a, 1)

    if SPARSE:
        has = lsum > 0
        _st(O, q_row, acc / tl.where(has, lsum, 1.0)[:, None], rvalid, DV, BDV, DV)
        lse = tl.where(has, (m + tl.log2(tl.where(has, lsum, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + (b * HQ + h * G + hg).to(tl.int64) * N + tok, lse, mask=rvalid)
    if SELECTED:
        _st(SEL, q_row, sacc, rvalid, DV, BDV, DVS)
        if NORM:
            tl.store(SEL + q_row * DVS + DV, nacc, mask=rvalid)
