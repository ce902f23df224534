"""Chunked causal linear attention in Triton, forward and backward (``spla_kernels.causal_linear_attention``).

``o_i = phi_q_i^T S_i`` with ``S_i = sum_{j <= i} phi_k_j v_j^T``: one float32 state per KV head, shared by its
G query heads. Chunks of ``C = 64`` tokens; inside a chunk the causal products run on the tensor cores,
between chunks the state is a two-level scan (a sequential pass inside each super-chunk of a few chunks,
then a scan over super-chunks), so no single program walks the whole sequence.

Precision: states and accumulators are float32. With bfloat16 inputs, products of a bf16 tile with a
float32 operand (the state, the intra-chunk scores) use a bf16 hi + lo split of the float32 side (~16
mantissa bits), because the residual linear attention subtracts large terms; ``BWD_SPLIT = False`` rounds
them to bf16 once in the backward pass (~15% faster, gradients ~1.2x less accurate). The float32 upstream
gradient is rounded to bf16 for the backward products. float32 / float16 inputs use float32 operands with
``tf32x3`` products.

Value dims over 128 (e.g. D + 1 with the normalizer column) are processed in column slices of 128.

Packed sequences (``cu_seqlens``, B == 1): chunks never straddle a sequence and the state restarts at
each sequence. A batch B > 1 is handled as B packed sequences of length N.
"""

from __future__ import annotations

import functools

import torch

from ._linear_kernels import (
    chunk_dkdv_kernel,
    chunk_out_kernel,
    next_pow2,
    states_fixup_kernel,
    states_local_kernel,
    states_scan_kernel,
)
from ._linear_tl import interpreting

CHUNK = 64  # tokens per chunk
ROWS, OUT_WARPS, OUT_STAGES = 64, 4, 3  # output kernel: (token, head) rows per program, launch config
DKDV_ROWS, DKDV_STAGES = 64, 2  # key-gradient kernel: query rows per loop step (3 stages overflow smem)
SUPER_TARGET = 256  # aim for at least this many (super-chunk, head) programs in the sequential state pass
SCAN_U, SCAN_BLOCK = 16, 256  # super-chunks per scan step, state elements per scan program
BWD_SPLIT = True  # bf16 hi/lo splits in the backward products too (gradients ~1.2x more accurate)
MAX_DIM = 256  # largest feature / value dim handled (F <= 128 expected; Dv up to 128 + a normalizer column)


def _segments(batch: int, n: int, cu_seqlens: torch.Tensor | None) -> tuple[tuple[int, int], ...]:
    """Sequence boundaries in the packed token axis [B * N]."""
    if cu_seqlens is None:
        return tuple((b * n, (b + 1) * n) for b in range(batch))
    cu = [int(x) for x in cu_seqlens.tolist()]
    if batch != 1 or cu[0] != 0 or cu[-1] != n or any(e <= s for s, e in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be [0, ..., N={n}] strictly increasing with B == 1, got {cu}")
    return tuple(zip(cu[:-1], cu[1:]))


@functools.lru_cache(maxsize=64)
def _chunk_meta(segments: tuple[tuple[int, int], ...], heads: int, device: torch.device) -> dict:
    """Chunk and super-chunk tables (int32 on ``device``) for the packed token axis."""
    chunks = [(s, min(s + CHUNK, e), seq) for seq, (a, e) in enumerate(segments) for s in range(a, e, CHUNK)]
    # L chunks per super-chunk: enough super-chunks (x heads) to fill the GPU in the sequential state pass;
    # the scan over super-chunks is cheap (U at a time).
    L = 1
    while L < 64 and len(chunks) * heads >= 2 * L * SUPER_TARGET:
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
    a tail tile of at least 64 (a Dv = D + 1 normalizer column costs one more launch, not a 256-wide tile)."""
    if d <= 128:
        return [(0, d, max(16, next_pow2(d)))]
    return [(c, min(128, d - c), 128 if d - c > 64 else 64) for c in range(0, d, 128)]


def _contraction_tiles(d: int) -> tuple[int, int]:
    """Contraction dim as NX tiles of BX (64, or the next power of two of a smaller dim), the last one masked."""
    bx = 64 if d >= 64 else max(16, next_pow2(d))
    return bx, cdiv(d, bx)


def _states(x: torch.Tensor, y: torch.Tensor, meta: dict, heads: int, rows_per_token: int, reverse: bool,
            lowp: bool) -> torch.Tensor:
    """Per-chunk states of ``sum x^T y`` over (token, head) rows: S [nC, H, DX, DY] float32.

    x [T, H * GR, DX], y [T, H * GR, DY]; S[c] sums the chunks before c of its sequence (after c, when
    ``reverse``), exclusive.
    """
    DX, DY = x.shape[-1], y.shape[-1]
    nC, nS = meta["n_chunks"], meta["n_super"]
    store_loc = meta["max_count"] > 1
    loc = torch.empty(nC if store_loc else 1, heads, DX, DY, device=x.device, dtype=torch.float32)
    tot = torch.empty(nS, heads, DX, DY, device=x.device, dtype=torch.float32)
    BX = max(16, next_pow2(DX))
    BY = max(16, next_pow2(DY)) if DY <= 128 and BX * next_pow2(DY) <= 128 * 128 else 64
    interp = interpreting()
    _record("states_local", states_local_kernel[(nS, heads, cdiv(DY, BY))](
        x, y, loc, tot, meta["chunk_start"], meta["chunk_end"], meta["super_first"], meta["super_count"],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), heads, DX, DY, rows_per_token,
        BR=64, BX=BX, BY=BY, STORE_LOC=store_loc, REVERSE=reverse, LOWP=lowp, INTERP=interp,
        num_warps=8 if BX * BY >= 128 * 128 else 4,
    ))
    P = torch.empty_like(tot)
    DXY = DX * DY
    _record("states_scan", states_scan_kernel[(heads, cdiv(DXY, SCAN_BLOCK))](
        tot, P, meta["last_of_seq"] if reverse else meta["first_of_seq"], nS, heads, DXY,
        U=SCAN_U, BLOCK=SCAN_BLOCK, REVERSE=reverse, num_warps=4,
    ))
    if not store_loc:  # one chunk per super-chunk: the scanned totals are the chunk states
        return P
    _record("states_fixup", states_fixup_kernel[(nC, heads, cdiv(DXY, 1024))](
        loc, P, meta["chunk_super"], heads, DXY, BLOCK=1024, num_warps=4,
    ))
    return loc


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


COMPILED: dict = {}  # kernel name -> last compiled kernel (for register / spill reports), when RECORD is set
RECORD = False


def _record(name: str, compiled) -> None:
    if RECORD and compiled is not None:
        COMPILED[name] = compiled


def _chunk_out(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, out: torch.Tensor, meta: dict,
               G: int, *, transpose_state: bool, split: bool, lowp: bool, name: str) -> None:
    """out [T, H*G, DY] = x S + causal-in-chunk (x k^T) v, with S [nC, H, DX, DY] (or [.., DY, DX] transposed)."""
    H = k.shape[1]
    DX, DY = x.shape[-1], v.shape[-1]
    BX, NX = _contraction_tiles(DX)
    NRT = cdiv(CHUNK * G, ROWS)
    if transpose_state:
        S = S.transpose(2, 3)
    for c0, width, BY in _column_slices(DY):
        vs, Ss, outs = v[..., c0:c0 + width], S[..., c0:c0 + width], out[..., c0:c0 + width]
        _record(name, chunk_out_kernel[(meta["n_chunks"] * NRT, H)](
            x, k, vs, Ss, outs, meta["chunk_start"], meta["chunk_end"],
            x.stride(0), x.stride(1), k.stride(0), k.stride(1), vs.stride(0), vs.stride(1), outs.stride(0),
            outs.stride(1), *Ss.stride(), G, DX, width, NRT,
            C=CHUNK, BM=ROWS, BX=BX, NX=NX, BY=BY,
            SPLIT=split, LOWP=lowp, INTERP=interpreting(), num_warps=OUT_WARPS, num_stages=OUT_STAGES,
        ))


def _chunk_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, R: torch.Tensor, meta: dict,
                G: int, lowp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value gradients [T, H, F], [T, H, Dv] from the reverse states R [nC, H, F, Dv]."""
    H, F, Dv = k.shape[1], k.shape[2], v.shape[2]
    slices = _column_slices(Dv)
    dv = torch.empty_like(v)
    # Each value slice contributes a part of dk; with one slice it is written directly in the input dtype.
    dk_parts = [torch.empty_like(k) if len(slices) == 1 else torch.empty(k.shape, device=k.device,
                                                                         dtype=torch.float32) for _ in slices]
    rows, stages = (DKDV_ROWS, DKDV_STAGES) if lowp else (DKDV_ROWS // 2, 1)  # fp32 tiles: half the rows
    for (c0, width, BV), dk in zip(slices, dk_parts):
        vs, ds, Rs, dvs = v[..., c0:c0 + width], do[..., c0:c0 + width], R[..., c0:c0 + width], dv[..., c0:c0 + width]
        _record("dkdv", chunk_dkdv_kernel[(meta["n_chunks"], H)](
            q, k, vs, ds, Rs, dk, dvs, meta["chunk_start"], meta["chunk_end"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), vs.stride(0), vs.stride(1),
            ds.stride(0), ds.stride(1), dk.stride(0), dk.stride(1), dvs.stride(0), dvs.stride(1),
            Rs.stride(0), Rs.stride(1), Rs.stride(2), G, F, width,
            C=CHUNK, BM=rows, BF=max(16, next_pow2(F)), BV=BV, SPLIT=BWD_SPLIT, LOWP=lowp,
            INTERP=interpreting(), num_warps=8, num_stages=stages,
        ))
    dk = dk_parts[0] if len(slices) == 1 else torch.stack(dk_parts).sum(0).to(k.dtype)
    return dk, dv


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] -> contiguous [B * N, H, D]."""
    B, N, H, D = x.shape
    return x.contiguous().view(B * N, H, D)


class _CausalLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v, cu_seqlens):
        B, N, Hq, F = phi_q.shape
        Hkv, Dv = phi_k.shape[2], v.shape[3]
        G = Hq // Hkv
        lowp = phi_q.dtype == torch.bfloat16
        q, k, vv = _flat(phi_q), _flat(phi_k), _flat(v)
        meta = _chunk_meta(_segments(B, N, cu_seqlens), Hkv, q.device)
        S = _states(k, vv, meta, Hkv, 1, False, lowp)
        out = torch.empty(B * N, Hq, Dv, device=q.device, dtype=torch.float32)
        _chunk_out(q, k, vv, S, out, meta, G, transpose_state=False, split=True, lowp=lowp, name="out_fwd")
        ctx.save_for_backward(q, k, vv)
        ctx.meta, ctx.shape = meta, (B, N, Hq, Hkv, F, Dv)
        return out.view(B, N, Hq, Dv)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        meta = ctx.meta
        B, N, Hq, Hkv, F, Dv = ctx.shape
        G = Hq // Hkv
        lowp = q.dtype == torch.bfloat16
        do = _flat(do)
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            # dq_i = S_i do_i = do_i S^T + sum_{j <= i in chunk} (do_i . v_j) k_j: the forward with (do, v, k).
            S = _states(k, v, meta, Hkv, 1, False, lowp)
            dq = torch.empty_like(q)
            _chunk_out(do, v, k, S, dq, meta, G, transpose_state=True, split=BWD_SPLIT, lowp=lowp, name="out_dq")
            dq = dq.view(B, N, Hq, F)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            R = _states(q, do, meta, Hkv, G, True, lowp)  # R_c = sum over later chunks of sum_g q^T do
            dk, dv = _chunk_dkdv(q, k, v, do, R, meta, G, lowp)
            dk, dv = dk.view(B, N, Hkv, F), dv.view(B, N, Hkv, Dv)
        return dq, dk, dv, None


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *,
                            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``o_i = phi_q_i^T sum_{j <= i} phi_k_j v_j^T`` per KV head, differentiable in all three inputs.

    Args: phi_q [B, N, Hq, F]; phi_k [B, N, Hkv, F]; v [B, N, Hkv, Dv] (F <= 128, Dv <= 256, e.g. D + 1 with a
    normalizer column); same dtype (bfloat16, float16 or float32); cu_seqlens int [S + 1] packs sequences
    (B == 1), the state restarting at each.
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
    return _CausalLinearAttention.apply(phi_q, phi_k, v, cu_seqlens)
