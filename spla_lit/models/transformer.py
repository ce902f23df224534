"""A decoder-only language model (RMSNorm, RoPE, SwiGLU, GQA) whose attention layer is pluggable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..inference.cache import KVCache, LayerCache, LayerCacheSpec
from ..layers.norm import RMSNorm
from ..layers.rope import RotaryEmbedding
from ..ops.utils import positions_in_sequence
from ..options import check_positive_int


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, attention: nn.Module, mlp_hidden: int, norm_eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = attention
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor, rope, cu_seqlens: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None:
            x = x + self.attn(self.attn_norm(x), rope, cu_seqlens)
        else:
            x = x + self.attn.decode(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Decoder-only LM. ``attention`` is a factory called once per layer with
    ``(d_model, n_heads, n_kv_heads, head_dim, layer_idx)`` (a Hydra ``_partial_`` config).

    The MLP's hidden width is ``mlp_hidden`` when given (exact, e.g. a pretrained checkpoint's intermediate
    size), else ``mlp_ratio * d_model`` rounded up to a multiple of ``mlp_multiple_of``. ``rope_scaling``: see
    :func:`spla_lit.layers.rope.rope_inv_freq` (None: plain RoPE with ``rope_theta``).

    forward: input_ids [B, N] (and optional ``cu_seqlens`` for packed rows, B == 1) -> logits [B, N, vocab].
    With ``cache=`` (:meth:`new_cache`) the ids are the next tokens of each row of the cache: see :meth:`forward`.
    :meth:`generate` decodes (``spla_lit.inference``).
    """

    def __init__(self, vocab_size: int, attention: Callable[..., nn.Module], d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, n_kv_heads: int = 2, head_dim: int | None = None, mlp_ratio: float = 8 / 3,
                 mlp_multiple_of: int = 32, mlp_hidden: int | None = None, rope_theta: float = 10000.0,
                 rope_scaling: Mapping[str, Any] | None = None, norm_eps: float = 1e-6, tie_embeddings: bool = True,
                 init_std: float = 0.02, activation_checkpointing: bool = False) -> None:
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                            ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)]:
            check_positive_int(f"model.{name}", value)
        if n_heads % n_kv_heads:
            raise ValueError(f"model.n_heads ({n_heads}) must be a multiple of model.n_kv_heads ({n_kv_heads})")
        head_dim = head_dim or d_model // n_heads
        if mlp_hidden is None:
            hidden = int(mlp_ratio * d_model)
            hidden = mlp_multiple_of * -(-hidden // mlp_multiple_of)
        else:
            hidden = check_positive_int("model.mlp_hidden", mlp_hidden)
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_hidden = n_heads, n_kv_heads, head_dim, hidden
        self.norm_eps, self.tie_embeddings = norm_eps, tie_embeddings
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rope = RotaryEmbedding(head_dim, rope_theta, rope_scaling)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, attention(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                                head_dim=head_dim, layer_idx=i), hidden, norm_eps)
            for i in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(init_std)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, std: float) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not getattr(m, "zero_init", False):
                # Scale output projections by depth (GPT-2) so the residual stream stays O(1).
                s = std / (2 * self.n_layers) ** 0.5 if name.endswith(("wo", "w_down")) else std
                nn.init.normal_(m.weight, std=s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, N] -> logits [B, N, vocab].

        ``cache``: a :class:`~spla_lit.inference.KVCache` of this model (:meth:`new_cache`). ``input_ids [B, T]`` are
        then the next T tokens of every row (a prompt or a chunk of it, or one decoded token), at positions that
        continue from each row's length; the cache is updated in place (``ValueError`` and no change for a row
        past ``max_seq_len``, another batch size or another model's cache). The logits equal those of one
        forward pass over each row's whole sequence (to rounding).
        """
        if cache is not None:
            return self._forward_cached(input_ids, cu_seqlens, cache)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        positions = (torch.arange(n, device=input_ids.device) if cu_seqlens is None
                     else positions_in_sequence(cu_seqlens, n))
        rope = self.rope.cos_sin(positions)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, rope, cu_seqlens)
        return self.lm_head(self.norm(x))

    def _forward_cached(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: KVCache, *,
                        last_only: bool = False) -> torch.Tensor:
        """The cached forward; ``last_only``: logits of each row's last new token only, [B, 1, vocab] (a long
        prompt's prefill never holds [B, T, vocab] logits)."""
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: packed rows cannot be decoded with a cache (one sequence per row)")
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache from model.new_cache, got {type(cache).__name__}")
        cache.check(self, input_ids)
        T = input_ids.shape[1]
        empty = cache.empty
        positions = cache.begin(T)
        # Whole prompts: the positions of a forward without cache (the same RoPE tables, bit for bit).
        rope = self.rope.cos_sin(torch.arange(T, device=input_ids.device) if empty else positions)
        x = self.embed(input_ids)
        try:
            for layer, layer_cache in zip(self.layers, cache.layers):
                x = layer(x, rope, cache=layer_cache)
        except BaseException:
            cache.invalidate()  # some layers hold the new tokens, others not
            raise
        cache.advance(T)
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))

    def cache_specs(self) -> list[LayerCacheSpec]:
        """What a KV cache keeps for each layer (``layer.attn.cache_spec()``)."""
        specs = []
        for i, layer in enumerate(self.layers):
            spec = getattr(layer.attn, "cache_spec", None)
            if spec is None:
                raise ValueError(f"layer {i}: {type(layer.attn).__name__} has no decode path (no cache_spec)")
            specs.append(spec())
        return specs

    def new_cache(self, batch_size: int, max_seq_len: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`~spla_lit.inference.KVCache` for ``batch_size`` rows of up to ``max_seq_len`` tokens
        (keys, values, block statistics and linear states, per layer as it needs). ``device`` / ``dtype``
        default to the model's parameters' (pass ``torch.bfloat16`` to decode under bf16 autocast)."""
        p = self.embed.weight
        return KVCache(self.cache_specs(), batch_size, max_seq_len, device=device or p.device, dtype=dtype or p.dtype,
                       owner=self)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, prompt_lengths=None,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
        """Prefill each row's prompt, then decode ``max_new_tokens`` tokens: LongTensor [B, max_new_tokens].

        See :func:`spla_lit.inference.generate` (prompt lengths per row, greedy at temperature 0, top-p
        sampling with ``generator``, rows stop at ``eos_token_id``; ``cuda_graph``: None = auto on CUDA).
        """
        from ..inference.generate import generate

        return generate(self, input_ids, max_new_tokens, prompt_lengths=prompt_lengths, temperature=temperature,
                        top_p=top_p, eos_token_id=eos_token_id, generator=generator, cuda_graph=cuda_graph)

    def attention_stats(self) -> dict[str, torch.Tensor]:
        """Mean over layers of each attention layer's last statistics (e.g. RLA gate, residual share)."""
        collected: dict[str, list[torch.Tensor]] = {}
        for layer in self.layers:
            for key, value in getattr(layer.attn, "stats", {}).items():
                collected.setdefault(key, []).append(value.float())
        return {key: torch.stack(values).mean() for key, values in collected.items()}

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
