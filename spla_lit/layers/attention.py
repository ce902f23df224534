"""Attention layers (``nn.Module``) of the decoder: SPLA, dense softmax, and pure linear attention.

Each takes ``x [B, N, d_model]`` plus RoPE tables and returns ``[B, N, d_model]``. SPLA composes three
pluggable components built per layer from factories (Hydra ``_partial_`` configs): a scorer, the sparse
attention and, optionally, the residual linear attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.utils import sequence_ids
from ..options import check_positive_int
from .norm import RMSNorm
from .rope import apply_rotary


def _build(factory: Callable[..., nn.Module] | nn.Module | None, **kwargs) -> nn.Module | None:
    """Build a per-layer component from a factory, passing only the keyword arguments it accepts."""
    if factory is None or isinstance(factory, nn.Module):
        return factory
    target = getattr(factory, "func", factory)
    params = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return factory(**kwargs)


class _Projections(nn.Module):
    """q/k/v/o projections with GQA shapes; validates the head layout."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None, qk_norm: bool) -> None:
        super().__init__()
        check_positive_int("model.d_model", d_model)
        check_positive_int("model.n_heads", n_heads)
        check_positive_int("model.n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"model.n_heads ({n_heads}) must be a multiple of model.n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        check_positive_int("model.head_dim", self.head_dim)
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        B, N, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, N, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(B, N, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(B, N, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.wo(o.reshape(*o.shape[:2], -1))


class SPLAAttention(_Projections):
    """SPLA: exact attention on the top-k blocks chosen by ``scorer`` + residual linear attention (``rla``).

    With ``rla=None`` it is pure block-sparse attention (the ``model=sparse`` ablation).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 scorer: Callable[..., nn.Module] | nn.Module | None, sparse: Callable[..., nn.Module] | nn.Module,
                 rla: Callable[..., nn.Module] | nn.Module | None = None, qk_norm: bool = False,
                 layer_idx: int = 0) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm)
        self.sparse = _build(sparse, layer_idx=layer_idx)
        self.scorer = _build(scorer, layer_idx=layer_idx) if self.sparse.mode == "topk" else None
        self.rla = _build(rla, d_model=d_model, n_heads=n_heads, head_dim=self.head_dim, layer_idx=layer_idx)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        block_idx = self.sparse.select(q, k, self.scorer, cu_seqlens)
        if self.rla is None:
            o, _ = self.sparse(q, k, v, block_idx, cu_seqlens, return_lse=False)
            self.stats = {}
        else:
            o, self.stats = self.rla(x, q, k, v, block_idx, self.sparse, cu_seqlens)
        return self.out(o)


class DenseAttention(_Projections):
    """Dense causal softmax attention (``model=dense`` baseline), through SDPA."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 qk_norm: bool = False, layer_idx: int = 0) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        G = self.n_heads // self.n_kv_heads
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            n = x.shape[1]
            seq = sequence_ids(cu_seqlens, n)
            mask = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return self.out(o.transpose(1, 2))


class LinearAttention(_Projections):
    """Pure causal linear attention (``model=linear`` baseline): ``norm(phi(q)^T S_i / phi(q)^T z_i)``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 feature_map: str = "elu1", qk_norm: bool = False, layer_idx: int = 0) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm)
        if feature_map not in ops.feature_maps.POSITIVE_FEATURE_MAPS:
            raise ValueError(f"model.attention.feature_map must be one of "
                             f"{', '.join(ops.feature_maps.POSITIVE_FEATURE_MAPS)}, got {feature_map!r}")
        self.phi = ops.feature_map(feature_map)
        self.norm = RMSNorm(self.head_dim)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o = ops.causal_linear_attention(self.phi(q), self.phi(k), v1, cu_seqlens=cu_seqlens)
        o = o[..., :-1] / (o[..., -1:] + 1e-6)
        return self.out(self.norm(o.to(x.dtype)))
