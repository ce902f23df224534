"""Chunked causal linear attention in Triton, forward and backward (``spla_kernels.causal_linear_attention``).

``o_i = phi_q_i^T S_i`` with ``S_i = sum_{j <= i} phi_k_j v_j^T``: one float32 state per KV head, shared by its
G query heads. Chunks of ``C = 64`` tokens; inside a chunk the causal products run on the tensor cores,
between chunks the state is a two-level scan (a sequential pass inside each super-chunk of a few chunks,
then a scan over super-chunks), so no single program walks the whole sequence.

Precision: states and accumulators are float32. With bfloat16 inputs, products of a bf16 tile with a
float32 operand (the state, the intra-chunk scores) use a bf16 hi + lo split of the float32 side (~16
mantissa bits), because the residual linear attention subtracts large terms; ``LinearConfig.bwd_split =
False`` rounds them to bf16 once in the backward pass (faster, gradients ~1.2x less accurate). The float32 upstream
gradient is rounded to bf16 for the backward products. float32 / float16 inputs use float32 operands with
``tf32x3`` products.

A value dim of the form ``m + 1`` with ``m`` a power of two in [16, 128] (D + 1 with the normalizer column of
SPLA's residual) runs as one ``m``-wide tile plus one extra float32 column carried by every kernel: a state
vector ``sum k_j v_je`` beside the state, the intra-chunk score rows weighted by ``v_e`` (row sums for a
column of ones), and the matching terms of the backward; ``linear_forward`` / ``linear_backward`` also take
the column as implicit ones (SPLA's ``[v, 1]``; see ``residual.py``). Other value dims over 128 are processed
in column slices of 128.

Packed sequences (``cu_seqlens``, B == 1): chunks never straddle a sequence and the state restarts at
each sequence. A batch B > 1 is handled as B packed sequences of length N.

Tiles come from a ``LinearConfig`` (argument, or the per-device table of ``config.py``); the forward and
backward run inside ``torch.profiler.record_function`` ranges ``spla_kernels.linear: fwd`` / ``bwd``.
"""

from __future__ import annotations

import functools

import torch
from torch.profiler import record_function

from spla_lit.ops.utils import cdiv, next_pow2, sequence_segments

from ._linear_kernels import (
    chunk_dkdv_kernel,
    chunk_out_kernel,
    states_fixup_kernel,
    states_local_kernel,
    states_scan_kernel,
)
from ._utils import interpreting
from .config import LinearConfig, arch_of, linear_config

CHUNK = 64  # tokens per chunk (the kernels' C)
MAX_DIM = 256  # largest feature / value dim handled (F <= 128 expected; Dv up to 128 + a normalizer column)


@functools.lru_cache(maxsize=64)
def _chunk_meta(segments: tuple[tuple[int, int], ...], heads: int, device: torch.device, super_target: int) -> dict:
    """Chunk and super-chunk tables (int32 on ``device``) for the packed token axis; super-chunks sized so
    that there are at least ``super_target`` (super-chunk, head) programs where the sequence allows."""
    chunks = [(s, min(s + CHUNK, e), seq) for seq, (a, e) in enumerate(segments) for s in range(a, e, CHUNK)]
    # L chunks per super-chunk: enough super-chunks (x heads) to fill the GPU in the sequential state pass;
    # the scan over super-chunks is cheap (U at a time).
    L = 1
    while L < 64 and len(chunks) * heads >= 2 * L * super_target:
        L *= 2
    sup_first, sup_count, first_of_seq, last_of_seq, chunk_super = [], [], [], [], []
    i = 0
    while i < len(chunks):
        seq = chunks[i][2]
        j = i
        while j < len(chunks) and j - i < L and chunks[j][2] == seq:
            j += 1
        first_of_seq.append(int(i == 0 or chunks[i - 1][2] != seq))
        last_of_seq.append(int(j == len(chunks) or chunks[j][2] != seq))
        chunk_super += [len(sup_first)] * (j - i)
        sup_first.append(i)
        sup_count.append(j - i)
        i = j

    def t(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return dict(
        n_chunks=len(chunks), n_super=len(sup_first), max_count=max(sup_count),
        chunk_start=t([c[0] for c in chunks]), chunk_end=t([c[1] for c in chunks]), chunk_super=t(chunk_super),
        super_first=t(sup_first), super_count=t(sup_count), first_of_seq=t(first_of_seq), last_of_seq=t(last_of_seq),
    )


def _column_slices(d: int) -> list[tuple[int, int, int]]:
    """Output columns as launches ``(start, width, tile)``: one tile up to 128 columns, else slices of 128 and
    a tail tile of at least 64 (only for value dims with no extra-column form, see :func:`_extra_split`)."""
    if d <= 128:
        return [(0, d, max(16, next_pow2(d)))]
    return [(c, min(128, d - c), 128 if d - c > 64 else 64) for c in range(0, d, 128)]


def _extra_split(dv: int) -> int:
    """Main width when value dim ``dv`` is best run as a main tile plus one float32 extra column (``dv - 1`` a
    power of two in [16, 128], e.g. 129 = D + the normalizer column: one 128-wide tile, not 256 or two
    launches), else 0."""
    m = dv - 1
    return m if 16 <= m <= 128 and m & (m - 1) == 0 else 0


def _contraction_tiles(d: int) -> tuple[int, int]:
    """Contraction dim as NX tiles of BX (64, or the next power of two of a smaller dim), the last one masked."""
    bx = 64 if d >= 64 else max(16, next_pow2(d))
    return bx, cdiv(d, bx)


def _ext_args(x: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(pointer, token stride, head stride) of an optional [T, H] extra column."""
    return (dummy, 0, 0) if x is None else (x, x.stride(0), x.stride(1))


def _states(x: torch.Tensor, y: torch.Tensor, meta: dict, cfg: LinearConfig, heads: int, rows_per_token: int,
            reverse: bool, lowp: bool, ye: torch.Tensor | None = None, yext: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-chunk states of ``sum x^T y`` over (token, head) rows: ``(S [nC, H, DX, DY], Se [nC, H, DX] or None)``
    float32, Se the extra column ``sum x y_e`` (``yext`` 1: ``ye [T, H * GR]``; 2: ones, ``sum x``).

    x [T, H * GR, DX], y [T, H * GR, DY]; S[c] sums the chunks before c of its sequence (after c, when
    ``reverse``), exclusive. Both live in one [nC, H, DX * DY (+ DX)] buffer (one scan for both).
    """
    DX, DY = x.shape[-1], y.shape[-1]
    SZ = DX * DY + (DX if yext else 0)
    nC, nS = meta["n_chunks"], meta["n_super"]
    store_loc = meta["max_count"] > 1
    loc = torch.empty(nC if store_loc else 1, heads, SZ, device=x.device, dtype=torch.float32)
    tot = torch.empty(nS, heads, SZ, device=x.device, dtype=torch.float32)
    BX = max(16, next_pow2(DX))
    BY = max(16, next_pow2(DY)) if DY <= 128 and BX * next_pow2(DY) <= 128 * 128 else 64
    interp = interpreting()
    ye_p, sye_t, sye_h = _ext_args(ye, x)
    states_local_kernel[(nS, heads, cdiv(DY, BY))](
        x, y, ye_p, loc, tot, meta["chunk_start"], meta["chunk_end"], meta["super_first"], meta["super_count"],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sye_t, sye_h, heads, DX, DY, SZ, rows_per_token,
        BR=64, BX=BX, BY=BY, STORE_LOC=store_loc, REVERSE=reverse, YEXT=yext, LOWP=lowp, INTERP=interp,
        num_warps=8 if BX * BY >= 128 * 128 else 4,
    )
    P = torch.empty_like(tot)
    states_scan_kernel[(heads, cdiv(SZ, cfg.scan_block))](
        tot, P, meta["last_of_seq"] if reverse else meta["first_of_seq"], nS, heads, SZ,
        U=cfg.scan_chunks, BLOCK=cfg.scan_block, REVERSE=reverse, num_warps=4,
    )
    if store_loc:
        states_fixup_kernel[(nC, heads, cdiv(SZ, 1024))](
            loc, P, meta["chunk_super"], heads, SZ, BLOCK=1024, num_warps=4,
        )
    else:  # one chunk per super-chunk: the scanned totals are the chunk states
        loc = P
    # Explicit strides (a size-1 head dim keeps them too): the kernels index both parts with S's (c, h) strides.
    S = loc.as_strided((nC, heads, DX, DY), (heads * SZ, SZ, DY, 1))
    Se = loc.as_strided((nC, heads, DX), (heads * SZ, SZ, 1), loc.storage_offset() + DX * DY) if yext else None
    return S, Se


def _chunk_out(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, out: torch.Tensor, meta: dict,
               cfg: LinearConfig, G: int, *, transpose_state: bool, split: bool, lowp: bool,
               se: torch.Tensor | None = None, xe: torch.Tensor | None = None, xext: int = 0,
               ke: torch.Tensor | None = None, ve: torch.Tensor | None = None, yext: int = 0,
               oe: torch.Tensor | None = None, res: int = 0, sel: torch.Tensor | None = None,
               sele: torch.Tensor | None = None, keep: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """out [T, H*G, DY] = x S + causal-in-chunk (x k^T) v, with S [nC, H, DX, DY] (or [.., DY, DX] transposed).

    Extra float32 column (see ``chunk_out_kernel``): ``se`` [nC, H, F] the state's extra part; ``yext`` (output
    side: ``ve`` or ones, into ``oe`` [T, H*G]) or ``xext`` (contraction side: ``xe`` [T, H*G], ``ke`` or ones).
    ``res``: SPLA's residual epilogue against ``sel`` (+ ``sele``) and ``keep`` [T, H] uint8."""
    H = k.shape[1]
    DX, DY = x.shape[-1], v.shape[-1]
    BX, NX = _contraction_tiles(DX)
    NRT = cdiv(CHUNK * G, cfg.out_rows)
    if transpose_state:
        S = S.transpose(2, 3)
    slices = _column_slices(DY)
    if (xext or yext or res) and len(slices) > 1:
        raise NotImplementedError("an extra column or the residual epilogue needs DY <= 128")
    d = x  # placeholder pointer for absent operands
    se_p = d if se is None else se
    if se is not None:
        assert se.stride(0) == S.stride(0) and se.stride(1) == S.stride(1) and se.stride(2) == 1
    qe_a, ke_a, ve_a, oe_a = (_ext_args(t, d) for t in (xe, ke, ve, oe))
    sel_p, ssel_t, ssel_h = (d, 0, 0) if sel is None else (sel, sel.stride(0), sel.stride(1))
    if sel is not None:
        assert sel.stride(2) == 1 and (sele is None or sele.stride() == sel.stride()[:2])
    keep_p, skeep_t = (d, 0) if keep is None else (keep, keep.stride(0))
    for c0, width, BY in slices:
        vs, Ss, outs = v[..., c0:c0 + width], S[..., c0:c0 + width], out[..., c0:c0 + width]
        chunk_out_kernel[(meta["n_chunks"] * NRT, H)](
            x, k, vs, Ss, outs, qe_a[0], ke_a[0], ve_a[0], se_p, oe_a[0], sel_p, d if sele is None else sele,
            keep_p, meta["chunk_start"], meta["chunk_end"],
            x.stride(0), x.stride(1), k.stride(0), k.stride(1), vs.stride(0), vs.stride(1), outs.stride(0),
            outs.stride(1), *Ss.stride(), *qe_a[1:], *ke_a[1:], *ve_a[1:], *oe_a[1:], ssel_t, ssel_h, skeep_t,
            G, DX, width, NRT, float(eps),
            C=CHUNK, BM=cfg.out_rows, BX=BX, NX=NX, BY=BY, XEXT=xext, YEXT=yext, RES=res,
            SPLIT=split, LOWP=lowp, INTERP=interpreting(), num_warps=cfg.out_warps, num_stages=cfg.out_stages,
        )


def _chunk_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, R: torch.Tensor, meta: dict,
                cfg: LinearConfig, G: int, lowp: bool, *, re: torch.Tensor | None = None, vext: int = 0,
                ve: torch.Tensor | None = None, doe: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Key and value gradients ``(dk [T, H, F], dv [T, H, Dv], dve [T, H] float32 or None)`` from the reverse
    states R [nC, H, F, Dv]; with ``vext`` one extra value column (``ve`` or ones, upstream ``doe`` [T, H*G],
    reverse-state part ``re`` [nC, H, F]); ``dve`` only for a loaded ``ve``."""
    H, F, Dv = k.shape[1], k.shape[2], v.shape[2]
    slices = _column_slices(Dv)
    if vext and len(slices) > 1:
        raise NotImplementedError("an extra value column needs Dv <= 128")
    dv = torch.empty_like(v)
    dve = torch.empty(v.shape[:2], device=v.device, dtype=torch.float32) if vext == 1 else None
    # Each value slice contributes a part of dk; with one slice it is written directly in the input dtype.
    dk_parts = [torch.empty_like(k) if len(slices) == 1 else torch.empty(k.shape, device=k.device,
                                                                         dtype=torch.float32) for _ in slices]
    d = q
    ve_a, de_a, dve_a = (_ext_args(t, d) for t in (ve, doe, dve))
    if re is not None:
        assert re.stride(0) == R.stride(0) and re.stride(1) == R.stride(1) and re.stride(2) == 1
    for (c0, width, BV), dk in zip(slices, dk_parts):
        vs, ds, Rs, dvs = v[..., c0:c0 + width], do[..., c0:c0 + width], R[..., c0:c0 + width], dv[..., c0:c0 + width]
        chunk_dkdv_kernel[(meta["n_chunks"], H)](
            q, k, vs, ds, Rs, dk, dvs, ve_a[0], de_a[0], d if re is None else re, dve_a[0],
            meta["chunk_start"], meta["chunk_end"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), vs.stride(0), vs.stride(1),
            ds.stride(0), ds.stride(1), dk.stride(0), dk.stride(1), dvs.stride(0), dvs.stride(1),
            Rs.stride(0), Rs.stride(1), Rs.stride(2), *ve_a[1:], *de_a[1:], *dve_a[1:], G, F, width,
            C=CHUNK, BM=cfg.dkdv_rows, BF=max(16, next_pow2(F)), BV=BV, VEXT=vext, SPLIT=cfg.bwd_split, LOWP=lowp,
            INTERP=interpreting(), num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
        )
    dk = dk_parts[0] if len(slices) == 1 else torch.stack(dk_parts).sum(0).to(k.dtype)
    return dk, dv, dve


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] -> contiguous [B * N, H, D]."""
    B, N, H, D = x.shape
    return x.contiguous().view(B * N, H, D)


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: dict, cfg: LinearConfig, G: int,
                   out: torch.Tensor, *,
                   ve: torch.Tensor | None = None, ones: bool = False, oe: torch.Tensor | None = None,
                   res: int = 0, sel: torch.Tensor | None = None, sele: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Forward on packed [T, H, D] tensors into ``out`` [T, H*G, Dv] (+ ``oe`` [T, H*G] for the extra value
    column ``ve`` [T, H], or all ones with ``ones``); ``res``: the residual epilogue (``chunk_out_kernel``)."""
    lowp = q.dtype == torch.bfloat16
    yext = 2 if ones else (1 if ve is not None else 0)
    S, Se = _states(k, v, meta, cfg, k.shape[1], 1, False, lowp, ye=ve, yext=yext)
    _chunk_out(q, k, v, S, out, meta, cfg, G, transpose_state=False, split=True, lowp=lowp, se=Se, ve=ve,
               yext=yext, oe=oe, res=res, sel=sel, sele=sele, keep=keep, eps=eps)


def linear_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, meta: dict,
                    cfg: LinearConfig, G: int, needs: tuple[bool, bool], *, ve: torch.Tensor | None = None,
                    ones: bool = False, doe: torch.Tensor | None = None) -> tuple:
    """Gradients ``(dq, dk, dv, dve)`` on packed tensors from ``do`` [T, H*G, Dv] (+ ``doe`` [T, H*G] float32
    for the extra value column ``ve`` or ones); ``needs`` = (dq, dk or dv). Missing ones are None."""
    lowp = q.dtype == torch.bfloat16
    ext = 2 if ones else (1 if ve is not None else 0)
    if ext:
        assert doe is not None
    dq = dk = dv = dve = None
    if needs[0]:
        # dq_i = S_i do_i = do_i S^T + sum_{j <= i in chunk} (do_i . v_j) k_j: the forward with (do, v, k).
        S, Se = _states(k, v, meta, cfg, k.shape[1], 1, False, lowp, ye=ve, yext=ext)
        dq = torch.empty_like(q)
        _chunk_out(do, v, k, S, dq, meta, cfg, G, transpose_state=True, split=cfg.bwd_split, lowp=lowp, se=Se,
                   xe=doe, xext=ext, ke=ve)
    if needs[1]:
        # R_c = sum over later chunks of sum_g q^T do (+ its extra column sum_g q do_e)
        R, Re = _states(q, do, meta, cfg, k.shape[1], G, True, lowp, ye=doe, yext=1 if ext else 0)
        dk, dv, dve = _chunk_dkdv(q, k, v, do, R, meta, cfg, G, lowp, re=Re, vext=ext, ve=ve, doe=doe)
    return dq, dk, dv, dve


class _CausalLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v, cu_seqlens, config):
        B, N, Hq, F = phi_q.shape
        Hkv, Dv = phi_k.shape[2], v.shape[3]
        G = Hq // Hkv
        cfg = config
        q, k, vv = _flat(phi_q), _flat(phi_k), _flat(v)
        meta = _chunk_meta(sequence_segments(cu_seqlens, batch=B, n=N), Hkv, q.device, cfg.super_target)
        out = torch.empty(B * N, Hq, Dv, device=q.device, dtype=torch.float32)
        m = _extra_split(Dv)
        with record_function("spla_kernels.linear: fwd"):
            if m:  # main tile (copied once: aligned loads) + one float32 extra column, written in place
                vm, ve = vv[..., :m].contiguous(), vv[..., m]
                linear_forward(q, k, vm, meta, cfg, G, out[..., :m], ve=ve, oe=out[..., m])
            else:
                linear_forward(q, k, vv, meta, cfg, G, out)
        ctx.save_for_backward(q, k, vv)
        ctx.meta, ctx.cfg, ctx.shape = meta, cfg, (B, N, Hq, Hkv, F, Dv)
        return out.view(B, N, Hq, Dv)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        meta, cfg = ctx.meta, ctx.cfg
        B, N, Hq, Hkv, F, Dv = ctx.shape
        G = Hq // Hkv
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        do = _flat(do)
        m = _extra_split(Dv)
        with record_function("spla_kernels.linear: bwd"):
            if m:
                # The kernels round do's main columns to the operand dtype anyway: do it once, into an aligned copy.
                dom = do[..., :m].to(q.dtype if q.dtype == torch.bfloat16 else torch.float32).contiguous()
                dq, dk, dvm, dve = linear_backward(q, k, v[..., :m].contiguous(), dom, meta, cfg, G, needs,
                                                   ve=v[..., m], doe=do[..., m].float())
                dv = None if dvm is None else torch.cat([dvm, dve.to(dvm.dtype)[..., None]], -1)
            else:
                dq, dk, dv, _ = linear_backward(q, k, v, do, meta, cfg, G, needs)
        dq = None if dq is None else dq.view(B, N, Hq, F)
        dk = None if dk is None else dk.view(B, N, Hkv, F)
        dv = None if dv is None else dv.view(B, N, Hkv, Dv)
        return dq, dk, dv, None, None


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *,
                            cu_seqlens: torch.Tensor | None = None,
                            config: LinearConfig | None = None) -> torch.Tensor:
    """``o_i = phi_q_i^T sum_{j <= i} phi_k_j v_j^T`` per KV head, differentiable in all three inputs.

    Args: phi_q [B, N, Hq, F]; phi_k [B, N, Hkv, F]; v [B, N, Hkv, Dv] (F <= 128, Dv <= 256; D + 1 with a
    normalizer column runs as a D-wide tile plus a float32 extra column); same dtype (bfloat16, float16 or
    float32); cu_seqlens int [S + 1] packs sequences (B == 1), the state restarting at each; config: tiles
    (None: the per-device table, ``spla_kernels.config``, which declines on some GPU classes).
    Returns: float32 [B, N, Hq, Dv]. float64 inputs go to the PyTorch reference.
    """
    if phi_q.dtype == torch.float64:
        from spla_lit.ops import causal_linear_attention as reference

        return reference(phi_q, phi_k, v, cu_seqlens=cu_seqlens, impl="reference")
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError("phi_q, phi_k and v must be [B, N, H, D]")
    B, N, Hq, F = phi_q.shape
    Hkv, Dv = phi_k.shape[2], v.shape[3]
    if phi_k.shape != (B, N, Hkv, F) or v.shape[:3] != (B, N, Hkv) or Hq % Hkv:
        raise ValueError(f"shapes do not match: phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (phi_q.dtype == phi_k.dtype == v.dtype) or phi_q.dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
        raise ValueError(f"dtypes must match and be bf16/fp16/fp32, got {phi_q.dtype}, {phi_k.dtype}, {v.dtype}")
    if F > 128 or Dv > MAX_DIM:
        raise NotImplementedError(f"feature dim {F} > 128 or value dim {Dv} > {MAX_DIM}")
    config = config or linear_config(arch_of(phi_q.device), dtype=phi_q.dtype)
    return _CausalLinearAttention.apply(phi_q, phi_k, v, cu_seqlens, config)
