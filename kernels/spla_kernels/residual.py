"""SPLA's residual linear attention by subtraction on the kernel path, from the fused kernel's selected part.

``subtract_residual(phi_q, phi_k, v, sel, nonempty, ...)`` returns what
``_finish_residual(causal_linear_attention(phi_q, phi_k, [v, 1]) - sel, nonempty, ...)`` returns in
``spla_lit.ops``, without materialising the global term or the ``[v, 1]`` values:

- forward: one chunked linear-attention pass (``linear.py``) whose output kernel starts its float32
  accumulators at ``-sel`` and ends with the residual epilogue (zero where no key is unselected; the division
  by the normalizer). The normalizer ``phi_q . sum phi_k`` is an extra float32 column of the same kernels
  (the state's ``z = sum phi_k`` and the row sums of the intra-chunk scores), never a second 128-wide tile.
- backward: one elementwise pass (:func:`residual_bwd_kernel`) from the residual's gradient to the
  selected part's gradient (float32, for the fused sparse kernel) and the global term's gradient (in the
  operand dtype the linear-attention backward rounds to anyway), then the linear-attention backward with the
  normalizer column's gradient as its float32 extra column.

Modes: ``sub`` (``keep (glob - sel)``, no normalizer), ``norm`` (``keep num / (max(keep den, 0) + eps)``),
``pair`` (``keep [num, den]``, for the joint combine). All subtraction is float32. Tiles: a ``LinearConfig``
(argument, or the per-device table); stages run in ``torch.profiler.record_function`` ranges
``spla_kernels.residual: ...``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from spla_lit.ops.utils import cdiv, next_pow2, sequence_segments

from . import linear as L
from .config import LinearConfig, arch_of, linear_config

_MODES = {"sub": 1, "norm": 2, "pair": 3}


@triton.jit
def residual_bwd_kernel(DR, R, DEN, KEEP, DSEL, GM, GE, n_rows, HQ, G, HKV, DV, sdr, ssel, eps,
                        MODE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """grid (cdiv(T * HQ, BR),). Rows are (token, query head) pairs. From the residual's gradient DR
    ([rows, DV] (+1 column in ``pair`` mode), row stride sdr) to GM = d glob_num [rows, DV] (GM's dtype),
    GE = d glob_den [rows] float32 and DSEL = -[GM, GE] float32 (row stride ssel). ``norm`` mode reads the
    residual R [rows, DV] and the stored normalizer DEN = keep * (glob_den - sel_den) [rows]."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < n_rows
    r64 = rows.to(tl.int64)
    keep = tl.load(KEEP + (r64 // HQ) * HKV + (rows % HQ) // G, mask=ok, other=0).to(tl.float32)
    cols = tl.arange(0, BD)
    m2 = ok[:, None] & (cols < DV)[None, :]
    dr = tl.load(DR + r64[:, None] * sdr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if MODE == 2:
        r = tl.load(R + r64[:, None] * DV + cols[None, :], mask=m2, other=0.0)
        den = tl.load(DEN + r64, mask=ok, other=0.0)
        inv = keep / (tl.maximum(den, 0.0) + eps)
        g = dr * inv[:, None]
        ge = tl.where(den >= 0, -tl.sum(dr * r, axis=1) * inv, 0.0)  # clamp_min passes the gradient at 0
    else:
        g = dr * keep[:, None]
        ge = tl.zeros([BR], dtype=tl.float32)
        if MODE == 3:
            ge = tl.load(DR + r64 * sdr + DV, mask=ok, other=0.0).to(tl.float32) * keep
    tl.store(GM + r64[:, None] * DV + cols[None, :], g.to(GM.dtype.element_ty), mask=m2)
    tl.store(DSEL + r64[:, None] * ssel + cols[None, :], -g, mask=m2)
    if MODE != 1:
        tl.store(GE + r64, ge, mask=ok)
        tl.store(DSEL + r64 * ssel + DV, -ge, mask=ok)


class _SubtractResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v, sel, keep, cu_seqlens, mode, eps, config):
        B, N, Hq, F = phi_q.shape
        Hkv, Dv = phi_k.shape[2], v.shape[3]
        G, T = Hq // Hkv, B * N
        cfg = config
        q, k, vv, self_ = L._flat(phi_q), L._flat(phi_k), L._flat(v), L._flat(sel)
        meta = L._chunk_meta(sequence_segments(cu_seqlens, batch=B, n=N), Hkv, q.device, cfg.super_target)
        ext = mode != "sub"
        dev = q.device
        out = torch.empty(T, Hq, Dv + (mode == "pair"), device=dev, dtype=torch.float32)
        den = None
        if mode == "pair":
            oe = out[..., Dv]
        elif mode == "norm":
            oe = den = torch.empty(T, Hq, device=dev, dtype=torch.float32)
        else:
            oe = None
        with record_function("spla_kernels.residual: fwd (linear + epilogue)"):
            L.linear_forward(q, k, vv, meta, cfg, G, out[..., :Dv], ones=ext, oe=oe, res=2 if mode == "norm" else 1,
                             sel=self_[..., :Dv], sele=self_[..., Dv] if ext else None, keep=keep, eps=eps)
        ctx.save_for_backward(q, k, vv, keep, *((out, den) if mode == "norm" else ()))
        ctx.meta, ctx.cfg, ctx.shape, ctx.mode, ctx.eps = meta, cfg, (B, N, Hq, Hkv, F, Dv, sel.shape[-1]), mode, eps
        return out.view(B, N, Hq, -1)

    @staticmethod
    def backward(ctx, dr):
        q, k, v, keep, *saved = ctx.saved_tensors
        B, N, Hq, Hkv, F, Dv, DVS = ctx.shape
        G, T = Hq // Hkv, B * N
        mode = ctx.mode
        ext = mode != "sub"
        dev = q.device
        cfg = ctx.cfg
        with record_function("spla_kernels.residual: bwd epilogue"):
            dr = L._flat(dr.float())
            r, den = saved if mode == "norm" else (dr, dr)
            dsel = torch.empty(T, Hq, DVS, device=dev, dtype=torch.float32)
            gm = torch.empty(T, Hq, Dv, device=dev, dtype=q.dtype if q.dtype == torch.bfloat16 else torch.float32)
            ge = torch.empty(T, Hq, device=dev, dtype=torch.float32) if ext else None
            residual_bwd_kernel[(cdiv(T * Hq, cfg.epilogue_rows),)](
                dr, r, den, keep, dsel, gm, dsel if ge is None else ge, T * Hq, Hq, G, Hkv, Dv, dr.stride(1),
                dsel.stride(1), float(ctx.eps), MODE=_MODES[mode], BR=cfg.epilogue_rows, BD=max(16, next_pow2(Dv)),
                num_warps=4,
            )
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        with record_function("spla_kernels.residual: bwd linear"):
            dq, dk, dv, _ = L.linear_backward(q, k, v, gm, ctx.meta, cfg, G, needs, ones=ext, doe=ge)
        dq = None if dq is None else dq.view(B, N, Hq, F)
        dk = None if dk is None else dk.view(B, N, Hkv, F)
        dv = None if dv is None else dv.view(B, N, Hkv, Dv)
        return dq, dk, dv, dsel.view(B, N, Hq, DVS), None, None, None, None, None


def subtract_residual(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor,
                      nonempty: torch.Tensor, *, normalize: bool, return_normalizer: bool = False,
                      eps: float = 1e-6, cu_seqlens: torch.Tensor | None = None,
                      config: LinearConfig | None = None) -> torch.Tensor:
    """The residual linear attention by subtraction, differentiable in phi_q, phi_k, v and sel.

    Args:
        phi_q [B, N, Hq, F], phi_k [B, N, Hkv, F], v [B, N, Hkv, Dv]: one dtype (bf16, fp16 or fp32), F and
            Dv <= 128.
        sel: float32 [B, N, Hq, Dv (+1 with normalize or return_normalizer)], the selected part with its
            normalizer column (``sparse_attention_with_selected_linear``).
        nonempty: bool [B, Hkv, N], token i has a causal key outside its selection (``has_unselected_keys``).
        normalize, return_normalizer, eps, cu_seqlens: as for ``spla_lit.ops.residual_linear_attention``.
        config: tiles (None: the per-device table, ``spla_kernels.config``).

    Returns: float32 [B, N, Hq, Dv] ([.., Dv + 1] = [num, den] with return_normalizer).
    Raises NotImplementedError for shapes or dtypes these kernels do not cover, or a GPU without table tiles
    (the caller falls back).
    """
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError("phi_q, phi_k and v must be [B, N, H, D]")
    B, N, Hq, F = phi_q.shape
    Hkv, Dv = phi_k.shape[2], v.shape[3]
    if not (phi_q.dtype == phi_k.dtype == v.dtype) or phi_q.dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
        raise NotImplementedError(f"dtypes {phi_q.dtype}, {phi_k.dtype}, {v.dtype}")
    if F > 128 or Dv > 128:
        raise NotImplementedError(f"feature dim {F} or value dim {Dv} > 128")
    mode = "pair" if return_normalizer else ("norm" if normalize else "sub")
    dvs = Dv + (mode != "sub")
    if tuple(sel.shape) != (B, N, Hq, dvs) or tuple(nonempty.shape) != (B, Hkv, N):
        raise ValueError(f"sel {tuple(sel.shape)} / nonempty {tuple(nonempty.shape)} do not match "
                         f"[{B}, {N}, {Hq}, {dvs}] / [{B}, {Hkv}, {N}]")
    keep = nonempty.transpose(1, 2).to(torch.uint8).contiguous().view(B * N, Hkv)
    config = config or linear_config(arch_of(phi_q.device), dtype=phi_q.dtype)
    return _SubtractResidual.apply(phi_q, phi_k, v, sel.float(), keep, cu_seqlens, mode, float(eps), config)

