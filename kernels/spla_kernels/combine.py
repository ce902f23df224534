"""SPLA's add-combine ``o = o_sparse + gate * RMSNorm(r)`` fused (``spla_kernels.combine_add``).

``spla_lit.ops.combine_residual(..., combine="add")`` in PyTorch runs ~8 float32 passes over ``[B, N, Hq, Dv]``
forward and ~12 backward, and autograd keeps two float32 copies of the residual (the normed and the gated one)
for the backward. Here one elementwise kernel reads ``o_sparse`` and ``r`` and writes ``o``; the backward kernel
reads ``do`` and ``r`` again, recomputes the norm and writes ``dr`` (float32), ``d gate`` and per-program partial
sums of ``d norm_weight``; ``d o_sparse`` is ``do`` itself. Saved for the backward: ``r`` (which the residual's
own backward keeps anyway), the gate and the weight: nothing of size ``[B, N, Hq, Dv]`` beyond ``r``.

Rows are (token, query head) pairs, ``Dv`` channels each; a program takes ``CombineConfig.rows`` of them. With
``return_stats`` the forward also returns the squared norms of the residual's contribution ``gate * norm(r)``
and of ``o_sparse`` (float32, summed per program), from which the op reports ``residual_share`` without another
pass. Stages run in ``torch.profiler.record_function`` ranges ``spla_kernels.combine: ...``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from spla_lit.ops.utils import cdiv, next_pow2

from .config import CombineConfig

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _normed(r, W, cols, cm, DV, eps, NORM: tl.constexpr):
    """(y, rstd, xhat, w): ``y = r * rstd * w`` with ``rstd = 1 / sqrt(mean(r^2) + eps)`` per row, or y = r."""
    if NORM:
        rstd = 1.0 / tl.sqrt_rn(tl.sum(r * r, axis=1) / DV + eps)
        xhat = r * rstd[:, None]
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        return xhat * w[None, :], rstd, xhat, w
    else:
        return r, r, r, r


@triton.jit
def _tile(pid, n_rows, DV, BR: tl.constexpr, BD: tl.constexpr):
    """Program ``pid``'s ``BR`` rows of a [rows, DV] array: (row index int64, row mask, columns, column mask,
    2-D mask, 2-D offsets)."""
    rows = pid * BR + tl.arange(0, BR)
    ok = rows < n_rows
    cols = tl.arange(0, BD)
    cm = cols < DV
    r64 = rows.to(tl.int64)
    return r64, ok, cols, cm, ok[:, None] & cm[None, :], r64[:, None] * DV + cols[None, :]


@triton.jit
def combine_fwd_kernel(O, R, GATE, W, OUT, STATS, n_rows, DV, gate_value, eps,
                       HAS_GATE: tl.constexpr, NORM: tl.constexpr, WITH_STATS: tl.constexpr,
                       BR: tl.constexpr, BD: tl.constexpr):
    """grid (cdiv(rows, BR),). O, OUT [rows, DV] (o_sparse's dtype), R [rows, DV], GATE [rows] (HAS_GATE; else
    the scalar ``gate_value``), W [DV] (NORM). STATS [programs, 2] float32: sum of squares of ``gate * y`` and
    of ``o_sparse`` over the program's rows."""
    pid = tl.program_id(0)
    r64, ok, cols, cm, m2, off = _tile(pid, n_rows, DV, BR, BD)
    r = tl.load(R + off, mask=m2, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=m2, other=0.0).to(tl.float32)
    y, _, _, _ = _normed(r, W, cols, cm, DV, eps, NORM)
    c = (tl.load(GATE + r64, mask=ok, other=0.0).to(tl.float32)[:, None] if HAS_GATE else gate_value) * y
    tl.store(OUT + off, (o + c).to(OUT.dtype.element_ty), mask=m2)
    if WITH_STATS:
        tl.store(STATS + pid * 2, tl.sum(tl.sum(c * c, axis=1), axis=0))
        tl.store(STATS + pid * 2 + 1, tl.sum(tl.sum(o * o, axis=1), axis=0))


@triton.jit
def combine_bwd_kernel(DO, R, GATE, W, DR, DGATE, DWP, n_rows, DV, gate_value, eps,
                       HAS_GATE: tl.constexpr, NORM: tl.constexpr, NEED_DGATE: tl.constexpr,
                       NEED_DW: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """grid (cdiv(rows, BR),). From DO [rows, DV]: DR [rows, DV] float32 = d r, DGATE [rows] float32 = d gate
    (NEED_DGATE), DWP [programs, DV] float32 = the program's part of d norm_weight (NEED_DW)."""
    pid = tl.program_id(0)
    r64, ok, cols, cm, m2, off = _tile(pid, n_rows, DV, BR, BD)
    do = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    r = tl.load(R + off, mask=m2, other=0.0).to(tl.float32)
    y, rstd, xhat, w = _normed(r, W, cols, cm, DV, eps, NORM)
    g = tl.load(GATE + r64, mask=ok, other=0.0).to(tl.float32)[:, None] if HAS_GATE else gate_value
    if NEED_DGATE:
        tl.store(DGATE + r64, tl.sum(do * y, axis=1), mask=ok)
    dy = g * do
    if NORM:
        if NEED_DW:
            tl.store(DWP + pid.to(tl.int64) * DV + cols, tl.sum(dy * xhat, axis=0), mask=cm)
        dxhat = dy * w[None, :]
        dr = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / DV)[:, None])
    else:
        dr = dy
    tl.store(DR + off, dr, mask=m2)


class _CombineAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_sparse, residual, gate_t, weight, gate_value, eps, with_stats, cfg):
        B, N, Hq, Dv = o_sparse.shape
        rows = B * N * Hq
        o = o_sparse.contiguous()
        r = residual.contiguous()
        g = gate_t.contiguous() if gate_t is not None else None
        w = weight.contiguous() if weight is not None else None
        out = torch.empty_like(o)
        bd = max(16, next_pow2(Dv))
        br = max(1, min(cfg.rows, 8192 // bd))
        grid = cdiv(rows, br)
        stats = torch.empty(grid if with_stats else 1, 2, device=o.device, dtype=torch.float32)
        with record_function("spla_kernels.combine: fwd"):
            combine_fwd_kernel[(grid,)](o, r, o if g is None else g, o if w is None else w, out, stats, rows, Dv,
                                        float(gate_value), float(eps), HAS_GATE=g is not None, NORM=w is not None,
                                        WITH_STATS=with_stats, BR=br, BD=bd, num_warps=cfg.warps)
        ctx.save_for_backward(r, g, w)
        ctx.meta = (gate_value, float(eps), br, bd, o_sparse.dtype, cfg.warps)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, dout, _dstats):
        r, g, w = ctx.saved_tensors
        gate_value, eps, br, bd, o_dtype, warps = ctx.meta
        need_o, need_r, need_g, need_w = ctx.needs_input_grad[:4]
        if dout is None:
            return (None,) * 8
        B, N, Hq, Dv = r.shape
        rows = B * N * Hq
        grid = cdiv(rows, br)
        do = dout.contiguous()
        d_o = do if do.dtype == o_dtype else do.to(o_dtype)
        if not (need_r or need_g or need_w):
            return d_o if need_o else None, None, None, None, None, None, None, None
        dev = do.device
        dr = torch.empty(r.shape, device=dev, dtype=torch.float32)
        need_g = need_g and g is not None
        need_w = need_w and w is not None
        dgate = torch.empty(rows, device=dev, dtype=torch.float32) if need_g else dr
        dwp = torch.empty(grid, Dv, device=dev, dtype=torch.float32) if need_w else dr
        with record_function("spla_kernels.combine: bwd"):
            combine_bwd_kernel[(grid,)](do, r, r if g is None else g, r if w is None else w, dr, dgate, dwp, rows,
                                        Dv, float(gate_value), eps, HAS_GATE=g is not None, NORM=w is not None,
                                        NEED_DGATE=need_g, NEED_DW=need_w, BR=br, BD=bd, num_warps=warps)
        d_g = dgate.view(g.shape).to(g.dtype) if need_g else None
        d_w = dwp.sum(0).to(w.dtype) if need_w else None
        d_r = dr if r.dtype == torch.float32 else dr.to(r.dtype)
        return (d_o if need_o else None, d_r if need_r else None, d_g, d_w, None, None, None, None)


def combine_add(o_sparse: torch.Tensor, residual: torch.Tensor, *, gate: torch.Tensor | float | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6, return_stats: bool = False,
                config: CombineConfig | None = None):
    """``o = o_sparse + gate * RMSNorm(residual)`` in one pass, the arithmetic of
    ``spla_lit.ops.combine_residual(..., combine="add")`` (float32 inside, ``o`` rounded once to o_sparse's dtype).

    Args:
        o_sparse [B, N, Hq, Dv] (bf16, fp16 or fp32); residual [B, N, Hq, Dv] (float32 from the residual ops);
        gate: None (1), a float, or a floating [B, N, Hq] tensor; norm_weight: None (no norm) or [Dv];
        eps: the norm's epsilon; return_stats: also return float32 ``[2]`` = (||gate * norm(r)||^2,
        ||o_sparse||^2), detached; config: rows / warps per program (None: ``CombineConfig()``).

    Returns ``o`` (o_sparse's dtype), or ``(o, stats)``. Differentiable in o_sparse, residual, a tensor gate and
    norm_weight. Raises NotImplementedError for float64 (the reference keeps float64 exact) or Dv > 1024.
    """
    if o_sparse.dim() != 4 or tuple(residual.shape) != tuple(o_sparse.shape):
        raise ValueError(f"o_sparse and residual must be the same [B, N, Hq, Dv], got {tuple(o_sparse.shape)} and "
                         f"{tuple(residual.shape)}")
    if o_sparse.dtype not in _DTYPES or residual.dtype not in _DTYPES:
        raise NotImplementedError(f"combine_add takes bf16 / fp16 / fp32, got {o_sparse.dtype} and {residual.dtype}")
    B, N, Hq, Dv = o_sparse.shape
    if Dv > 1024:
        raise NotImplementedError(f"value dim {Dv} > 1024")
    gate_t = gate if isinstance(gate, torch.Tensor) else None
    if gate_t is not None and (tuple(gate_t.shape) != (B, N, Hq) or gate_t.dtype not in _DTYPES):
        raise ValueError(f"gate must be a float or a [B, N, Hq] = [{B}, {N}, {Hq}] float tensor, got "
                         f"{gate_t.dtype} {tuple(gate_t.shape)}")
    if norm_weight is not None and (tuple(norm_weight.shape) != (Dv,) or norm_weight.dtype not in _DTYPES):
        raise ValueError(f"norm_weight must be a [Dv] = [{Dv}] float tensor")
    gate_value = 1.0 if gate is None or gate_t is not None else float(gate)
    out, stats = _CombineAdd.apply(o_sparse, residual, gate_t, norm_weight, gate_value, float(eps),
                                   bool(return_stats), config or CombineConfig())
    return (out, stats.sum(0)) if return_stats else out
