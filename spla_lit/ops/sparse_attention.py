"""Exact softmax attention over selected key blocks (``docs/spla.md`` §3)."""

from __future__ import annotations

import torch

from ._checks import (
    check_block_idx,
    check_block_idx_values,
    check_cu_seqlens,
    check_qk,
    check_query_block,
    check_values,
)
from ._dispatch import run_kernel, use_triton
from .blocks import selected_key_mask
from .utils import acc_dtype, cdiv, group_heads, ungroup_heads


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under a dense bool mask [B, Hkv, N, N]. Returns (o [B, N, Hq, Dv] in the
    accumulation dtype, lse [B, Hq, N]). Rows must have at least one allowed key."""
    Hkv = k.shape[2]
    dt = acc_dtype(q)
    qh, kh, vh = group_heads(q, Hkv, dt), group_heads(k, Hkv, dt), group_heads(v, Hkv, dt)
    s = scale * qh @ kh.transpose(-1, -2)  # [B, Hkv, G, N, N]
    s = s.masked_fill(~mask[:, :, None], float("-inf"))
    lse = s.logsumexp(-1)
    o = torch.exp(s - lse[..., None]) @ vh
    B, _, G, N = lse.shape
    return ungroup_heads(o), lse.reshape(B, Hkv * G, N)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int,
    query_block: int = 1,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
):
    """Softmax attention of every query over the keys of its selected blocks, causal (``j <= i``).

    Args:
        q: [B, N, Hq, D]; k: [B, N, Hkv, D]; v: [B, N, Hkv, Dv].
        block_idx: int [B, Hkv, nQ, topk] from :func:`select_blocks` (ascending, -1 padded, unique);
            the diagonal block must be among them so every query sees at least itself.
        query_block: tokens per row of ``block_idx`` (1: one selection per token).
        cu_seqlens: int [S + 1] packed-sequence boundaries (B == 1): no attention across sequences;
            ``block_idx`` holds block indices local to each token's sequence.
        validate: check ``block_idx``'s values (range, ascending, -1 padding last; one host read); callers
            passing a selection from :func:`select_blocks` skip it.

    Returns:
        o [B, N, Hq, Dv] in q's dtype (accumulated in float32), and with ``return_lse`` the
        log-sum-exp of the scaled scores, float32 [B, Hq, N]. Differentiable in q, k, v (and lse).
        With every block selected this is dense causal attention.
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    v = check_values(v, k)
    check_query_block(query_block, block_size)
    check_block_idx(block_idx, batch=B, kv_heads=Hkv, num_q_blocks=cdiv(N, query_block), device=q.device)
    if validate:
        check_block_idx_values(block_idx, num_blocks=cdiv(N, block_size))
    scale = D**-0.5 if scale is None else scale
    segments = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, n=N, query_block=query_block)
    fast = None
    if use_triton(impl, "block_sparse_attention", q, k, v):
        fast = run_kernel(impl, "block_sparse_attention", q, k, v, block_idx, block_size=block_size,
                          query_block=query_block, scale=scale, cu_seqlens=cu_seqlens)
    if fast is not None:
        o, lse = fast
    elif segments is not None:
        parts = [block_sparse_attention(q[:, s:e], k[:, s:e], v[:, s:e], block_idx[:, :, s:e], block_size=block_size,
                                        scale=scale, return_lse=True, impl="reference", validate=False)
                 for s, e in segments]
        o, lse = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=2)
    else:
        mask = selected_key_mask(block_idx, N, block_size, query_block)
        if not return_lse:
            return _sdpa_masked(q, k, v, mask, scale)
        o, lse = masked_attention_reference(q, k, v, mask, scale)
        o = o.to(q.dtype)
        lse = lse.float() if q.dtype != torch.float64 else lse
    return (o, lse) if return_lse else o


def _sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention through fused SDPA when the log-sum-exp is not needed (several times faster on CPU)."""
    G = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if G > 1:
        kh, vh, mask = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1), mask.repeat_interleave(G, 1)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
