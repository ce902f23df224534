"""A decoder-only language model (RMSNorm, RoPE, SwiGLU, GQA) whose attention layer is pluggable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    def forward(self, x: torch.Tensor, rope, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Decoder-only LM. ``attention`` is a factory called once per layer with
    ``(d_model, n_heads, n_kv_heads, head_dim, layer_idx)`` (a Hydra ``_partial_`` config).

    The MLP's hidden width is ``mlp_hidden`` when given (exact, e.g. a pretrained checkpoint's intermediate
    size), else ``mlp_ratio * d_model`` rounded up to a multiple of ``mlp_multiple_of``. ``rope_scaling``: see
    :func:`spla_lit.layers.rope.rope_inv_freq` (None: plain RoPE with ``rope_theta``).

    forward: input_ids [B, N] (and optional ``cu_seqlens`` for packed rows, B == 1) -> logits [B, N, vocab].
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

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
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
