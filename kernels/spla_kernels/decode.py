"""Triton decode kernels of SPLA: one query token per row against a KV cache (entry points).

* :func:`decode_select_blocks` (``spla_lit.ops.decode_select`` for one token): score every complete block of a
  row from the cached block statistics and keep the top-k, forced local / sink blocks included. The blocks are
  split over programs (``(B * Hkv, splits)``); each scores tiles of blocks for the G query heads at once
  (products on tensor cores, exact: :func:`_stat_dot`) and keeps a running top-k (packed int64 keys, as in
  ``_select_kernels``); a small kernel merges the splits' lists.
* :func:`decode_append` (``LayerCache.append`` for one token per row): the new K/V, the block statistics and the
  linear state updated in one kernel.
* :func:`decode_sparse_with_selected_linear` (``spla_lit.ops.decode_sparse_attention`` for one token): exact
  attention over the selected blocks and the selected-linear term ``sum (phi(q) . phi(k_j)) [v_j, 1]`` from the
  same K/V tiles, flash-decoding style: the G query heads of a KV head in one program (rows of a tensor-core
  tile), the selected blocks split over programs, each writing a partial softmax state; a combine kernel merges
  them (one program per query head), and can finish SPLA's residual there (``phi(q)^T S - selected``, its
  emptiness and normaliser). ``phi(k)`` is computed in the kernel from the key tile (elu1, relu, softmax,
  identity), so no feature cache is needed. Masked loads: the keys and values of unselected blocks are never
  read.

Same signatures and results as the references in ``spla_lit.ops.decode``; other cases (T > 1, the taylor feature
map, full covariance, D > 256) raise ``NotImplementedError`` so that the reference runs instead. No host sync and
no allocation that depends on the data: the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from spla_lit.ops.utils import cdiv, next_pow2
from spla_lit.options import Selection

from ._select_kernels import _sortable
from ._utils import interpreting
from .config import DecodeConfig

__all__ = ["CONFIG", "DecodeConfig", "decode_append", "decode_select_blocks", "decode_sparse_with_selected_linear"]

_LOG2E = 1.4426950408889634
_FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2, "softmax": 3}
_REDUCE = {"lse": 0, "max": 1, "mean": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


CONFIG = DecodeConfig()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(work: int, rows: int, device: torch.device) -> tuple[int, int]:
    """``(splits, items per split)`` of ``work`` items for ``rows`` (batch x KV head) rows of programs."""
    want = max(1, min(work, -(-CONFIG.programs_per_sm * _num_sms(device) // max(rows, 1))))
    per = cdiv(work, want)
    return cdiv(work, per), per


# ----------------------------------------------------------------------------------------------- selection

_MAXB = 2147483647
_SENT = -9223372036854775808


@triton.jit
def _stat_dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b^T`` (a [GP, BD], b [BN, BD]) in float32 with exact products. PREC 0: float32 FMAs (float32
    statistics); 1: bfloat16 tensor cores (a and b hold bfloat16 values); 2: tf32x3 tensor cores (a holds at
    most 22 significant bits, b float16 / bfloat16 values: both exact in the split). UPCAST (the interpreter,
    whose bfloat16 dot is wrong): PREC 1's bfloat16 operands as float32."""
    if PREC == 1 and UPCAST:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), tl.trans(b.to(tl.bfloat16).to(tl.float32)),
                      input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)))
    elif PREC == 2:
        return tl.dot(a, tl.trans(b.to(tl.float32)), input_precision="tf32x3")
    else:
        return tl.dot(a, tl.trans(b.to(tl.float32)), input_precision="ieee")


@triton.jit
def _score_kernel(
    Q, MEAN, SEC, LAM, POS, KEYS,
    s_qb, s_qh, s_mb, s_mh, s_mn, s_sb, s_sh, s_sn, s_sd, s_lb, s_lh, s_ln,
    HKV, G, D, NK, block_size, local_blocks, sink_blocks, per_split, n_split, scale, half_scale2, log_bs,
    GP: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, ORDER: tl.constexpr,
    RANK: tl.constexpr, REDUCE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """grid (B * Hkv, splits): the top-KP packed keys of this split's visible blocks -> KEYS [B*Hkv, splits, KP].
    ORDER 1 taylor1, 2 taylor2 diag, 3 taylor2 lowrank (SEC = eigenvectors [.., D, RANK], LAM = eigenvalues).

    Each step scores a tile of BN blocks for the G heads at once: [GP, D] x [D, BN] products on tensor cores
    (PREC, :func:`_stat_dot`: the products are exact, as in float32), the head reduction over the tile's
    columns, then the tile's top-KP (a sort network) merged into the running list, skipped when no key of the
    tile enters it (most tiles once the list is full)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    MAXB: tl.constexpr = 2147483647
    SENT: tl.constexpr = -9223372036854775808
    p = tl.load(POS + b).to(tl.int32)  # int32 like the split bounds: one type for the loop's range
    diag = p // block_size
    lo = tl.maximum(diag - local_blocks + 1, 0)
    g = tl.arange(0, GP)
    ds = tl.arange(0, BD)
    dm = ds < D
    q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + ds[None, :], mask=(g < G)[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    if ORDER == 2:
        q2 = q * q  # exact in float32 for half-precision q
        if PREC == 1:  # q^2 of a bfloat16 q has <= 16 significant bits: hi + lo in bfloat16, exactly
            q2_hi = q2.to(tl.bfloat16).to(tl.float32)
            q2_lo = q2 - q2_hi
    best = tl.full([1, KP], SENT, dtype=tl.int64)
    first = sp * per_split
    stop = tl.minimum(tl.minimum(first + per_split, diag + 1), NK)
    for n0 in range(first, stop, BN):
        blk = n0 + tl.arange(0, BN)
        ok = blk < stop
        msk = ok[:, None] & dm[None, :]
        mean = tl.load(MEAN + b * s_mb + h * s_mh + blk[:, None] * s_mn + ds[None, :], mask=msk, other=0.0)
        if ORDER == 2:  # both tiles' loads in flight before the first product
            var = tl.load(SEC + b * s_sb + h * s_sh + blk[:, None] * s_sn + ds[None, :], mask=msk, other=0.0)
        s = _stat_dot(q, mean, PREC, UPCAST) * scale
        if ORDER == 2:
            if PREC == 1:
                s += (_stat_dot(q2_hi, var, PREC, UPCAST) + _stat_dot(q2_lo, var, PREC, UPCAST)) * half_scale2
            else:
                s += _stat_dot(q2, var, PREC, UPCAST) * half_scale2
        if ORDER == 3:
            for r in tl.static_range(RANK):
                u = tl.load(SEC + b * s_sb + h * s_sh + blk[:, None] * s_sn + ds[None, :] * s_sd + r, mask=msk,
                            other=0.0)
                lam = tl.load(LAM + b * s_lb + h * s_lh + blk * s_ln + r, mask=ok, other=0.0).to(tl.float32)
                pr = _stat_dot(q, u, PREC, UPCAST)
                s += pr * pr * lam[None, :] * half_scale2
        s += log_bs
        gok = (g < G)[:, None]
        if REDUCE == 0:
            m = tl.max(tl.where(gok, s, float("-inf")), axis=0)
            red = m + tl.log(tl.sum(tl.where(gok, tl.exp(s - m[None, :]), 0.0), axis=0))
        elif REDUCE == 1:
            red = tl.max(tl.where(gok, s, float("-inf")), axis=0)
        else:
            red = tl.sum(tl.where(gok, s, 0.0), axis=0) / G
        red = tl.where((blk >= lo) | (blk < sink_blocks), float("inf"), red)
        red = tl.where(red != red, float("-inf"), red)  # NaN is never picked, like the reference
        key = (_sortable(red).to(tl.int64) << 32) + (MAXB - blk).to(tl.int64)
        key = tl.where(ok & (red != float("-inf")), key, SENT)
        # The sort network only when a key of the tile beats the list's last (keys are distinct: exact skip).
        if tl.max(key, 0) > tl.min(best):
            cand = tl.topk(tl.reshape(key, [1, BN]), KP, dim=1)  # descending
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(cand, 1)), dim=1, descending=True)
    tl.store(KEYS + (bh * n_split + sp).to(tl.int64) * KP + tl.arange(0, KP)[None, :], best)


@triton.jit
def _merge_kernel(KEYS, OUT, n_split, topk, NSP: tl.constexpr, KP: tl.constexpr):
    """grid (B * Hkv,): the top-k of the splits' lists -> OUT [B*Hkv, topk] ascending block indices, -1 padded."""
    bh = tl.program_id(0)
    MAXB: tl.constexpr = 2147483647
    SENT: tl.constexpr = -9223372036854775808
    s = tl.arange(0, NSP)
    r = tl.arange(0, KP)
    keys = tl.load(KEYS + (bh * n_split + s[:, None]).to(tl.int64) * KP + r[None, :], mask=(s < n_split)[:, None],
                   other=SENT)
    best = tl.topk(tl.reshape(keys, [1, NSP * KP]), KP, dim=1)
    rank = r[None, :]
    keep = (best != SENT) & (rank < topk)
    idx = tl.where(keep, MAXB - (best & 0xFFFFFFFF).to(tl.int32), MAXB)
    idx = tl.sort(idx, dim=1)
    idx = tl.where(idx == MAXB, -1, idx)
    tl.store(OUT + bh * topk + rank, idx, mask=rank < topk)


def decode_select_blocks(q: torch.Tensor, mean: torch.Tensor, second, positions: torch.Tensor,
                         selection: Selection) -> torch.Tensor:
    """``spla_lit.ops.decode_select`` for one new token per row: int32 [B, Hkv, 1, topk].

    q [B, 1, Hq, D]; mean [B, Hkv, nK, D]; second: variance [B, Hkv, nK, D] (diag), ``(U [B, Hkv, nK, D, r], lam
    [B, Hkv, nK, r])`` (lowrank) or None (taylor1); positions int [B, 1]. Declines (NotImplementedError) window
    mode, the random / oracle scorers, the full covariance, several tokens, D > 256 or G > 64.
    """
    sel = selection
    if sel.mode != "topk" or sel.scorer not in ("taylor1", "taylor2"):
        raise NotImplementedError(f"decode_select_blocks scores with taylor1 / taylor2 only (got {sel.scorer})")
    order = 1 if sel.scorer == "taylor1" else {"diag": 2, "lowrank": 3}.get(sel.covariance, 0)
    if order == 0:
        raise NotImplementedError("decode_select_blocks has no full-covariance scorer")
    B, T, Hq, D = q.shape
    Hkv, nK = mean.shape[1], mean.shape[2]
    G = Hq // Hkv
    if T != 1:
        raise NotImplementedError("decode_select_blocks takes one token per row")
    if D > 256 or G > 64 or sel.topk > 1024:
        raise NotImplementedError(f"head dim {D}, group {G} or topk {sel.topk} too large for the decode kernel")
    if order == 2:
        sec, lam, rank = second, mean, 1
        s_sec = (*second.stride()[:3], 0)
    elif order == 3:
        sec, lam = second
        rank = sec.shape[-1]
        s_sec = (*sec.stride()[:3], sec.stride(3))
        if sec.stride(4) != 1:
            sec = sec.contiguous()
            s_sec = (*sec.stride()[:3], sec.stride(3))
    else:
        sec, lam, rank, s_sec = mean, mean, 1, (0, 0, 0, 0)
    if mean.stride(-1) != 1 or (order == 2 and sec.stride(-1) != 1):
        raise NotImplementedError("block statistics must be contiguous along D")
    scale = D**-0.5 if sel.scale is None else float(sel.scale)
    KP = next_pow2(sel.topk)
    BN = max(CONFIG.score_blocks, KP, 16)
    n_split, per = _splits(cdiv(nK, BN), B * Hkv, q.device)
    per *= BN
    n_split = cdiv(nK, per)
    qf = q.reshape(B, Hq, D)
    halves = (torch.bfloat16, torch.float16)
    stats = [mean] + ([sec] if order > 1 else [])
    if all(t.dtype == torch.bfloat16 for t in (q, *stats)):
        prec = 1  # bfloat16 tensor cores: exact products (q^2 split in two bfloat16 parts)
    elif q.dtype in halves and all(t.dtype in halves for t in stats):
        prec = 2  # tf32x3: half-precision values and their squares are exact in the split
    else:
        prec = 0  # float32 statistics: float32 FMAs
    keys = torch.empty(B * Hkv, n_split, KP, dtype=torch.int64, device=q.device)
    _score_kernel[(B * Hkv, n_split)](
        qf, mean, sec, lam, positions.reshape(B), keys,
        qf.stride(0), qf.stride(1), *mean.stride()[:3], *s_sec, *(lam.stride()[:3] if order == 3 else (0, 0, 0)),
        Hkv, G, D, nK, sel.block_size, sel.local_blocks, sel.sink_blocks, per, n_split, scale, 0.5 * scale * scale,
        math.log(sel.block_size),
        GP=max(16, next_pow2(G)), BD=max(16, next_pow2(D)), BN=BN, KP=KP, ORDER=order, RANK=rank,
        REDUCE=_REDUCE[sel.head_reduce], PREC=prec, UPCAST=interpreting(), num_warps=CONFIG.score_warps,
    )
    out = torch.empty(B, Hkv, 1, sel.topk, dtype=torch.int32, device=q.device)
    _merge_kernel[(B * Hkv,)](keys, out, n_split, sel.topk, NSP=next_pow2(n_split), KP=KP)
    return out


# ----------------------------------------------------------------------------------------------- attention


@triton.jit
def _phi(x, valid, FMAP: tl.constexpr):
    """The feature map of a float32 tile [rows, BF] (``valid`` masks its real entries), zero outside."""
    if FMAP == 1:
        y = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FMAP == 2:
        y = tl.maximum(x, 0.0)
    elif FMAP == 3:
        z = tl.where(valid, x, float("-inf"))
        mx = tl.max(z, axis=1)
        e = tl.exp(z - tl.where(mx == float("-inf"), 0.0, mx)[:, None])  # masked rows: exp(-inf) = 0
        y = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    else:
        y = x
    return tl.where(valid, y, 0.0)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32: full float32 products for float32 inputs (not tf32), else tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_kernel(
    Q, K, V, PQ, IDX, POS, P_M, P_L, P_O, P_S, P_N, P_C,
    M_len, HKV, G, n_sel, per_split, n_split, qk_scale, s_ib, s_ih,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr,
    BS: tl.constexpr, BSP: tl.constexpr, SELECTED: tl.constexpr, FMAP: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """grid (B * Hkv, splits): the partial softmax state (m, l, acc), the selected-linear sums and the count of
    attended keys of the G heads over this split's selected blocks."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    p = tl.load(POS + b)
    g = tl.arange(0, GP)
    gok = g < G
    ds = tl.arange(0, BD)
    dvs = tl.arange(0, BDV)
    q_row = (b * HKV * G + h * G + g).to(tl.int64)
    q = tl.load(Q + q_row[:, None] * D + ds[None, :], mask=gok[:, None] & (ds < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if SELECTED:
        pq = tl.load(PQ + q_row[:, None] * D + ds[None, :], mask=gok[:, None] & (ds < D)[None, :], other=0.0)
        if UPCAST:
            pq = pq.to(tl.float32)
        sacc = tl.zeros([GP, BDV], tl.float32)
        nacc = tl.zeros([GP], tl.float32)
    m = tl.full([GP], float("-inf"), tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    cnt = tl.zeros([BSP], tl.int32)
    kr = tl.arange(0, BSP)
    first = sp * per_split
    for i in range(first, tl.minimum(first + per_split, n_sel)):
        blk = tl.load(IDX + b * s_ib + h * s_ih + i)
        kpos = blk * BS + kr
        valid = (kr < BS) & (blk >= 0) & (kpos <= p) & (kpos < M_len)
        rows = ((b * M_len + kpos).to(tl.int64) * HKV + h)
        kt = tl.load(K + rows[:, None] * D + ds[None, :], mask=valid[:, None] & (ds < D)[None, :], other=0.0)
        vt = tl.load(V + rows[:, None] * DV + dvs[None, :], mask=valid[:, None] & (dvs < DV)[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.where(valid[None, :], _mm(q, tl.trans(kt), IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        pr = tl.exp2(s - m_use[:, None])
        lsum = lsum * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + _mm(pr.to(vt.dtype), vt, IEEE)
        m = m_new
        if SELECTED:
            pk = _phi(kt.to(tl.float32), valid[:, None] & (ds < D)[None, :], FMAP)
            a = tl.where(valid[None, :], _mm(pq, tl.trans(pk.to(pq.dtype)), IEEE), 0.0)
            sacc += _mm(a.to(vt.dtype), vt, IEEE)
            nacc += tl.sum(a, 1)
        cnt += valid.to(tl.int32)
    part = (bh * n_split + sp).to(tl.int64)
    tl.store(P_M + part * GP + g, m)
    tl.store(P_L + part * GP + g, lsum)
    tl.store(P_O + (part * GP + g)[:, None] * BDV + dvs[None, :], acc)
    if SELECTED:
        tl.store(P_S + (part * GP + g)[:, None] * BDV + dvs[None, :], sacc)
        tl.store(P_N + part * GP + g, nacc)
    tl.store(P_C + part, tl.sum(cnt, 0))


@triton.jit
def _combine_kernel(
    P_M, P_L, P_O, P_S, P_N, P_C, O, LSE, SEL, CNT, PQ, STATE, POS, HKV, G, n_split, F, eps,
    DV: tl.constexpr, DVS: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr, NSP: tl.constexpr,
    SC: tl.constexpr, BF: tl.constexpr, SELECTED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    FINISH: tl.constexpr,
):
    """grid (B * Hkv, G): merge the splits of one query head -> o [B, 1, Hq, DV], lse [B, Hq, 1], sel [B, 1, Hq,
    DVS], counts. The splits' partial states are read SC at a time (one round trip for up to SC splits: a
    serial loop over the splits waited on every load).

    RESIDUAL: SEL gets the finished residual instead, ``phi(q)^T S - sel`` (STATE [B, Hkv, F, DV + 1] float32,
    PQ [B, 1, Hq, F]) zeroed when the row has no unselected key (count >= position + 1), and with FINISH
    divided by its normalizer column (clamped at 0, + eps): ``_finish_residual`` of the reference."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    LN2: tl.constexpr = 0.6931471805599453
    dvs = tl.arange(0, BDV)
    base = (bh * n_split).to(tl.int64)
    s = tl.arange(0, NSP)
    mx = tl.max(tl.load(P_M + (base + s) * GP + g, mask=s < n_split, other=float("-inf")), 0)
    m_use = tl.where(mx == float("-inf"), 0.0, mx)
    lsum = tl.zeros([SC], tl.float32)
    acc = tl.zeros([SC, BDV], tl.float32)
    sacc = tl.zeros([SC, BDV], tl.float32)
    nacc = tl.zeros([SC], tl.float32)
    cnt = tl.zeros([SC], tl.int32)
    for c0 in range(0, n_split, SC):
        c = c0 + tl.arange(0, SC)
        cm = c < n_split
        slot = (base + c) * GP + g
        w = tl.exp2(tl.load(P_M + slot, mask=cm, other=float("-inf")) - m_use)  # empty split: m = -inf, w = 0
        lsum += tl.load(P_L + slot, mask=cm, other=0.0) * w
        acc += tl.load(P_O + slot[:, None] * BDV + dvs[None, :], mask=cm[:, None], other=0.0) * w[:, None]
        if SELECTED:
            sacc += tl.load(P_S + slot[:, None] * BDV + dvs[None, :], mask=cm[:, None], other=0.0)
            nacc += tl.load(P_N + slot, mask=cm, other=0.0)
        cnt += tl.load(P_C + base + c, mask=cm, other=0)
    lsum_t = tl.sum(lsum, 0)
    has = lsum_t > 0
    row = (bh * G + g).to(tl.int64)  # [B, 1, Hq, .] rows: b * Hq + h * G + g
    dm = dvs < DV
    tl.store(O + row * DV + dvs, (tl.sum(acc, 0) / tl.where(has, lsum_t, 1.0)).to(O.dtype.element_ty), mask=dm)
    tl.store(LSE + row, tl.where(has, (m_use + tl.log2(tl.where(has, lsum_t, 1.0))) * LN2, float("-inf")))
    if RESIDUAL:
        b = bh // HKV
        keep = tl.sum(cnt, 0).to(tl.int64) < tl.load(POS + b).to(tl.int64) + 1  # an unselected key exists
        num = tl.zeros([BDV], tl.float32)
        den = 0.0
        for f0 in range(0, F, BF):  # phi(q)^T S: the state's rows BF at a time
            f = f0 + tl.arange(0, BF)
            fm = f < F
            pq = tl.load(PQ + row * F + f, mask=fm, other=0.0).to(tl.float32)
            srow = STATE + (bh * F + f).to(tl.int64) * (DV + 1)
            num += tl.sum(pq[:, None] * tl.load(srow[:, None] + dvs[None, :], mask=fm[:, None] & dm[None, :],
                                                other=0.0), 0)
            if NORM:
                den += tl.sum(pq * tl.load(srow + DV, mask=fm, other=0.0), 0)
        num = tl.where(keep, num - tl.sum(sacc, 0), 0.0)
        den = tl.where(keep, den - tl.sum(nacc, 0), 0.0)
        if FINISH:
            tl.store(SEL + row * DVS + dvs, num / (tl.maximum(den, 0.0) + eps), mask=dm)
        else:
            tl.store(SEL + row * DVS + dvs, num, mask=dm)
            if NORM:
                tl.store(SEL + row * DVS + DV, den)
    elif SELECTED:
        tl.store(SEL + row * DVS + dvs, tl.sum(sacc, 0), mask=dm)
        if NORM:
            tl.store(SEL + row * DVS + DV, tl.sum(nacc, 0))
    if g == 0:
        tl.store(CNT + bh, tl.sum(cnt, 0).to(tl.int64))


def decode_sparse_with_selected_linear(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_idx: torch.Tensor, positions: torch.Tensor,
    *, block_size: int, scale: float, phi_q: torch.Tensor | None = None, feature_map: str = "elu1",
    with_normalizer: bool = False, state: torch.Tensor | None = None, normalize: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``spla_lit.ops.decode_sparse_attention`` for one new token per row (flash-decoding over the selected
    blocks): ``(o [B, 1, Hq, Dv], lse float32 [B, Hq, 1], selected-linear float32 [B, 1, Hq, Dv (+1)] or None,
    counts int64 [B, Hkv, 1])``. Declines (NotImplementedError) several tokens, the taylor feature map, feature
    dims other than D, head dims > 256 and dtypes other than float32 / bfloat16 / float16.

    With ``state`` (float32 [B, Hkv, F, Dv + 1], ``rla="subtract"``'s linear state; needs ``phi_q``) the third
    output is the finished residual of ``spla_decode`` instead, in the same kernel that merges the splits:
    ``phi(q)^T S[..., :Dv (+1)] - selected-linear``, zero for a row without unselected keys, and with
    ``normalize`` (needs ``with_normalizer``) divided by its normalizer column: float32 [B, 1, Hq, Dv] (normalize)
    or [B, 1, Hq, Dv (+1)].
    """
    B, T, Hq, D = q.shape
    M, Hkv, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    G = Hq // Hkv
    if T != 1:
        raise NotImplementedError("decode_sparse_with_selected_linear takes one token per row")
    if q.dtype not in _DTYPES or not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise NotImplementedError(f"dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: one of float32, bfloat16, "
                                  "float16 for q and the cache")
    if max(D, DV) > 256 or G > 64:
        raise NotImplementedError(f"head dims {D}/{DV} or group {G} too large for the decode kernel")
    selected = phi_q is not None
    if selected and (feature_map not in _FEATURE_MAPS or phi_q.shape[-1] != D):
        raise NotImplementedError(f"feature map {feature_map!r} (F = {phi_q.shape[-1]}) is not computed in the kernel")
    residual = state is not None
    if residual and (not selected or tuple(state.shape) != (B, Hkv, D, DV + 1) or state.dtype != torch.float32
                     or (normalize and not with_normalizer)):
        raise NotImplementedError(f"the fused residual takes phi_q and a float32 state [B, Hkv, F, Dv + 1] = "
                                  f"[{B}, {Hkv}, {D}, {DV + 1}]; normalize needs with_normalizer")
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    pq = phi_q.to(q.dtype).contiguous() if selected else q
    n_sel = block_idx.shape[-1]
    n_split, per = _splits(n_sel, B * Hkv, q.device)
    GP, BDV = max(16, next_pow2(G)), max(16, next_pow2(DV))
    dev, f32 = q.device, torch.float32
    parts = B * Hkv * n_split
    p_m, p_l = torch.empty(parts, GP, dtype=f32, device=dev), torch.empty(parts, GP, dtype=f32, device=dev)
    p_o = torch.empty(parts, GP, BDV, dtype=f32, device=dev)
    p_s = torch.empty(parts, GP, BDV, dtype=f32, device=dev) if selected else p_o
    p_n = torch.empty(parts, GP, dtype=f32, device=dev) if selected else p_m
    p_c = torch.empty(parts, dtype=torch.int32, device=dev)
    pos = positions.reshape(B)
    upcast = interpreting() and q.dtype != torch.float32
    _attn_kernel[(B * Hkv, n_split)](
        q, k_cache, v_cache, pq, block_idx, pos, p_m, p_l, p_o, p_s, p_n, p_c,
        M, Hkv, G, n_sel, per, n_split, float(scale) * _LOG2E, block_idx.stride(0), block_idx.stride(1),
        D=D, DV=DV, BD=max(16, next_pow2(D)), BDV=BDV, GP=GP, BS=block_size, BSP=max(16, next_pow2(block_size)),
        SELECTED=selected, FMAP=_FEATURE_MAPS.get(feature_map, 0), UPCAST=upcast, IEEE=q.dtype == torch.float32,
        num_warps=CONFIG.attn_warps, num_stages=CONFIG.attn_stages,
    )
    DVS = DV + 1 if with_normalizer and not (residual and normalize) else DV
    o = torch.empty(B, 1, Hq, DV, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, 1, dtype=f32, device=dev)
    sel = torch.empty(B, 1, Hq, DVS, dtype=f32, device=dev) if selected else None
    counts = torch.empty(B, Hkv, 1, dtype=torch.int64, device=dev)
    _combine_kernel[(B * Hkv, G)](
        p_m, p_l, p_o, p_s, p_n, p_c, o, lse, sel if selected else o, counts,
        phi_q.contiguous() if residual else o, state.contiguous() if residual else o, pos, Hkv, G, n_split, D,
        float(eps), DV=DV, DVS=DVS, BDV=BDV, GP=GP, NSP=next_pow2(n_split),
        SC=min(next_pow2(n_split), CONFIG.combine_splits), BF=min(32, max(16, next_pow2(D))), SELECTED=selected,
        NORM=bool(with_normalizer), RESIDUAL=residual, FINISH=bool(normalize), num_warps=CONFIG.combine_warps,
    )
    return o, lse, sel, counts


# -------------------------------------------------------------------------------------------------- append


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, PK_NEW, POS, KC, VC, MEAN, VAR, RSUM, RSQ, STATE,
    M_len, HKV, s_mb, s_mh, s_mn,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BDV1: tl.constexpr, BFC: tl.constexpr,
    BS: tl.constexpr, KV: tl.constexpr, STATS: tl.constexpr, DIAG: tl.constexpr, STATE_ON: tl.constexpr,
):
    """grid (B * Hkv,): write the new token's K/V at its position; update its block's running sums and moments
    (reset when the block completes); add phi(k) [v, 1]^T to the state."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    p = tl.load(POS + b)
    ds = tl.arange(0, BD)
    dm = ds < D
    dv = tl.arange(0, BDV1)
    vm = dv < DV
    k = tl.load(K_NEW + bh * D + ds, mask=dm, other=0.0)
    v = tl.load(V_NEW + bh * DV + dv, mask=vm, other=0.0)
    if KV:
        row = (b * M_len + p).to(tl.int64) * HKV + h
        tl.store(KC + row * D + ds, k.to(KC.dtype.element_ty), mask=dm)
        tl.store(VC + row * DV + dv, v.to(VC.dtype.element_ty), mask=vm)
    if STATS:
        kf = k.to(tl.float32)
        s = tl.load(RSUM + bh * D + ds, mask=dm, other=0.0) + kf
        c = (p % BS + 1).to(tl.float32)
        mean = s / c
        slot = MEAN + b * s_mb + h * s_mh + (p // BS) * s_mn + ds
        tl.store(slot, mean.to(MEAN.dtype.element_ty), mask=dm)
        done = (p % BS) == BS - 1
        tl.store(RSUM + bh * D + ds, tl.where(done, 0.0, s), mask=dm)
        if DIAG:
            sq = tl.load(RSQ + bh * D + ds, mask=dm, other=0.0) + kf * kf
            var = tl.maximum(sq / c - mean * mean, 0.0)
            tl.store(VAR + b * s_mb + h * s_mh + (p // BS) * s_mn + ds, var.to(VAR.dtype.element_ty), mask=dm)
            tl.store(RSQ + bh * D + ds, tl.where(done, 0.0, sq), mask=dm)
    if STATE_ON:
        v1 = tl.where(vm, v.to(tl.float32), tl.where(dv == DV, 1.0, 0.0))
        cm = dv < DV + 1
        for f0 in range(0, F, BFC):
            f = f0 + tl.arange(0, BFC)
            fm = f < F
            pk = tl.load(PK_NEW + bh * F + f, mask=fm, other=0.0).to(tl.float32)
            ptr = STATE + (bh * F + f).to(tl.int64)[:, None] * (DV + 1) + dv[None, :]
            msk = fm[:, None] & cm[None, :]
            tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + pk[:, None] * v1[None, :], mask=msk)


def decode_append(k: torch.Tensor | None, v: torch.Tensor, phi_k: torch.Tensor | None, positions: torch.Tensor, *,
                  k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, block_size: int | None = None,
                  mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                  run_sum: torch.Tensor | None = None, run_sq: torch.Tensor | None = None,
                  state: torch.Tensor | None = None) -> bool:
    """``LayerCache.append`` of one token per row in one kernel (in place; returns True): K/V written at
    ``positions`` [B, 1], the block's running sums and moments (mean; diag variance), the state ``S += phi(k)
    [v, 1]^T``. Declines (NotImplementedError) several tokens, the full / low-rank covariance (no ``var`` with a
    second moment is the caller's test) and non-contiguous tensors."""
    B, T, H, Dv = v.shape
    if T != 1:
        raise NotImplementedError("decode_append takes one token per row")
    D = k.shape[-1] if k is not None else Dv
    tensors = [t for t in (k, v, phi_k, k_cache, v_cache, mean, var, run_sum, run_sq, state) if t is not None]
    if not all(t.is_contiguous() for t in tensors) or max(D, Dv) > 256:
        raise NotImplementedError("decode_append needs contiguous tensors and head dims <= 256")
    stats, kv, on = mean is not None, k_cache is not None, state is not None
    F = phi_k.shape[-1] if on else 16
    if on and F > 4096:
        raise NotImplementedError(f"feature dim {F} too large for decode_append")
    ph = v  # placeholder pointer for the parts switched off
    _append_kernel[(B * H,)](
        k if k is not None else ph, v, phi_k if on else ph, positions.reshape(B), k_cache if kv else ph,
        v_cache if kv else ph, mean if stats else ph, var if var is not None else ph,
        run_sum if stats else ph, run_sq if run_sq is not None else ph, state if on else ph,
        k_cache.shape[1] if kv else 0, H, *(mean.stride()[:3] if stats else (0, 0, 0)),
        D=D, DV=Dv, F=F, BD=max(16, next_pow2(D)), BDV1=max(16, next_pow2(Dv + 1)), BFC=min(32, next_pow2(F)),
        BS=block_size or 1, KV=kv, STATS=stats, DIAG=var is not None, STATE_ON=on,
    )
    return True
