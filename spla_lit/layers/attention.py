"""Attention layers (``nn.Module``) of the decoder: SPLA, dense softmax, and pure linear attention.

Each takes ``x [B, N, d_model]`` plus RoPE tables and returns ``[B, N, d_model]``. SPLA composes three
pluggable components built per layer from factories (Hydra ``_partial_`` configs): a scorer, the block
geometry and, optionally, the residual linear attention; the computation is ``spla_lit.ops.spla_attention``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from ..inference.cache import LayerCache, LayerCacheSpec
from ..ops.utils import sequence_ids
from ..options import IMPLS, POSITIVE_FEATURE_MAPS, Selection, check_choice, check_positive_int
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
    """q/k/v/o projections with GQA shapes; validates the head layout. ``qkv_bias``: biases on the q, k and v
    projections (Qwen2's layout; the output projection never has one)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None, qk_norm: bool,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        check_positive_int("model.d_model", d_model)
        check_positive_int("model.n_heads", n_heads)
        check_positive_int("model.n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"model.n_heads ({n_heads}) must be a multiple of model.n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        check_positive_int("model.head_dim", self.head_dim)
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
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


@dataclass
class SPLARecord:
    """What one forward call of an :class:`SPLAAttention` layer computed, passed to its capture hooks.

    The tensors are the layer's own (in the autograd graph, not copies): a hook that keeps them should
    ``detach()`` them.

    Attributes:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], after RoPE, in the layer's dtype.
        phi_q, phi_k: the residual's features [B, N, Hq | Hkv, F]; gate: [B, N, Hq] (``combine=add``); None
            where the layer has no such input.
        block_idx: int32 [B, Hkv, nQ, k], the selection used.
        o_sparse: [B, N, Hq, D], exact attention over the selected blocks.
        out: [B, N, Hq, D], the attention output before the output projection (``o_sparse`` plus the
            residual; ``o_sparse`` itself without one).
        cu_seqlens: packed-sequence boundaries of the call, or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_q: torch.Tensor | None
    phi_k: torch.Tensor | None
    gate: torch.Tensor | None
    block_idx: torch.Tensor
    o_sparse: torch.Tensor
    out: torch.Tensor
    cu_seqlens: torch.Tensor | None


CaptureHook = Callable[["SPLAAttention", SPLARecord], None]


class SPLAAttention(_Projections):
    """SPLA: exact attention on the key blocks chosen by the selection + residual linear attention (``rla``).

    A thin wrapper over :func:`spla_lit.ops.spla_attention`: the layer computes q, k, v (+ RoPE) and, with a
    residual, its features, gate(x) and RMSNorm weight, and the op does the rest. Components (Hydra
    ``_partial_`` factories, built per layer): ``sparse`` (:class:`BlockSparseAttention`, the block geometry),
    ``scorer`` (:class:`BlockScorer`; unused with ``sparse.mode=window``) and ``rla``
    (:class:`ResidualLinearAttention`, or None: pure block-sparse attention, ``rla=none``). Together they make
    :attr:`selection`. ``impl``: auto | reference | triton, for every op of the layer.

    :attr:`stats` holds the last forward's residual statistics (``rla/gate_abs``, ``rla/residual_share``).
    :meth:`register_capture_hook` gives hooks an :class:`SPLARecord` of every forward (``spla_lit.eval.capture``).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 scorer: Callable[..., nn.Module] | nn.Module | None, sparse: Callable[..., nn.Module] | nn.Module,
                 rla: Callable[..., nn.Module] | nn.Module | None = None, qk_norm: bool = False,
                 qkv_bias: bool = False, layer_idx: int = 0, impl: str = "auto") -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm, qkv_bias)
        self.sparse = _build(sparse, layer_idx=layer_idx)
        self.scorer = _build(scorer, layer_idx=layer_idx) if self.sparse.mode == "topk" else None
        if self.sparse.mode == "topk" and self.scorer is None:
            raise ValueError("sparse.mode=topk needs a scorer")
        self.rla = _build(rla, d_model=d_model, n_heads=n_heads, head_dim=self.head_dim, layer_idx=layer_idx)
        self.impl = check_choice("impl", impl, IMPLS)
        geometry = self.sparse.selection
        self.selection: Selection = geometry if self.scorer is None else self.scorer.apply_to(geometry)
        self.stats: dict[str, torch.Tensor] = {}
        self._capture_hooks: dict[int, CaptureHook] = OrderedDict()

    def register_capture_hook(self, hook: CaptureHook) -> RemovableHandle:
        """Call ``hook(layer, record)`` with an :class:`SPLARecord` after every forward until the returned
        handle's ``remove()``. Nothing is recorded while no hook is registered."""
        handle = RemovableHandle(self._capture_hooks)
        self._capture_hooks[handle.id] = hook
        return handle

    def _inputs(self, x: torch.Tensor, rope) -> tuple:
        """q, k, v, the op's residual keyword arguments and the scorer's generator for layer input x."""
        q, k, v = self.qkv(x, rope)
        residual = {"rla": "none"} if self.rla is None else self.rla.op_inputs(x, q, k)
        generator = None if self.scorer is None else self.scorer.generator(q.device)
        return q, k, v, residual, generator

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, d_model] -> [B, N, d_model]; rope: (cos, sin) tables; cu_seqlens: packed rows (B == 1)."""
        q, k, v, residual, generator = self._inputs(x, rope)
        o, aux = ops.spla_attention(q, k, v, self.selection, generator=generator, cu_seqlens=cu_seqlens,
                                    impl=self.impl, return_aux=True, **residual)
        self.stats = {key: value for key, value in (("rla/gate_abs", aux.gate_abs),
                                                    ("rla/residual_share", aux.residual_share)) if value is not None}
        if self._capture_hooks:
            record = SPLARecord(q=q, k=k, v=v, phi_q=residual.get("phi_q"), phi_k=residual.get("phi_k"),
                                gate=residual.get("gate"), block_idx=aux.block_idx, o_sparse=aux.o_sparse, out=o,
                                cu_seqlens=cu_seqlens)
            for hook in list(self._capture_hooks.values()):
                hook(self, record)
        return self.out(o)

    def cache_spec(self) -> LayerCacheSpec:
        """What the KV cache keeps for this layer: keys and values, the scorer's block statistics (taylor
        scorers) and the linear state (``rla=subtract``)."""
        sel = self.selection
        if sel.query_block != 1:
            raise ValueError(f"sparse.query_block={sel.query_block}: a layer that shares one selection per query "
                             "block cannot decode token by token (its selection is not a function of the past)")
        scored = sel.mode == "topk" and sel.scorer in ("taylor1", "taylor2")
        state = self.rla is not None and self.rla.mode == "subtract"
        return LayerCacheSpec(kv_heads=self.n_kv_heads, head_dim=self.head_dim, value_dim=self.head_dim,
                              block_size=sel.block_size if scored else None,
                              covariance=sel.covariance if scored and sel.scorer == "taylor2" else None,
                              rank=sel.rank,
                              state_dim=ops.feature_dim(self.rla.feature_map_name, self.head_dim) if state else None)

    def decode(self, x: torch.Tensor, rope, cache: LayerCache) -> torch.Tensor:
        """x [B, T, d_model], the next T tokens of every row of ``cache`` -> [B, T, d_model]; updates ``cache``.

        An empty cache (whole prompts) runs the training op (``ops.spla_attention``: Triton on CUDA); a non-empty
        one ``ops.spla_decode``, which reads the statistics, the state and the selected blocks only. Capture
        hooks and :attr:`stats` are not fed while decoding.
        """
        q, k, v, residual, generator = self._inputs(x, rope)
        if cache.empty:
            o = ops.spla_attention(q, k, v, self.selection, generator=generator, impl=self.impl, **residual)
            cache.append(k, v, residual.get("phi_k"), impl=self.impl)
            return self.out(o)
        cache.append(k, v, residual.get("phi_k"), impl=self.impl)
        kc, vc = cache.keys_values()
        residual.pop("recompute_features", None)  # a training-op argument (op_inputs serves both)
        residual.setdefault("feature_map", self.rla.feature_map_name if self.rla is not None else "elu1")
        o = ops.spla_decode(q, kc, vc, cache.positions, self.selection, block_stats=cache.block_stats,
                            state=cache.state, generator=generator, impl=self.impl, **residual)
        return self.out(o)

    def extra_repr(self) -> str:
        return f"impl={self.impl}"


class DenseAttention(_Projections):
    """Dense causal softmax attention (``model=dense`` baseline), through SDPA."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 qk_norm: bool = False, qkv_bias: bool = False, layer_idx: int = 0) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm, qkv_bias)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        return self.out(self._attend(q, k, v, cu_seqlens))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None
                ) -> torch.Tensor:
        G = self.n_heads // self.n_kv_heads
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            n = q.shape[1]
            seq = sequence_ids(cu_seqlens, n)
            mask = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return o.transpose(1, 2)

    def cache_spec(self) -> LayerCacheSpec:
        """The KV cache keeps this layer's keys and values."""
        return LayerCacheSpec(kv_heads=self.n_kv_heads, head_dim=self.head_dim, value_dim=self.head_dim)

    def decode(self, x: torch.Tensor, rope, cache: LayerCache) -> torch.Tensor:
        """x [B, T, d_model], the next T tokens of every row of ``cache`` -> [B, T, d_model]; updates ``cache``."""
        q, k, v = self.qkv(x, rope)
        cache.append(k, v)
        if cache.empty:  # whole prompts: the training path
            return self.out(self._attend(q, k, v, None))
        kc, vc = cache.keys_values()
        # One token per row, every row as long (host lengths): no mask, SDPA's flash kernel.
        positions = None if cache.uniform_step else cache.positions
        return self.out(ops.dense_decode(q, kc, vc, positions))


class LinearAttention(_Projections):
    """Pure causal linear attention (``model=linear`` baseline): ``norm(phi(q)^T S_i / phi(q)^T z_i)``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None, *,
                 feature_map: str = "elu1", qk_norm: bool = False, qkv_bias: bool = False,
                 layer_idx: int = 0) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qk_norm, qkv_bias)
        check_choice("model.attention.feature_map", feature_map, POSITIVE_FEATURE_MAPS)
        self.phi = ops.feature_map(feature_map)
        self.norm = RMSNorm(self.head_dim)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        return self._finish(ops.causal_linear_attention(self.phi(q), self.phi(k), v1, cu_seqlens=cu_seqlens), x.dtype)

    def _finish(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Numerator / normaliser (the last channel), the norm and the output projection."""
        o = o[..., :-1] / (o[..., -1:] + 1e-6)
        return self.out(self.norm(o.to(dtype)))

    def cache_spec(self) -> LayerCacheSpec:
        """The KV cache keeps only this layer's state ``sum phi(k) [v, 1]^T`` (no keys or values)."""
        return LayerCacheSpec(kv_heads=self.n_kv_heads, head_dim=self.head_dim, value_dim=self.head_dim, keys=False,
                              state_dim=self.head_dim)

    def decode(self, x: torch.Tensor, rope, cache: LayerCache) -> torch.Tensor:
        """x [B, T, d_model], the next T tokens of every row of ``cache`` -> [B, T, d_model]; updates ``cache``."""
        q, k, v = self.qkv(x, rope)
        phi_q, phi_k = self.phi(q), self.phi(k)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        cache.append(None, v, phi_k)
        if cache.empty:
            return self._finish(ops.causal_linear_attention(phi_q, phi_k, v1), x.dtype)
        return self._finish(ops.decode_linear_attention(phi_q, cache.state, phi_k=phi_k, v=v1), x.dtype)
