"""RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.spla import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learnable gain (computed in float32; see
    :func:`spla_lit.ops.rms_norm`, which the SPLA op applies to its residual with this module's weight)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
