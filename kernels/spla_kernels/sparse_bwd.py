"""Backward kernels of the fused sparse + selected-linear attention.

* ``sparse_bwd_dq_kernel``: grouped like the forward (query group x union of units); computes
  ``Delta_i = rowsum(dO_i * O_i) - dlse_i``, dQ and d(phi_q), and leaves for the dK/dV kernel Delta, a copy
  of dsel's value channels in the inputs' dtype (aligned rows, half the bytes to gather) and its normalizer
  channel.
* ``sparse_bwd_dkv_kernel``: one program per transposed item (a unit and the tokens of one query window
  that selected it); gathers those tokens' G query rows in tiles and accumulates dK, dV, d(phi_k) for
  the unit in registers, then adds them to float32 buffers (a unit is split over several windows).

Gradients: with ``P = exp(S - lse)``, ``dS = P * (dP - Delta)`` (``dP = dO V^T``; an upstream dlse adds
to dS, folded into Delta). Selected-linear ``sel_i = sum_j A_ij [v_j, 1]`` with ``A = phi_q phi_k^T``
(masked): ``dA = dsel_v V^T + dnorm``, ``d(phi_q) = dA phi_k``, ``d(phi_k) = dA^T phi_q``,
``dV += A^T dsel_v``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sparse_fwd import _group_rows, _group_unit, _ld, _st

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def sparse_bwd_dq_kernel(
    Q, K, V, PQ, PK, O, DO, LSE, DLSE, DSEL, DELTA, DSEL16, DNORM, DQ, DPQ,
    g_start, g_bits, g_count,
    qk_scale, scale, N, NG, W,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DVS: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    BQ: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr,
    SPARSE: tl.constexpr, SELECTED: tl.constexpr, NORM: tl.constexpr, HAS_DLSE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_g, bh, b, h, tq, tok, hg, rvalid, q_row = _group_rows(N, HQ, HKV, G, BQ, BM)
    l_row = (b * HQ + h * G + hg).to(tl.int64) * N + tok
    kr = tl.arange(0, BSP)
    kin = kr < BS

    if SPARSE:
        q = _ld(Q, q_row, rvalid, D, BD, D, UPCAST)
        do = _ld(DO, q_row, rvalid, DV, BDV, DV, UPCAST)
        o = _ld(O, q_row, rvalid, DV, BDV, DV, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + l_row, mask=rvalid, other=0.0)
        tl.store(DELTA + l_row, delta, mask=rvalid)
        lse2 = tl.load(LSE + l_row, mask=rvalid, other=0.0) * LOG2E
        dq = tl.zeros([BM, BD], tl.float32)
    if SELECTED:
        # dsel is float32; the tensor cores take it in the inputs' dtype (like dO in flash attention).
        dsel = _ld(DSEL, q_row, rvalid, DV, BDV, DVS, False).to(DSEL16.dtype.element_ty)
        _st(DSEL16, q_row, dsel, rvalid, DV, BDV, DV)
        if UPCAST:
            dsel = dsel.to(tl.float32)
        if NORM:
            dnorm = tl.load(DSEL + q_row * DVS + DV, mask=rvalid, other=0.0)
            tl.store(DNORM + l_row, dnorm, mask=rvalid)
        dpq = tl.zeros([BM, BF], tl.float32)

    gi = bh.to(tl.int64) * NG + pid_g
    n_units = tl.load(g_count + gi)
    for i in range(n_units):
        kvalid, k_row, allowed = _group_unit(g_start, g_bits, gi, W, i, kr, kin, N, b, h, tq, tok, rvalid, HKV, BQ)
        v = _ld(V, k_row, kvalid, DV, BDV, DV, UPCAST)
        if SPARSE:
            k = _ld(K, k_row, kvalid, D, BD, D, UPCAST)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        if SELECTED:
            pk = _ld(PK, k_row, kvalid, F, BF, F, UPCAST)
            da = tl.dot(dsel, tl.trans(v))
            if NORM:
                da += dnorm[:, None]
            da = tl.where(allowed, da, 0.0)
            dpq += tl.dot(da.to(pk.dtype), pk)

    if SPARSE:
        _st(DQ, q_row, dq * scale, rvalid, D, BD, D)
    if SELECTED:
        _st(DPQ, q_row, dpq, rvalid, F, BF, F)


@triton.jit
def sparse_bwd_dkv_kernel(
    Q, K, V, PQ, PK, DO, LSE, DELTA, DSEL16, DNORM, DK, DV_, DPK,
    it_tok, it_seg, it_off, it_len, u_start, u_end,
    qk_scale, scale, N, NU,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr,
    SPARSE: tl.constexpr, SELECTED: tl.constexpr, NORM: tl.constexpr, UPCAST: tl.constexpr,
):
    it = tl.program_id(0)
    seg = tl.load(it_seg + it)
    off = tl.load(it_off + it)
    n_tok = tl.load(it_len + it)
    bh = seg // NU
    unit = seg % NU
    b = bh // HKV
    h = bh % HKV
    kr = tl.arange(0, BSP)
    kpos = tl.load(u_start + unit) + kr
    # n_tok == 0: a spare item of the host-sized list; masking every key row makes it load and add nothing
    kvalid = (kr < BS) & (kpos < tl.load(u_end + unit)) & (n_tok > 0)
    k_row = (b * N + kpos).to(tl.int64) * HKV + h
    v = _ld(V, k_row, kvalid, DV, BDV, DV, UPCAST)
    dv = tl.zeros([BSP, BDV], tl.float32)
    if SPARSE:
        k = _ld(K, k_row, kvalid, D, BD, D, UPCAST)
        dk = tl.zeros([BSP, BD], tl.float32)
    if SELECTED:
        pk = _ld(PK, k_row, kvalid, F, BF, F, UPCAST)
        dpk = tl.zeros([BSP, BF], tl.float32)

    r = tl.arange(0, BM)
    ti = r // G
    head = h * G + r % G
    for t0 in range(0, n_tok, BT):
        idx = t0 + ti
        rvalid = (ti < BT) & (idx < n_tok)
        tok = tl.load(it_tok + off + idx, mask=rvalid, other=0)
        q_row = (b * N + tok).to(tl.int64) * HQ + head
        l_row = (b * HQ + head).to(tl.int64) * N + tok
        allowed = rvalid[None, :] & kvalid[:, None] & (kpos[:, None] <= tok[None, :])  # [BSP, BM]
        if SPARSE:
            q = _ld(Q, q_row, rvalid, D, BD, D, UPCAST)
            do = _ld(DO, q_row, rvalid, DV, BDV, DV, UPCAST)
            lse2 = tl.load(LSE + l_row, mask=rvalid, other=0.0) * LOG2E
            delta = tl.load(DELTA + l_row, mask=rvalid, other=0.0)
            st = tl.dot(k, tl.trans(q)) * qk_scale
            pt = tl.where(allowed, tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        if SELECTED:
            pq = _ld(PQ, q_row, rvalid, F, BF, F, UPCAST)
            dsel = _ld(DSEL16, q_row, rvalid, DV, BDV, DV, UPCAST)
            at = tl.where(allowed, tl.dot(pk, tl.trans(pq)), 0.0)
            dv += tl.dot(at.to(dsel.dtype), dsel)
            dat = tl.dot(v, tl.trans(dsel))
            if NORM:
                dat += tl.load(DNORM + l_row, mask=rvalid, other=0.0)[None, :]
            dat = tl.where(allowed, dat, 0.0)
            dpk += tl.dot(dat.to(pq.dtype), pq)

    _atomic_tile(DV_, k_row, dv, kvalid, DV, BDV)
    if SPARSE:
        _atomic_tile(DK, k_row, dk * scale, kvalid, D, BD)
    if SELECTED:
        _atomic_tile(DPK, k_row, dpk, kvalid, F, BF)


@triton.jit
def _atomic_tile(P, rows, x, rmask, C: tl.constexpr, BC: tl.constexpr):
    """Add tile ``x [R, BC]`` into float32 rows ``rows`` (columns < C): a unit's gradient may come from
    several work items (one per query window)."""
    c = tl.arange(0, BC)
    ptrs = P + rows[:, None] * C + c[None, :]
    if BC == C:
        tl.atomic_add(ptrs, x, mask=rmask[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=rmask[:, None] & (c[None, :] < C), sem="relaxed")
