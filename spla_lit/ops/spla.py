"""SPLA in one call: block scores, selection, exact sparse attention and the residual linear attention."""

from __future__ import annotations

import torch

from ..options import COMBINES, RLA_MODES, check_choice
from ._checks import check_qk, check_values
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
from .sparse_attention import acc_dtype, block_sparse_attention


def combine_add(o_sparse: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | float) -> torch.Tensor:
    """``o = o_sparse + gate * r``. o_sparse, residual: [B, N, Hq, Dv]; gate: scalar or [B, N, Hq]."""
    if isinstance(gate, torch.Tensor):
        gate = gate[..., None]
    dt = acc_dtype(o_sparse)
    return (o_sparse.to(dt) + gate * residual.to(dt)).to(o_sparse.dtype)


def combine_joint(o_sparse: torch.Tensor, lse: torch.Tensor, num_den: torch.Tensor) -> torch.Tensor:
    """Normalise the sparse and residual parts together (Scatterbrain-style)::

        o = (sum_sel e^s v + num) / (sum_sel e^s + den) = (o_sparse + w num) / (1 + w den),  w = e^-lse

    o_sparse [B, N, Hq, Dv]; lse [B, Hq, N]; num_den [B, N, Hq, Dv + 1] (numerator, then denominator).
    """
    dt = acc_dtype(o_sparse)
    w = torch.exp(-lse.to(dt).clamp_min(-60.0)).transpose(1, 2)[..., None]  # [B, N, Hq, 1]
    num, den = num_den[..., :-1].to(dt), num_den[..., -1:].to(dt)
    out = (o_sparse.to(dt) + w * num) / (1 + w * den.clamp_min(0))
    return out.to(o_sparse.dtype)


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact sparse attention and the residual linear attention (by subtraction) on one selection.

    Returns ``(o_sparse [B, N, Hq, Dv] in q's dtype, lse [B, Hq, N] float32 or None without return_lse,
    residual float32)`` as :func:`block_sparse_attention` and :func:`residual_linear_attention` would.
    On CUDA one Triton kernel computes the sparse output and the selected-linear term from the same K/V tiles.
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    check_values(v, k)
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
                                 scale=scale, return_lse=return_lse, cu_seqlens=cu_seqlens, impl=impl)
    o, lse = out if return_lse else (out, None)
    residual = residual_linear_attention(phi_q, phi_k, v, block_idx, block_size=block_size, query_block=query_block,
                                         normalize=normalize, return_normalizer=return_normalizer,
                                         cu_seqlens=cu_seqlens, impl=impl)
    return o, lse, residual


def spla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    topk: int = 16,
    query_block: int = 1,
    local_blocks: int = 1,
    sink_blocks: int = 0,
    scorer: str = "taylor2",
    covariance: str = "diag",
    rank: int = 4,
    head_reduce: str = "lse",
    scale: float | None = None,
    generator: torch.Generator | None = None,
    block_idx: torch.Tensor | None = None,
    rla: str = "subtract",
    feature_map: str = "elu1",
    normalize: bool = True,
    combine: str = "add",
    gate: torch.Tensor | float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    return_aux: bool = False,
):
    """SPLA attention, for use outside Lightning.

    Args:
        q: [B, N, Hq, D]; k: [B, N, Hkv, D]; v: [B, N, Hkv, Dv]. float32 or bfloat16 (float64 for checks).
        block_size, topk, query_block, local_blocks, sink_blocks: the selection (see :func:`select_blocks`).
        scorer, covariance, rank, head_reduce, scale, generator: the block scorer (see :func:`block_scores`).
        block_idx: a precomputed selection [B, Hkv, nQ, topk]; skips scoring.
        rla: ``subtract`` (residual by subtraction), ``explicit`` (reads the unselected blocks; reference)
            or ``none`` (pure block-sparse attention).
        feature_map: elu1 | relu | softmax | identity | taylor, applied to q and k for the residual.
        normalize: with ``combine=add``, divide the residual by its normalizer.
        combine: ``add`` (``o_sparse + gate * r``) or ``joint`` (one normalisation for both parts).
        gate: scalar or [B, N, Hq] weight of the residual for ``combine=add``.
        cu_seqlens: int [S + 1] boundaries of sequences packed in one row (B == 1, query_block == 1).

    Returns:
        o [B, N, Hq, Dv] in q's dtype; with ``return_aux`` also a dict with ``block_idx``, ``o_sparse``,
        ``lse`` and ``residual`` (None without RLA).
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    check_values(v, k)
    check_choice("rla", rla, RLA_MODES)
    check_choice("combine", combine, COMBINES)
    phi = get_feature_map(feature_map)
    if isinstance(gate, torch.Tensor) and tuple(gate.shape) != (B, N, Hq):
        raise ValueError(f"gate must be a float or a [B, N, Hq] = [{B}, {N}, {Hq}] tensor, "
                         f"got shape {tuple(gate.shape)}")
    if block_idx is None:
        block_idx = score_and_select(q, k, block_size=block_size, topk=topk, query_block=query_block,
                                     local_blocks=local_blocks, sink_blocks=sink_blocks, scorer=scorer,
                                     covariance=covariance, rank=rank, head_reduce=head_reduce, scale=scale,
                                     generator=generator, cu_seqlens=cu_seqlens, impl=impl)
    residual = None
    shared = dict(block_size=block_size, query_block=query_block, cu_seqlens=cu_seqlens)
    if rla == "subtract":
        o_sparse, lse, residual = sparse_attention_with_residual(
            q, k, v, phi(q), phi(k), block_idx, scale=scale, normalize=normalize,
            return_normalizer=combine == "joint", return_lse=combine == "joint" or return_aux, impl=impl, **shared)
    else:
        o_sparse, lse = block_sparse_attention(q, k, v, block_idx, scale=scale, return_lse=True, impl=impl, **shared)
        if rla == "explicit":
            residual = explicit_residual_linear_attention(phi(q), phi(k), v, block_idx, normalize=normalize,
                                                          return_normalizer=combine == "joint", **shared)
    out = o_sparse
    if residual is not None:
        out = combine_add(o_sparse, residual, gate) if combine == "add" else combine_joint(o_sparse, lse, residual)
    if return_aux:
        return out, {"block_idx": block_idx, "o_sparse": o_sparse, "lse": lse, "residual": residual}
    return out
