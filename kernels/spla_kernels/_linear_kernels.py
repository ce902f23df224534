"""Triton kernels of the chunked causal linear attention (launched from ``linear.py``).

Tokens are packed ``[T, H, D]`` (batch folded into T); the sequence is cut into chunks of ``C`` tokens that
never straddle a sequence boundary, and consecutive chunks of one sequence into super-chunks. Three kinds
of kernel:

- :func:`states_local_kernel`: per super-chunk, the running state ``sum x^T y`` over its chunks, stored
  before each chunk (exclusive prefix, or suffix when REVERSE) and the super-chunk total. Rows are
  (token, head) pairs: ``GR`` heads of ``X``/``Y`` feed one state head (GR = 1 for the forward state
  ``k^T v``, G for the backward state ``sum_g q_g^T do_g``).
- :func:`states_scan_kernel`: exclusive scan of the super-chunk totals, restarting at each sequence, and
  :func:`states_fixup_kernel`: ``S[c] = LOC[c] + P[super(c)]``, the float32 state before chunk c.
- :func:`chunk_out_kernel`: ``o = x S + causal(x k^T) y`` for a tile of (token, head) rows of one chunk;
  :func:`chunk_dkdv_kernel`: the key-side gradients of one chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._linear_tl import dot, dot_lhs32, dot_rhs32, op


@triton.jit
def states_local_kernel(
    X, Y, YE, LOC, TOT, chunk_start, chunk_end, super_first, super_count,
    sx_t, sx_h, sy_t, sy_h, sye_t, sye_h, H, DX, DY, SZ, GR,
    BR: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, STORE_LOC: tl.constexpr,
    REVERSE: tl.constexpr, YEXT: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """grid (super-chunks, H, y tiles). LOC [nC, H, SZ], TOT [nS, H, SZ] float32: per (chunk, head) the state
    ``[DX, DY]`` row-major, then (YEXT) its extra column ``[DX]`` (``sum x y_e``, ``SZ = DX * (DY + 1)``).
    YEXT: 0 none, 1 the extra column ``YE [T, H * GR]`` is loaded, 2 it is all ones (``sum x``). The extra
    column is accumulated in float32 by the first y-tile program, exactly (no bf16 rounding).
    Without STORE_LOC (one chunk per super-chunk) LOC would be all zeros and is not written."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    yt = tl.program_id(2)
    c0 = tl.load(super_first + s)
    nc = tl.load(super_count + s)
    xs = tl.arange(0, BX)
    ys = yt * BY + tl.arange(0, BY)
    xm = xs < DX
    ym = ys < DY
    st_off = xs[:, None] * DY + ys[None, :]
    st_m = xm[:, None] & ym[None, :]
    ext_m = xm & (yt == 0)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    acc_e = tl.zeros([BX], dtype=tl.float32)
    for i in range(nc):
        c = c0 + nc - 1 - i if REVERSE else c0 + i
        if STORE_LOC:
            base = (c.to(tl.int64) * H + h) * SZ
            tl.store(LOC + base + st_off, acc, mask=st_m)
            if YEXT != 0:
                tl.store(LOC + base + DX * DY + xs, acc_e, mask=ext_m)
        cs = tl.load(chunk_start + c)
        nrows = (tl.load(chunk_end + c) - cs) * GR
        for r0 in range(0, nrows, BR):
            rows = r0 + tl.arange(0, BR)
            ok = rows < nrows
            tok = (cs + rows // GR).to(tl.int64)
            hh = h * GR + rows % GR
            x = tl.load(X + tok[:, None] * sx_t + hh[:, None] * sx_h + xs[None, :],
                        mask=ok[:, None] & xm[None, :], other=0.0)
            y = tl.load(Y + tok[:, None] * sy_t + hh[:, None] * sy_h + ys[None, :],
                        mask=ok[:, None] & ym[None, :], other=0.0)
            acc = dot(tl.trans(op(x, LOWP)), op(y, LOWP), acc, LOWP, INTERP)
            if YEXT == 1:
                ye = tl.load(YE + tok * sye_t + hh * sye_h, mask=ok, other=0.0).to(tl.float32)
                acc_e += tl.sum(x.to(tl.float32) * ye[:, None], axis=0)
            elif YEXT == 2:
                acc_e += tl.sum(x.to(tl.float32), axis=0)
    base = (s.to(tl.int64) * H + h) * SZ
    tl.store(TOT + base + st_off, acc, mask=st_m)
    if YEXT != 0:
        tl.store(TOT + base + DX * DY + xs, acc_e, mask=ext_m)


@triton.jit
def states_scan_kernel(TOT, P, restart, nS, H, DXY, U: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """grid (H, element blocks). P[s] = sum of TOT over the earlier (later, REVERSE) super-chunks of s's
    sequence; ``restart[s]`` marks the first super-chunk of a sequence in scan order. U super-chunks are
    loaded at once (their loads overlap) and scanned in registers."""
    h = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < DXY
    us = tl.arange(0, U)
    run = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, nS, U):
        ok = i0 + us < nS
        ss = nS - 1 - (i0 + us) if REVERSE else i0 + us
        ptr = (ss.to(tl.int64) * H + h)[:, None] * DXY + offs[None, :]
        tm = ok[:, None] & m[None, :]
        t = tl.load(TOT + ptr, mask=tm, other=0.0)
        rs = tl.load(restart + ss, mask=ok, other=0)
        p = tl.zeros([U, BLOCK], dtype=tl.float32)
        for u in tl.static_range(U):
            sel = us == u
            run = tl.where(tl.sum(tl.where(sel, rs, 0)) != 0, 0.0, run)
            p = tl.where(sel[:, None], run[None, :], p)
            run += tl.sum(tl.where(sel[:, None], t, 0.0), axis=0)
        tl.store(P + ptr, p, mask=tm)


@triton.jit
def states_fixup_kernel(LOC, P, chunk_super, H, DXY, BLOCK: tl.constexpr):
    """grid (chunks, H, element blocks): LOC[c] += P[super(c)], making LOC the full state before chunk c."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = offs < DXY
    s = tl.load(chunk_super + c)
    ptr = LOC + (c.to(tl.int64) * H + h) * DXY + offs
    x = tl.load(ptr, mask=m, other=0.0) + tl.load(P + (s.to(tl.int64) * H + h) * DXY + offs, mask=m, other=0.0)
    tl.store(ptr, x, mask=m)


@triton.jit
def chunk_out_kernel(
    Q, K, V, S, O, QE, KE, VE, SE, OE, SEL, SELE, KEEP, chunk_start, chunk_end,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, ss_c, ss_h, ss_x, ss_y,
    sqe_t, sqe_h, ske_t, ske_h, sve_t, sve_h, soe_t, soe_h, ssel_t, ssel_h, skeep_t,
    G, DX, DY, NRT, eps,
    C: tl.constexpr, BM: tl.constexpr, BX: tl.constexpr, NX: tl.constexpr, BY: tl.constexpr,
    XEXT: tl.constexpr, YEXT: tl.constexpr, RES: tl.constexpr,
    SPLIT: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """grid (chunks * NRT, H). Rows are (token, head g) pairs of one chunk, BM at a time; query head of row
    r is ``h * G + r % G``. ``O[t, hq] = Q[t, hq] S[c] + sum_{j in chunk, j <= t} (Q[t,hq].K[j]) V[j]``,
    contracting over DX in NX tiles of BX, for DY <= BY output columns (a wider output is launched in column
    slices).

    One extra column, in float32 and never rounded to bf16 (the normalizer ``[v, 1]`` of SPLA's residual),
    with the state's extra part ``SE[c, h, :]`` (indexed by the state's non-value dim, stride 1):
    - YEXT (output side, 1: ``VE [T, H]`` loaded, 2: all ones): ``OE[t, hq] = Q . SE + sum_j A[t, j] VE[j]``;
    - XEXT (contraction side, 1: ``KE`` loaded, 2: ones): ``A += QE KE^T`` and ``O += QE SE^T`` (the dq pass).

    RES (SPLA's residual by subtraction, the output minus the selected part ``SEL`` (+ ``SELE``), zero where
    ``KEEP [T, H]`` (uint8, has an unselected key) is 0): 1 ``O = keep (out - SEL)``, ``OE = keep (oe - SELE)``;
    2 ``den = keep (oe - SELE)`` stored in OE and ``O = keep (out - SEL) / (max(den, 0) + eps)``. The
    accumulators start at ``-SEL``, so the global term is never stored."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    c = pid // NRT
    rt = pid % NRT
    cs = tl.load(chunk_start + c)
    ce = tl.load(chunk_end + c)
    nrows = (ce - cs) * G
    if rt * BM < nrows:
        rows = rt * BM + tl.arange(0, BM)
        row_ok = rows < nrows
        tq = cs + rows // G
        hq = h * G + rows % G
        q_off = tq.to(tl.int64) * sq_t + hq * sq_h
        keys = cs + tl.arange(0, C)
        key_ok = keys < ce
        k_off = keys.to(tl.int64) * sk_t + h * sk_h
        s_base = c.to(tl.int64) * ss_c + h * ss_h
        ys = tl.arange(0, BY)
        ym = ys < DY
        A = tl.zeros([BM, C], dtype=tl.float32)
        acc = tl.zeros([BM, BY], dtype=tl.float32)
        oe = tl.zeros([BM], dtype=tl.float32)
        for xt in tl.static_range(NX):
            xs = xt * BX + tl.arange(0, BX)
            xm = xs < DX
            x = op(tl.load(Q + q_off[:, None] + xs[None, :], mask=row_ok[:, None] & xm[None, :], other=0.0), LOWP)
            k = op(tl.load(K + k_off[:, None] + xs[None, :], mask=key_ok[:, None] & xm[None, :], other=0.0), LOWP)
            A = dot(x, tl.trans(k), A, LOWP, INTERP)
            st = tl.load(S + s_base + xs[:, None] * ss_x + ys[None, :] * ss_y, mask=xm[:, None] & ym[None, :],
                         other=0.0)
            acc = dot_rhs32(x, st, acc, SPLIT, LOWP, INTERP)
        if XEXT != 0:
            xe = tl.load(QE + tq.to(tl.int64) * sqe_t + hq * sqe_h, mask=row_ok, other=0.0).to(tl.float32)
            if XEXT == 1:
                ke = tl.load(KE + keys.to(tl.int64) * ske_t + h * ske_h, mask=key_ok, other=0.0).to(tl.float32)
            else:
                ke = tl.where(key_ok, 1.0, 0.0)
            A += xe[:, None] * ke[None, :]
            se = tl.load(SE + s_base + ys, mask=ym, other=0.0)
            acc += xe[:, None] * se[None, :]
        A = tl.where((tq[:, None] >= keys[None, :]) & key_ok[None, :], A, 0.0)
        if YEXT == 1:
            ve = tl.load(VE + keys.to(tl.int64) * sve_t + h * sve_h, mask=key_ok, other=0.0).to(tl.float32)
            oe += tl.sum(A * ve[None, :], axis=1)
        elif YEXT == 2:
            oe += tl.sum(A, axis=1)
        v_off = keys.to(tl.int64) * sv_t + h * sv_h
        v = op(tl.load(V + v_off[:, None] + ys[None, :], mask=key_ok[:, None] & ym[None, :], other=0.0), LOWP)
        acc = dot_lhs32(A, v, acc, SPLIT, LOWP, INTERP)
        if YEXT != 0:
            # q . z, in float32 from the (cached) q tiles once the products are done: shorter live ranges.
            for xt in tl.static_range(NX):
                xs = xt * BX + tl.arange(0, BX)
                xm = xs < DX
                x = tl.load(Q + q_off[:, None] + xs[None, :], mask=row_ok[:, None] & xm[None, :], other=0.0)
                se = tl.load(SE + s_base + xs, mask=xm, other=0.0)
                oe += tl.sum(op(x, LOWP).to(tl.float32) * se[None, :], axis=1)
        if RES != 0:
            sel_off = tq.to(tl.int64) * ssel_t + hq * ssel_h
            acc -= tl.load(SEL + sel_off[:, None] + ys[None, :], mask=row_ok[:, None] & ym[None, :], other=0.0)
            if YEXT != 0:
                oe -= tl.load(SELE + sel_off, mask=row_ok, other=0.0)
            keep = tl.load(KEEP + tq.to(tl.int64) * skeep_t + h, mask=row_ok, other=0).to(tl.float32)
            oe = oe * keep
            scale = keep
            if RES == 2:
                scale = keep / (tl.maximum(oe, 0.0) + eps)
            acc = acc * scale[:, None]
        o_off = tq.to(tl.int64) * so_t + hq * so_h
        tl.store(O + o_off[:, None] + ys[None, :], acc, mask=row_ok[:, None] & ym[None, :])
        if YEXT != 0:
            tl.store(OE + tq.to(tl.int64) * soe_t + hq * soe_h, oe, mask=row_ok)


@triton.jit
def chunk_dkdv_kernel(
    Q, K, V, DO, R, DK, DV, VE, DOE, RE, DVE, chunk_start, chunk_end,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sd_t, sd_h, sdk_t, sdk_h, sdv_t, sdv_h, sr_c, sr_h, sr_f,
    sve_t, sve_h, sde_t, sde_h, sdve_t, sdve_h,
    G, F, DVN,
    C: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, VEXT: tl.constexpr,
    SPLIT: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """grid (chunks, H). With R[c] = sum over later chunks of sum_g q_g^T do_g ([F, DVN] float32, value stride 1):
    ``dk_j = R v_j + sum_{i >= j in chunk, g} (do_ig . v_j) q_ig``, ``dv_j = R^T k_j + sum (q_ig . k_j) do_ig``.
    DVN <= BV value columns (wider values are launched in column slices, their dk parts summed by the caller).

    VEXT: one more value column in float32 (1: ``VE [T, H]`` loaded and its gradient written to ``DVE``;
    2: all ones, no gradient), with its upstream gradient ``DOE [T, Hq]`` and the extra part ``RE[c, h, :F]``
    of the reverse state (same chunk / head strides as R)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    cs = tl.load(chunk_start + c)
    ce = tl.load(chunk_end + c)
    keys = cs + tl.arange(0, C)
    key_ok = keys < ce
    fs = tl.arange(0, BF)
    fm = fs < F
    ys = tl.arange(0, BV)
    ym = ys < DVN
    kt = keys.to(tl.int64)
    k = op(tl.load(K + kt[:, None] * sk_t + h * sk_h + fs[None, :], mask=key_ok[:, None] & fm[None, :], other=0.0),
           LOWP)
    v = op(tl.load(V + kt[:, None] * sv_t + h * sv_h + ys[None, :], mask=key_ok[:, None] & ym[None, :], other=0.0),
           LOWP)
    r_base = c.to(tl.int64) * sr_c + h * sr_h
    r = tl.load(R + r_base + fs[:, None] * sr_f + ys[None, :], mask=fm[:, None] & ym[None, :], other=0.0)
    dv = dot_rhs32(k, r, tl.zeros([C, BV], dtype=tl.float32), SPLIT, LOWP, INTERP)
    dk = dot_rhs32(v, tl.trans(r), tl.zeros([C, BF], dtype=tl.float32), SPLIT, LOWP, INTERP)
    dve = tl.zeros([C], dtype=tl.float32)
    if VEXT != 0:
        re = tl.load(RE + r_base + fs, mask=fm, other=0.0)
        if VEXT == 1:
            ve = tl.load(VE + kt * sve_t + h * sve_h, mask=key_ok, other=0.0).to(tl.float32)
            dve = tl.sum(k.to(tl.float32) * re[None, :], axis=1)
        else:
            ve = tl.where(key_ok, 1.0, 0.0)
        dk += ve[:, None] * re[None, :]
    nrows = (ce - cs) * G
    for r0 in range(0, nrows, BM):
        rows = r0 + tl.arange(0, BM)
        ok = rows < nrows
        tq = cs + rows // G
        hq = h * G + rows % G
        q = op(tl.load(Q + (tq.to(tl.int64) * sq_t + hq * sq_h)[:, None] + fs[None, :],
                       mask=ok[:, None] & fm[None, :], other=0.0), LOWP)
        d = op(tl.load(DO + (tq.to(tl.int64) * sd_t + hq * sd_h)[:, None] + ys[None, :],
                       mask=ok[:, None] & ym[None, :], other=0.0), LOWP)
        causal = (keys[:, None] <= tq[None, :]) & ok[None, :] & key_ok[:, None]  # [C, BM]
        a = tl.where(causal, dot(k, tl.trans(q), tl.zeros([C, BM], dtype=tl.float32), LOWP, INTERP), 0.0)
        dv = dot_lhs32(a, d, dv, SPLIT, LOWP, INTERP)
        b = dot(v, tl.trans(d), tl.zeros([C, BM], dtype=tl.float32), LOWP, INTERP)
        if VEXT != 0:
            de = tl.load(DOE + tq.to(tl.int64) * sde_t + hq * sde_h, mask=ok, other=0.0).to(tl.float32)
            b += ve[:, None] * de[None, :]
            if VEXT == 1:
                dve += tl.sum(a * de[None, :], axis=1)
        b = tl.where(causal, b, 0.0)
        dk = dot_lhs32(b, q, dk, SPLIT, LOWP, INTERP)
    tl.store(DK + kt[:, None] * sdk_t + h * sdk_h + fs[None, :], dk, mask=key_ok[:, None] & fm[None, :])
    tl.store(DV + kt[:, None] * sdv_t + h * sdv_h + ys[None, :], dv, mask=key_ok[:, None] & ym[None, :])
    if VEXT == 1:
        tl.store(DVE + kt * sdve_t + h * sdve_h, dve, mask=key_ok)

