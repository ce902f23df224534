"""Triton block-sparse attention fused with the selected-linear term of SPLA (entry points).

Layout ``[B, N, H, D]``; q ``Hq`` heads, k/v ``Hkv`` heads, query head h reads KV head ``h // G``.
``block_idx`` int ``[B, Hkv, nQ, topk]`` (ascending, -1 padded); token i uses row ``i // query_block``;
causal inside (key j only if ``j <= i``). ``cu_seqlens`` packs sequences (B == 1, query_block == 1) with
block indices local to each sequence.

Kernels (``sparse_fwd.py``, ``sparse_bwd.py``) read the bookkeeping of ``sparse_index.py``: the forward
and dQ passes group ``bq`` neighbouring tokens of a KV head (``bq * G`` tensor-core rows) over the union
of their selections, masked per token; dK/dV walk the transposed selection (tokens per unit) and add
into float32 buffers. All accumulation is float32.

Tiles come from the ``config`` argument or the per-device table (``config.py``; where the table has no
tiles for the GPU, the entry points raise NotImplementedError before launching). Each stage runs inside a
``torch.profiler.record_function`` range named ``spla_kernels.sparse: <stage>`` (free when no profiler
runs; the benchmark reads its per-stage breakdown from them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from spla_lit.ops.utils import next_pow2

from ._utils import interpreting
from .config import SparseConfig, arch_of, sparse_config
from .sparse_bwd import sparse_bwd_dkv_kernel, sparse_bwd_dq_kernel
from .sparse_fwd import sparse_fwd_kernel
from .sparse_index import Groups, Units, query_groups, token_units, transposed_items

__all__ = [
    "SparseConfig",
    "block_sparse_attention",
    "selected_linear_attention",
    "sparse_attention_with_selected_linear",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIM = 256


def _p2(x: int) -> int:
    return max(16, next_pow2(x))


def _tokens_per_group(rows: int, G: int) -> int:
    return max(1, min(16, rows // G))


@dataclass
class _Plan:
    """The bookkeeping of one call, kept for the backward: per-token unit lists, unit table, query groups."""

    B: int
    N: int
    Hkv: int
    G: int
    block_size: int
    tok_units: torch.Tensor
    units: Units
    groups: dict[int, Groups]

    def group(self, bq: int) -> Groups:
        if bq not in self.groups:
            self.groups[bq] = query_groups(self.tok_units, bq).with_starts(self.units.start)
        return self.groups[bq]


_LOG2E = 1.4426950408889634


def _common(D: int, F: int, DV: int, DVS: int, block_size: int, upcast: bool) -> dict:
    return dict(D=D, DV=DV, F=F, DVS=DVS, BD=_p2(D), BDV=_p2(DV), BF=_p2(F), BS=block_size,
                BSP=_p2(block_size), UPCAST=upcast)


class _FusedSparse(torch.autograd.Function):
    """(q, k, v, phi_q, phi_k) -> (o, lse, sel); parts switched off by ``sparse`` / ``selected``."""

    @staticmethod
    def forward(ctx, q, k, v, pq, pk, block_idx, cu_seqlens, block_size, query_block, scale, sparse, selected, norm,
                config):
        ctx.set_materialize_grads(False)
        B, N, Hkv, DV = v.shape
        ref = q if sparse else pq
        Hq = ref.shape[2]
        G = Hq // Hkv
        D = q.shape[-1] if sparse else 16
        F = pq.shape[-1] if selected else 16
        DVS = DV + 1 if norm else DV
        cfg = config or sparse_config(arch_of(v.device), fused=selected, dtype=v.dtype,
                                      dim=max(D if sparse else 0, F if selected else 0, DV), block_size=block_size)
        with record_function("spla_kernels.sparse: fwd index"):
            tok_units, units = token_units(block_idx, N, block_size, query_block, cu_seqlens)
            plan = _Plan(B, N, Hkv, G, block_size, tok_units, units, {})
            bq = _tokens_per_group(cfg.fwd_rows, G)
            grp = plan.group(bq)
        dev = v.device
        o = torch.empty(B, N, Hq, DV, dtype=ref.dtype, device=dev) if sparse else v.new_empty(0)
        lse = torch.empty(B, Hq, N, dtype=torch.float32, device=dev) if sparse else v.new_empty(0, dtype=torch.float32)
        sel = torch.empty(B, N, Hq, DVS, dtype=torch.float32, device=dev) if selected else v.new_empty(0)
        upcast = interpreting() and v.dtype != torch.float32
        ng = grp.count.shape[1]
        qq, kk = (q, k) if sparse else (v, v)  # placeholders for the parts switched off
        pqq, pkk = (pq, pk) if selected else (v, v)
        with record_function("spla_kernels.sparse: fwd kernel"):
            sparse_fwd_kernel[(ng, B * Hkv)](
                qq, kk, v, pqq, pkk, o, lse, sel,
                grp.start, grp.bits, grp.count,
                float(scale) * _LOG2E, N, ng, grp.units.shape[-1],
                HQ=Hq, HKV=Hkv, G=G, BQ=bq, BM=_p2(bq * G),
                SPARSE=sparse, SELECTED=selected, NORM=norm,
                num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
                **_common(D, F, DV, DVS, block_size, upcast),
            )
        ctx.save_for_backward(q, k, v, pq, pk, o, lse)
        ctx.plan, ctx.cfg = plan, cfg
        ctx.meta = (scale, sparse, selected, norm, D, F, DV, DVS)
        if not sparse:
            ctx.mark_non_differentiable(o, lse)
        if not selected:
            ctx.mark_non_differentiable(sel)
        return o, lse, sel

    @staticmethod
    def backward(ctx, do, dlse, dsel):
        q, k, v, pq, pk, o, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        scale, sparse, selected, norm, D, F, DV, DVS = ctx.meta
        sp = sparse and (do is not None or dlse is not None)
        sl = selected and dsel is not None
        if not (sp or sl):
            return (None,) * 14
        cfg = ctx.cfg
        B, N, Hkv, G = plan.B, plan.N, plan.Hkv, plan.G
        Hq = Hkv * G
        dev = v.device
        upcast = interpreting() and v.dtype != torch.float32
        common = _common(D, F, DV, DVS, plan.block_size, upcast)
        ph = v  # placeholder pointer for the parts switched off
        if sp:
            do = torch.zeros_like(o) if do is None else do.contiguous()
            dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
            dk = torch.zeros(k.shape, dtype=torch.float32, device=dev)
            delta = torch.empty(B, Hq, N, dtype=torch.float32, device=dev)
        else:
            do = dq = dk = delta = ph
        if sl:
            dsel = dsel.contiguous().float()
            dpq = torch.empty(pq.shape, dtype=pq.dtype, device=dev)
            dpk = torch.zeros(pk.shape, dtype=torch.float32, device=dev)
            dsel16 = torch.empty(B, N, Hq, DV, dtype=pq.dtype, device=dev)
            dnorm = torch.empty(B, Hq, N, dtype=torch.float32, device=dev) if norm else ph
        else:
            dsel = dpq = dpk = dsel16 = dnorm = ph
        dv = torch.zeros(v.shape, dtype=torch.float32, device=dev)
        qq, kk = (q, k) if sparse else (ph, ph)
        pqq, pkk = (pq, pk) if selected else (ph, ph)
        has_dlse = sp and dlse is not None
        dlse_t = dlse.contiguous() if has_dlse else ph
        qk_scale = float(scale) * _LOG2E

        with record_function("spla_kernels.sparse: bwd index (groups)"):
            bq = _tokens_per_group(cfg.dq_rows, G)
            grp = plan.group(bq)
        ng = grp.count.shape[1]
        with record_function("spla_kernels.sparse: bwd dq kernel"):
            sparse_bwd_dq_kernel[(ng, B * Hkv)](
                qq, kk, v, pqq, pkk, o if sp else ph, do, lse if sp else ph, dlse_t, dsel, delta, dsel16, dnorm,
                dq, dpq, grp.start, grp.bits, grp.count,
                qk_scale, float(scale), N, ng, grp.units.shape[-1],
                HQ=Hq, HKV=Hkv, G=G, BQ=bq, BM=_p2(bq * G),
                SPARSE=sp, SELECTED=sl, NORM=norm and sl, HAS_DLSE=has_dlse,
                num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, **common,
            )
        with record_function("spla_kernels.sparse: bwd index (items)"):
            items = transposed_items(plan.tok_units, plan.units, plan.block_size, cfg.window)
            n_items = int(items.seg.numel())
        common.pop("DVS")
        bt = _tokens_per_group(cfg.dkv_rows, G)
        with record_function("spla_kernels.sparse: bwd dkv kernel"):
            if n_items:
                sparse_bwd_dkv_kernel[(n_items,)](
                    qq, kk, v, pqq, pkk, do, lse if sp else ph, delta, dsel16, dnorm, dk, dv, dpk,
                    items.tokens, items.seg, items.off, items.length, plan.units.start, plan.units.end,
                    qk_scale, float(scale), N, plan.units.count,
                    HQ=Hq, HKV=Hkv, G=G, BT=bt, BM=_p2(bt * G),
                    SPARSE=sp, SELECTED=sl, NORM=norm and sl,
                    num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages, **common,
                )
        with record_function("spla_kernels.sparse: bwd casts"):
            grads = [None] * 14
            if sp:
                grads[0], grads[1] = dq, dk.to(k.dtype)
            if sl:
                grads[3], grads[4] = dpq, dpk.to(pk.dtype)
            grads[2] = dv.to(v.dtype)
        return tuple(grads)


def _check(name: str, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, N, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: the sparse kernels take float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] > _MAX_DIM:
        raise ValueError(f"{name}: head/feature dim {x.shape[-1]} > {_MAX_DIM} is not supported by the Triton "
                         "sparse kernels (e.g. the taylor feature map); use impl='reference'")
    if heads is not None and x.shape[2] != heads:
        raise ValueError(f"{name} has {x.shape[2]} heads, expected {heads}")
    return x.contiguous()


def _check_idx(block_idx: torch.Tensor, B: int, Hkv: int, N: int, query_block: int,
               cu_seqlens: torch.Tensor | None) -> None:
    nq = -(-N // query_block)
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, Hkv, nq):
        raise ValueError(f"block_idx must be [B, Hkv, nQ, topk] = [{B}, {Hkv}, {nq}, topk], "
                         f"got {tuple(block_idx.shape)}")
    if cu_seqlens is not None and (B != 1 or query_block != 1):
        raise ValueError("cu_seqlens needs B == 1 and query_block == 1")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *,
                           block_size: int, query_block: int, scale: float,
                           cu_seqlens: torch.Tensor | None = None,
                           config: SparseConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the selected blocks: (o [B, N, Hq, Dv] in q.dtype, lse [B, Hq, N] float32).
    Differentiable in q, k, v and lse. ``config``: tiles (None: the per-device table, ``spla_kernels.config``)."""
    q, k, v = _check("q", q), _check("k", k), _check("v", v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share one dtype")
    _check_idx(block_idx, q.shape[0], k.shape[2], q.shape[1], query_block, cu_seqlens)
    o, lse, _ = _FusedSparse.apply(q, k, v, None, None, block_idx, cu_seqlens, block_size, query_block, scale,
                                   True, False, False, config)
    return o, lse


def sparse_attention_with_selected_linear(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
    block_idx: torch.Tensor, *, block_size: int, query_block: int, scale: float, with_normalizer: bool,
    cu_seqlens: torch.Tensor | None = None, config: SparseConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPLA's fused kernel: from the same K/V tiles, the sparse softmax attention (o, lse) and
    ``sel_i = sum_{j in sel(i), j <= i} (phi_q_i . phi_k_j) [v_j, 1]``, float32 [B, N, Hq, Dv (+1)]
    (the extra channel, with ``with_normalizer``, is ``sum phi_q_i . phi_k_j``).
    phi_q [B, N, Hq, F], phi_k [B, N, Hkv, F] (F <= 256). Differentiable in all five inputs and lse.
    ``config``: tiles (None: the per-device table, ``spla_kernels.config``)."""
    q, k, v = _check("q", q), _check("k", k), _check("v", v)
    phi_q, phi_k = _check("phi_q", phi_q, q.shape[2]), _check("phi_k", phi_k, k.shape[2])
    if not (q.dtype == k.dtype == v.dtype == phi_q.dtype == phi_k.dtype):
        raise ValueError("q, k, v, phi_q, phi_k must share one dtype")
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError("phi_q and phi_k must have the same feature dim")
    _check_idx(block_idx, q.shape[0], k.shape[2], q.shape[1], query_block, cu_seqlens)
    return _FusedSparse.apply(q, k, v, phi_q, phi_k, block_idx, cu_seqlens, block_size, query_block, scale,
                              True, True, bool(with_normalizer), config)


def selected_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                              *, block_size: int, query_block: int, cu_seqlens: torch.Tensor | None = None,
                              config: SparseConfig | None = None) -> torch.Tensor:
    """``sum_{j in sel(i), j <= i} (phi_q_i . phi_k_j) v_j``, float32 [B, N, Hq, Dv]. Differentiable.
    ``config``: tiles (None: the per-device table, ``spla_kernels.config``)."""
    phi_q, phi_k, v = _check("phi_q", phi_q), _check("phi_k", phi_k), _check("v", v)
    if not (phi_q.dtype == phi_k.dtype == v.dtype):
        raise ValueError("phi_q, phi_k, v must share one dtype")
    _check_idx(block_idx, phi_q.shape[0], phi_k.shape[2], phi_q.shape[1], query_block, cu_seqlens)
    _, _, sel = _FusedSparse.apply(None, None, v, phi_q, phi_k, block_idx, cu_seqlens, block_size, query_block,
                                   1.0, False, True, False, config)
    return sel
