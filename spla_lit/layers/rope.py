"""Rotary position embeddings (RoPE), rotate-half convention, on [B, N, H, D] tensors; optional Llama-3
frequency scaling (``model.rope_scaling``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..options import ROPE_SCALINGS, check_choice

# The keys of a llama3 scaling (the names of Hugging Face's ``rope_scaling`` / ``rope_parameters``).
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``scaling`` as a plain dict, validated (``ValueError`` naming ``model.rope_scaling.<key>``); None stays None.

    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``: Llama 3.1's scaling. Other keys are refused.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"model.rope_scaling: expected a mapping with rope_type, got {scaling!r}")
    scaling = dict(scaling)
    check_choice("model.rope_scaling.rope_type", scaling.get("rope_type"), ROPE_SCALINGS)
    unknown = set(scaling) - {"rope_type", *LLAMA3_KEYS}
    if unknown:
        raise ValueError(f"model.rope_scaling: unknown key(s) {', '.join(sorted(unknown))}; a llama3 scaling has "
                         f"rope_type, {', '.join(LLAMA3_KEYS)}")
    for key in LLAMA3_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"model.rope_scaling.{key}: must be a number > 0, got {value!r}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"model.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must be larger than "
                         f"low_freq_factor ({scaling['low_freq_factor']})")
    return scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies float32 [head_dim // 2]: ``theta ** (-2i / head_dim)``, then the scaling if any.

    llama3: wavelengths ``2 pi / f`` shorter than ``original_max_position_embeddings / high_freq_factor`` are
    kept, those longer than ``original / low_freq_factor`` are stretched by ``factor``, and the band between
    blends the two linearly in ``original / wavelength`` (computed in float32, like the reference models).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaling = check_rope_scaling(scaling)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = (original / wavelen - low) / (high - low)  # 0 at the long-wavelength edge, 1 at the short one
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, out)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables on the fly (no max length) and applies them to queries and keys.
    ``scaling``: see :func:`rope_inv_freq` (None: plain RoPE)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"model.rope_theta: must be a number > 0, got {theta!r}")
        self.head_dim, self.theta, self.scaling = head_dim, float(theta), check_rope_scaling(scaling)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, self.scaling), persistent=False)

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        """Recompute :attr:`inv_freq` in place (a loader that built the module on the meta device, as
        transformers' ``from_pretrained`` does, must fill this non-persistent buffer)."""
        self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.theta, self.scaling))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, D] in float32."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"theta={self.theta:g}, scaling={self.scaling}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D]; cos, sin [N, D]."""
    d = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., d:], xf[..., :d]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)
