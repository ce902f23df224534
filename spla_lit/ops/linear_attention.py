"""Linear attention pieces of SPLA (``docs/spla.md`` §4).

The residual linear attention (RLA) of query i is linear attention over the causal keys its selection
left out. By subtraction it never reads them::

    r_i = phi_q_i^T S_i  -  sum_{j in sel(i), j <= i} (phi_q_i . phi_k_j) v_j,   S_i = sum_{j<=i} phi_k_j v_j^T

The first term is a chunked causal linear-attention scan (:func:`causal_linear_attention`), the second
touches only the selected blocks (:func:`selected_linear_attention`). Both accumulate in float32
because the subtraction cancels large terms. Feature maps are applied by the caller.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_block_idx,
    check_cu_seqlens,
    check_positive_int,
    check_qk,
    check_query_block,
    check_values,
)
from ._dispatch import run_kernel, use_triton
from .blocks import selected_causal_counts, selected_key_mask, union_tiles
from .utils import acc_dtype, cdiv, group_heads, ungroup_heads


def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """v [..., Dv] -> [..., Dv + 1]: the extra column carries the normalizer phi_q . sum phi_k."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *,
                            chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None,
                            impl: str = "auto") -> torch.Tensor:
    """``o_i = phi_q_i^T S_i`` with ``S_i = sum_{j <= i} phi_k_j v_j^T`` (one state per KV head).

    Args: phi_q [B, N, Hq, F]; phi_k [B, N, Hkv, F]; v [B, N, Hkv, Dv].
    cu_seqlens: packed-sequence boundaries (B == 1); the state restarts at each sequence.
    Returns: [B, N, Hq, Dv] in float32 (float64 for float64 input).
    Chunked scan: exact attention-like products inside each chunk, the running state between chunks.
    """
    B, N, Hq, Hkv, F = check_qk(phi_q, phi_k, q_name="phi_q", k_name="phi_k")
    v = check_values(v, phi_k, k_name="phi_k")
    check_positive_int("chunk_size", chunk_size)
    segments = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, n=N)
    if use_triton(impl, "causal_linear_attention", phi_q, phi_k, v):
        out = run_kernel(impl, "causal_linear_attention", phi_q, phi_k, v, cu_seqlens=cu_seqlens)
        if out is not None:
            return out
    if segments is not None:
        return torch.cat([causal_linear_attention(phi_q[:, s:e], phi_k[:, s:e], v[:, s:e], chunk_size=chunk_size,
                                                  impl="reference") for s, e in segments], dim=1)
    dt = acc_dtype(phi_q)
    C = min(chunk_size, N)
    nC = cdiv(N, C)
    pad = nC * C - N
    qh = torch.nn.functional.pad(group_heads(phi_q, Hkv, dt), (0, 0, 0, pad))  # [B, Hkv, G, Np, F]
    kh = torch.nn.functional.pad(phi_k.to(dt).transpose(1, 2), (0, 0, 0, pad))  # [B, Hkv, Np, F]
    vh = torch.nn.functional.pad(v.to(dt).transpose(1, 2), (0, 0, 0, pad))  # zero padding adds nothing
    G, Dv = qh.shape[2], vh.shape[-1]
    qc = qh.reshape(B, Hkv, G, nC, C, F)
    kc = kh.reshape(B, Hkv, nC, C, F)
    vc = vh.reshape(B, Hkv, nC, C, Dv)
    kv = kc.transpose(-1, -2) @ vc  # [B, Hkv, nC, F, Dv]
    state = torch.cumsum(kv, dim=2)
    state = torch.cat([torch.zeros_like(state[:, :, :1]), state[:, :, :-1]], dim=2)  # exclusive prefix
    inter = qc @ state[:, :, None]
    causal = torch.ones(C, C, dtype=torch.bool, device=phi_q.device).tril()
    intra = ((qc @ kc[:, :, None].transpose(-1, -2)) * causal) @ vc[:, :, None]
    o = (inter + intra).reshape(B, Hkv, G, nC * C, Dv)[..., :N, :]
    return ungroup_heads(o)


def _check_selection_args(phi_q, phi_k, v, block_idx, block_size: int, query_block: int,
                          cu_seqlens: torch.Tensor | None):
    """Validate the arguments shared by the selection-aware linear ops; return
    ``(B, N, Hq, Hkv, F, v, segments)`` (segments: packed-sequence bounds, or None)."""
    B, N, Hq, Hkv, F = check_qk(phi_q, phi_k, q_name="phi_q", k_name="phi_k")
    v = check_values(v, phi_k, k_name="phi_k")
    check_query_block(query_block, block_size)
    check_block_idx(block_idx, batch=B, kv_heads=Hkv, num_q_blocks=cdiv(N, query_block), device=phi_q.device)
    segments = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, n=N, query_block=query_block)
    return B, N, Hq, Hkv, F, v, segments


def selected_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                              block_idx: torch.Tensor, *, block_size: int, query_block: int = 1,
                              cu_seqlens: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """``sum_{j in sel(i), j <= i} (phi_q_i . phi_k_j) v_j``, reading only the selected blocks.

    Args: phi_q [B, N, Hq, F]; phi_k [B, N, Hkv, F]; v [B, N, Hkv, Dv]; block_idx [B, Hkv, nQ, topk].
    Returns: [B, N, Hq, Dv] in float32 (float64 for float64 input).
    The reference works on tiles of queries and gathers the union of their selected blocks (no block that
    none of them selected is read), masking per token: memory O(N * U * block_size), U the union size.
    """
    B, N, Hq, Hkv, F, v, segments = _check_selection_args(phi_q, phi_k, v, block_idx, block_size, query_block,
                                                          cu_seqlens)
    if use_triton(impl, "selected_linear_attention", phi_q, phi_k, v):
        out = run_kernel(impl, "selected_linear_attention", phi_q, phi_k, v, block_idx, block_size=block_size,
                         query_block=query_block, cu_seqlens=cu_seqlens)
        if out is not None:
            return out
    if segments is not None:
        return torch.cat([selected_linear_attention(phi_q[:, s:e], phi_k[:, s:e], v[:, s:e], block_idx[:, :, s:e],
                                                    block_size=block_size, impl="reference")
                          for s, e in segments], dim=1)
    dt = acc_dtype(phi_q)
    G, Dv = Hq // Hkv, v.shape[-1]
    nK, tile = cdiv(N, block_size), min(block_size, 64)
    nT = cdiv(N, tile)
    blocks, member = union_tiles(block_idx, N, block_size, query_block, tile)  # [B,Hkv,nT,U], [B,Hkv,nT,tile,U]
    U = blocks.shape[-1]
    kb = torch.nn.functional.pad(phi_k.to(dt).transpose(1, 2), (0, 0, 0, nK * block_size - N))
    vb = torch.nn.functional.pad(v.to(dt).transpose(1, 2), (0, 0, 0, nK * block_size - N))
    flat = (torch.arange(B * Hkv, device=phi_q.device).view(B, Hkv, 1, 1) * nK + blocks).reshape(-1)
    ku = kb.reshape(B * Hkv * nK, block_size, F).index_select(0, flat).view(B, Hkv, nT, U * block_size, F)
    vu = vb.reshape(B * Hkv * nK, block_size, Dv).index_select(0, flat).view(B, Hkv, nT, U * block_size, Dv)
    qt = torch.nn.functional.pad(phi_q.to(dt), (0, 0, 0, 0, 0, nT * tile - N))
    qt = qt.view(B, nT, tile, Hkv, G, F).permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, nT, tile * G, F)
    key_pos = (blocks[..., None] * block_size + torch.arange(block_size, device=phi_q.device)).flatten(-2)
    q_pos = torch.arange(nT * tile, device=phi_q.device).view(nT, tile, 1)
    keep = member.repeat_interleave(block_size, dim=-1) & (key_pos[:, :, :, None, :] <= q_pos)
    a = (qt @ ku.transpose(-1, -2)).view(B, Hkv, nT, tile, G, U * block_size) * keep[:, :, :, :, None, :]
    out = a.view(B, Hkv, nT, tile * G, U * block_size) @ vu  # [B, Hkv, nT, tile * G, Dv]
    out = out.view(B, Hkv, nT * tile, G, Dv)[:, :, :N]
    return out.transpose(1, 2).reshape(B, N, Hq, Dv)


def has_unselected_keys(block_idx: torch.Tensor, n: int, block_size: int, query_block: int = 1,
                        cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, Hkv, N]: token i has at least one causal key outside its selection."""
    if cu_seqlens is not None:
        segments = check_cu_seqlens(cu_seqlens, batch=block_idx.shape[0], n=n, query_block=query_block)
        return torch.cat([has_unselected_keys(block_idx[:, :, s:e], e - s, block_size) for s, e in segments], 2)
    counts = selected_causal_counts(block_idx, n, block_size, query_block)
    return counts < torch.arange(1, n + 1, device=block_idx.device)


def _finish_residual(r: torch.Tensor, nonempty: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """Zero the rows with no unselected key; with ``normalize`` divide by the last (normalizer) column."""
    B, N, Hq, _ = r.shape
    Hkv = nonempty.shape[1]
    keep = nonempty.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=2)[..., None]  # [B, N, Hq, 1]
    r = r * keep
    if not normalize:
        return r
    num, den = r[..., :-1], r[..., -1:]
    return num / (den.clamp_min(0) + eps)


def residual_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int,
    query_block: int = 1,
    normalize: bool = False,
    return_normalizer: bool = False,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Residual linear attention by subtraction: global causal linear attention minus the selected part.

    Args:
        phi_q: [B, N, Hq, F] feature-mapped queries; phi_k: [B, N, Hkv, F]; v: [B, N, Hkv, Dv].
        block_idx: [B, Hkv, nQ, topk] selection (as for :func:`block_sparse_attention`).
        normalize: divide by ``phi_q_i . (z_i - z_sel(i))`` (needs non-negative features).
        return_normalizer: return the unnormalized numerator with that denominator appended as an
            extra last channel, [B, N, Hq, Dv + 1] (for the joint combine); ignores ``normalize``.

    Returns:
        float32 [B, N, Hq, Dv] (float64 for float64 input). Exactly zero for tokens whose causal keys
        are all selected. Never reads an unselected block.
    """
    B, N, Hq, Hkv, F, v, _ = _check_selection_args(phi_q, phi_k, v, block_idx, block_size, query_block, cu_seqlens)
    if normalize or return_normalizer:
        v = _append_ones(v)
    glob = causal_linear_attention(phi_q, phi_k, v, cu_seqlens=cu_seqlens, impl=impl)
    sel = selected_linear_attention(phi_q, phi_k, v, block_idx, block_size=block_size,
                                    query_block=query_block, cu_seqlens=cu_seqlens, impl=impl)
    nonempty = has_unselected_keys(block_idx, N, block_size, query_block, cu_seqlens)
    return _finish_residual(glob - sel, nonempty, normalize and not return_normalizer, eps)


def explicit_residual_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int,
    query_block: int = 1,
    normalize: bool = False,
    return_normalizer: bool = False,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual computed directly over the unselected causal keys (reads every block, O(N^2)).

    Same signature and result as :func:`residual_linear_attention`: the check and cost reference
    (``rla=explicit``).
    """
    B, N, Hq, Hkv, F, v, segments = _check_selection_args(phi_q, phi_k, v, block_idx, block_size, query_block,
                                                          cu_seqlens)
    if segments is not None:
        return torch.cat([explicit_residual_linear_attention(
            phi_q[:, s:e], phi_k[:, s:e], v[:, s:e], block_idx[:, :, s:e], block_size=block_size,
            normalize=normalize, return_normalizer=return_normalizer, eps=eps) for s, e in segments], 1)
    if normalize or return_normalizer:
        v = _append_ones(v)
    dt = acc_dtype(phi_q)
    causal = torch.ones(N, N, dtype=torch.bool, device=phi_q.device).tril()
    unselected = causal & ~selected_key_mask(block_idx, N, block_size, query_block)  # [B, Hkv, N, N]
    qh, kh, vh = (group_heads(x, Hkv, dt) for x in (phi_q, phi_k, v))
    a = (qh @ kh.transpose(-1, -2)) * unselected[:, :, None]
    r = ungroup_heads(a @ vh)
    return _finish_residual(r, unselected.any(-1), normalize and not return_normalizer, eps)
