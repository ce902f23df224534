"""SPLA in one call (``docs/spla.md`` §1-5): block selection, exact sparse attention, the residual linear
attention and the combine step.

:func:`spla_attention` is the op; the model's layer (``spla_lit.layers.SPLAAttention``) only computes its
inputs (projections, RoPE, feature maps, gate) and calls it. The two steps a decode path needs on their own
are public too: :func:`~spla_lit.ops.score_and_select` (selection) and :func:`combine_residual` (combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import COMBINES, FEATURE_MAPS, IMPLS, RLA_MODES, Combine, FeatureMap, Impl, RLAMode, Selection
from ._checks import check_block_idx, check_block_idx_values, check_choice, check_qk, check_selection, check_values
from ._dispatch import run_kernel, use_triton
from .feature_maps import feature_map as get_feature_map
from .linear_attention import (
    _append_ones,
    _finish_residual,
    causal_linear_attention,
    explicit_residual_linear_attention,
    has_unselected_keys,
    residual_linear_attention,
)
from .selection import score_and_select
from .sparse_attention import block_sparse_attention
from .utils import acc_dtype, cdiv


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, accumulated in float32 (float64 stays
    float64), returned in ``x``'s dtype. The arithmetic of ``spla_lit.layers.RMSNorm``."""
    dt = acc_dtype(x)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    return y.to(x.dtype)


def _check_combine_args(shape: tuple[int, ...], combine: str, gate: object, norm_weight: object) -> None:
    """``gate`` and ``norm_weight`` as :func:`combine_residual` documents them; ``shape`` is o_sparse's
    ``[B, N, Hq, Dv]``."""
    if combine == "joint":
        for name, value in (("gate", gate), ("norm_weight", norm_weight)):
            if value is not None:
                raise ValueError(f"{name} applies to combine='add' only; combine='joint' normalises the sparse "
                                 "and residual parts together, without a gate or a norm")
        return
    B, N, Hq, Dv = shape
    if isinstance(gate, torch.Tensor):
        if tuple(gate.shape) != (B, N, Hq) or not gate.is_floating_point():
            raise ValueError(f"gate must be a float or a floating [B, N, Hq] = [{B}, {N}, {Hq}] tensor, "
                             f"got {gate.dtype} {tuple(gate.shape)}")
    elif gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float))):
        raise ValueError(f"gate must be a float or a [B, N, Hq] tensor, got {type(gate).__name__}")
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor)
                                    or tuple(norm_weight.shape) != (Dv,)):
        got = tuple(norm_weight.shape) if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__
        raise ValueError(f"norm_weight must be a [Dv] = [{Dv}] tensor (the residual RMSNorm's weight), got {got}")


def _combine(o_sparse: torch.Tensor, residual: torch.Tensor, combine: str, lse: torch.Tensor | None,
             gate: torch.Tensor | float | None, norm_weight: torch.Tensor | None,
             norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`combine_residual` and the residual's contribution ``o - o_sparse`` in the accumulation dtype."""
    dt = acc_dtype(o_sparse)
    o = o_sparse.to(dt)
    if combine == "joint":
        # o = (sum_sel e^s v + num) / (sum_sel e^s + den) = (o_sparse + w num) / (1 + w den),  w = e^-lse
        w = torch.exp(-lse.to(dt).clamp_min(-60.0)).transpose(1, 2)[..., None]  # [B, N, Hq, 1]
        num, den = residual[..., :-1].to(dt), residual[..., -1:].to(dt)
        out = ((o + w * num) / (1 + w * den.clamp_min(0))).to(o_sparse.dtype)
        return out, out.to(dt) - o
    # The norm returns the residual's dtype, like the RMSNorm module (bf16 when autocast produced a bf16 residual).
    r = (residual if norm_weight is None else rms_norm(residual, norm_weight, norm_eps)).to(dt)
    if gate is not None:
        r = (gate.to(dt)[..., None] if isinstance(gate, torch.Tensor) else gate) * r
    return (o + r).to(o_sparse.dtype), r


def combine_residual(
    o_sparse: torch.Tensor,
    residual: torch.Tensor,
    *,
    combine: Combine = "add",
    lse: torch.Tensor | None = None,
    gate: torch.Tensor | float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Combine the exact sparse output with the residual linear attention (``docs/spla.md`` §5).

    ``combine="add"``: ``o = o_sparse + gate * RMSNorm(r)``, the norm ``r / sqrt(mean(r^2) + norm_eps) *
    norm_weight`` over the channels (skipped when ``norm_weight`` is None; ``gate`` None means 1).
    ``combine="joint"``: one normalisation for both parts (Scatterbrain-style), ``phi(q).phi(k)`` read as an
    estimate of ``exp(s)``::

        o = (sum_sel e^s v + num) / (sum_sel e^s + den) = (o_sparse + w num) / (1 + w den),  w = e^-lse

    Args:
        o_sparse: [B, N, Hq, Dv] exact attention over the selected blocks.
        residual: float32 [B, N, Hq, Dv] (add), or [B, N, Hq, Dv + 1] numerator then normalizer (joint), as
            ``residual_linear_attention`` returns them (``normalize`` / ``return_normalizer``).
        lse: float32 [B, Hq, N] log-sum-exp of the sparse scores (joint only).
        gate: scalar or [B, N, Hq] weight of the residual (add only).
        norm_weight: [Dv] gain of the residual's RMSNorm (add only).

    Returns:
        o [B, N, Hq, Dv] in ``o_sparse``'s dtype, accumulated in float32 (float64 for float64).
    """
    check_choice("combine", combine, COMBINES)
    if not isinstance(o_sparse, torch.Tensor) or o_sparse.dim() != 4:
        raise ValueError("o_sparse must be a [B, N, Hq, Dv] tensor")
    want = o_sparse.shape[-1] + (combine == "joint")
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (*o_sparse.shape[:3], want):
        shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual must be [B, N, Hq, {'Dv + 1' if combine == 'joint' else 'Dv'}] = "
                         f"{[*o_sparse.shape[:3], want]} for combine={combine!r}, got {shape}")
    if combine == "joint":
        B, N, Hq, _ = o_sparse.shape
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, N):
            raise ValueError(f"lse must be a [B, Hq, N] = [{B}, {Hq}, {N}] tensor for combine='joint'")
    _check_combine_args(tuple(o_sparse.shape), combine, gate, norm_weight)
    return _combine(o_sparse, residual, combine, lse, gate, norm_weight, norm_eps)[0]


@dataclass
class SPLAAux:
    """What :func:`spla_attention` computed on the way (``return_aux=True``); tensors live in the graph.

    Attributes:
        block_idx: int32 [B, Hkv, nQ, k], the selection used.
        o_sparse: [B, N, Hq, Dv], exact attention over the selected blocks, in q's dtype.
        lse: float32 [B, Hq, N], log-sum-exp of the sparse scores, where it was computed (``combine="joint"``,
            or a Triton path that returns it anyway); else None.
        residual: float32 [B, N, Hq, Dv] (``Dv + 1`` with the normalizer column for ``combine="joint"``); None
            for ``rla="none"``.
        gate_abs: detached mean ``|gate|`` (``combine="add"`` with a gate); else None.
        residual_share: detached ``||o - o_sparse|| / (||o_sparse|| + ||o - o_sparse||)`` in float32, how much of
            the output the residual is; None for ``rla="none"``.
    """

    block_idx: torch.Tensor
    o_sparse: torch.Tensor
    lse: torch.Tensor | None
    residual: torch.Tensor | None
    gate_abs: torch.Tensor | None = None
    residual_share: torch.Tensor | None = None


def _kernel_residual(impl, phi_q, phi_k, v, sel, nonempty, normalize, return_normalizer, cu_seqlens):
    """``spla_kernels.subtract_residual`` (global linear attention with its normalizer column, minus
    ``sel``, and the residual epilogue, fused), or None when it is unavailable or declines the shapes
    (NotImplementedError) and ``impl`` is not a forced ``"triton"``."""
    return run_kernel(impl, "subtract_residual", phi_q, phi_k, v, sel, nonempty, normalize=normalize,
                      return_normalizer=return_normalizer, eps=1e-6, cu_seqlens=cu_seqlens)


def sparse_attention_with_residual(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int,
    query_block: int = 1,
    scale: float | None = None,
    normalize: bool = False,
    return_normalizer: bool = False,
    return_lse: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact sparse attention and the residual linear attention (by subtraction) on one selection.

    Returns ``(o_sparse [B, N, Hq, Dv] in q's dtype, lse [B, Hq, N] float32 or None without return_lse,
    residual float32)`` as :func:`block_sparse_attention` and :func:`residual_linear_attention` would.
    On CUDA one Triton kernel computes the sparse output and the selected-linear term from the same K/V tiles.
    ``validate`` checks ``block_idx``'s values first (see :func:`block_sparse_attention`).
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    check_values(v, k)
    if validate:
        check_block_idx(block_idx, batch=B, kv_heads=Hkv, num_q_blocks=cdiv(N, query_block), device=q.device)
        check_block_idx_values(block_idx, num_blocks=cdiv(N, block_size))
    with_den = normalize or return_normalizer
    fused = None
    if use_triton(impl, "sparse_attention_with_selected_linear", q, k, v, phi_q, phi_k):
        fused = run_kernel(impl, "sparse_attention_with_selected_linear", q, k, v, phi_q, phi_k, block_idx,
                           block_size=block_size, query_block=query_block, scale=D**-0.5 if scale is None else scale,
                           with_normalizer=with_den, cu_seqlens=cu_seqlens)
    if fused is not None:
        o, lse, sel = fused
        nonempty = has_unselected_keys(block_idx, N, block_size, query_block, cu_seqlens)
        residual = _kernel_residual(impl, phi_q, phi_k, v, sel, nonempty, normalize, return_normalizer, cu_seqlens)
        if residual is None:
            # (Computing the normalizer channel by a cumulative sum instead was measured 1.4x slower at 64K.)
            glob = causal_linear_attention(phi_q, phi_k, _append_ones(v) if with_den else v, cu_seqlens=cu_seqlens,
                                           impl=impl)
            residual = _finish_residual(glob - sel, nonempty, normalize and not return_normalizer, 1e-6)
        return o, lse, residual
    out = block_sparse_attention(q, k, v, block_idx, block_size=block_size, query_block=query_block,
                                 scale=scale, return_lse=return_lse, cu_seqlens=cu_seqlens, impl=impl, validate=False)
    o, lse = out if return_lse else (out, None)
    residual = residual_linear_attention(phi_q, phi_k, v, block_idx, block_size=block_size, query_block=query_block,
                                         normalize=normalize, return_normalizer=return_normalizer,
                                         cu_seqlens=cu_seqlens, impl=impl)
    return o, lse, residual


def _check_features(phi_q: object, phi_k: object, q: torch.Tensor, k: torch.Tensor) -> None:
    """Given feature maps: both or neither, ``[B, N, Hq, F]`` / ``[B, N, Hkv, F]`` beside q and k."""
    if phi_q is None and phi_k is None:
        return
    if phi_q is None or phi_k is None:
        raise ValueError("phi_q and phi_k must be given together (or neither: feature_map is applied to q and k)")
    check_qk(phi_q, phi_k, q_name="phi_q", k_name="phi_k")
    for name, phi, x, like in (("phi_q", phi_q, q, "q"), ("phi_k", phi_k, k, "k")):
        if phi.shape[:3] != x.shape[:3] or phi.device != x.device:
            raise ValueError(f"{name} must be [B, N, H] = {list(x.shape[:3])} on {x.device} like {like}, "
                             f"got {list(phi.shape[:3])} on {phi.device}")


def spla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    phi_q: torch.Tensor | None = None,
    phi_k: torch.Tensor | None = None,
    feature_map: FeatureMap = "elu1",
    rla: RLAMode = "subtract",
    normalize: bool = True,
    combine: Combine = "add",
    gate: torch.Tensor | float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    block_idx: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: Impl = "auto",
    return_aux: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SPLAAux]:
    """SPLA attention: exact attention over each token's selected key blocks plus linear attention over the
    blocks it left out (``docs/spla.md``). What ``SPLAAttention`` computes before its output projection.

    A stable entry point: the model's layer calls it with its own features, gate and norm weight, and the steps
    a decode path needs are the public :func:`~spla_lit.ops.score_and_select` and :func:`combine_residual`.

    Args:
        q: [B, N, Hq, D]; k: [B, N, Hkv, D]; v: [B, N, Hkv, Dv] (after RoPE). float32 or bfloat16 (float64
            for checks). ``Hq % Hkv == 0`` (grouped-query attention).
        selection: block geometry and scorer (:class:`~spla_lit.options.Selection`); ``mode="window"`` keeps
            only the local and sink blocks (a sliding window). ``selection.scale`` is also the softmax scale.
        phi_q, phi_k: feature-mapped q [B, N, Hq, F] and k [B, N, Hkv, F] for the residual; when both are None,
            ``feature_map`` (elu1 | relu | softmax | identity | taylor) is applied to q and k.
        rla: ``subtract`` (the residual by subtraction: never reads an unselected block), ``explicit`` (reads
            them; O(N^2) reference) or ``none`` (pure block-sparse attention: phi, gate, norm_weight unused
            and must be None).
        normalize: ``combine="add"``: divide the residual by its normalizer ``phi(q).(z_i - z_sel)``.
        combine: ``add`` (``o_sparse + gate * RMSNorm(r)``) or ``joint`` (one normalisation for both parts);
            see :func:`combine_residual`.
        gate: scalar or [B, N, Hq] weight of the residual (``combine="add"``; None means 1).
        norm_weight, norm_eps: the residual's RMSNorm before the gate (``combine="add"``; None: no norm).
        block_idx: a precomputed selection int [B, Hkv, nQ, k] (skips scoring), e.g. ``aux.block_idx``.
        generator: RNG of ``scorer="random"``.
        cu_seqlens: int [S + 1] boundaries of sequences packed in one row (B == 1, query_block == 1).
        impl: ``auto`` (Triton kernels on CUDA), ``reference`` (PyTorch) or ``triton``.

    Returns:
        o [B, N, Hq, Dv] in q's dtype; with ``return_aux`` also an :class:`SPLAAux` (selection, sparse output,
        residual, statistics). Differentiable in q, k, v, phi_q, phi_k, gate and norm_weight (the selection
        itself is discrete).
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    check_values(v, k)
    sel = check_selection(selection)
    check_choice("rla", rla, RLA_MODES)
    check_choice("combine", combine, COMBINES)
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_choice("impl", impl, IMPLS)
    if rla == "none":
        for name, value in (("phi_q", phi_q), ("phi_k", phi_k), ("gate", gate), ("norm_weight", norm_weight)):
            if value is not None:
                raise ValueError(f"{name} needs a residual; rla='none' is pure block-sparse attention")
    else:
        _check_features(phi_q, phi_k, q, k)
        _check_combine_args((B, N, Hq, v.shape[-1]), combine, gate, norm_weight)
    if block_idx is None:
        block_idx = score_and_select(q, k, sel, generator=generator, cu_seqlens=cu_seqlens, impl=impl)
    else:
        # a caller's selection is checked once here (one host read); the ops below skip it
        check_block_idx(block_idx, batch=B, kv_heads=Hkv, num_q_blocks=cdiv(N, sel.query_block), device=q.device)
        check_block_idx_values(block_idx, num_blocks=cdiv(N, sel.block_size))
    joint = combine == "joint" and rla != "none"  # (without a residual, nothing is combined)
    geometry = dict(block_size=sel.block_size, query_block=sel.query_block, cu_seqlens=cu_seqlens)
    residual = None
    if rla != "none" and phi_q is None:
        phi = get_feature_map(feature_map)
        phi_q, phi_k = phi(q), phi(k)
    if rla == "subtract":
        o_sparse, lse, residual = sparse_attention_with_residual(
            q, k, v, phi_q, phi_k, block_idx, scale=sel.scale, normalize=normalize, return_normalizer=joint,
            return_lse=joint, impl=impl, validate=False, **geometry)
    else:
        out = block_sparse_attention(q, k, v, block_idx, scale=sel.scale, return_lse=joint, impl=impl,
                                     validate=False, **geometry)
        o_sparse, lse = out if joint else (out, None)
        if rla == "explicit":
            residual = explicit_residual_linear_attention(phi_q, phi_k, v, block_idx, normalize=normalize,
                                                          return_normalizer=joint, **geometry)
    if residual is None:
        out, extra = o_sparse, None
    else:
        out, extra = _combine(o_sparse, residual, combine, lse, gate, norm_weight, norm_eps)
    if not return_aux:
        return out
    aux = SPLAAux(block_idx=block_idx, o_sparse=o_sparse, lse=lse, residual=residual)
    if extra is not None:
        with torch.no_grad():
            e, s = extra.detach().float().norm(), o_sparse.detach().float().norm()
            aux.residual_share = e / (s + e + 1e-12)
            if not joint and gate is not None:
                aux.gate_abs = (gate.detach().float().abs().mean() if isinstance(gate, torch.Tensor)
                                else torch.tensor(abs(float(gate))))
    return out, aux
