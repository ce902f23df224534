"""Feature maps ``phi`` for the residual linear attention, applied per head to ``[..., D]`` vectors.

The names come from ``spla_lit.options.FEATURE_MAPS`` (the option list); :data:`FEATURE_MAPS` here maps each
to its function (tests/ops check that the keys are exactly that list).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import options
from ..options import POSITIVE_FEATURE_MAPS, check_choice  # noqa: F401  (re-exported)


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: positive, so the normalized form is well defined."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the head dimension (positive, sums to one)."""
    return torch.softmax(x if x.dtype == torch.float64 else x.float(), dim=-1).to(x.dtype)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def taylor(x: torch.Tensor) -> torch.Tensor:
    """Second-order Taylor features, D -> 1 + D + D^2, with ``phi(q) . phi(k) = 1 + s + s^2 / 2`` for
    ``s = q . k / sqrt(D)``: a positive estimate of ``exp(s)`` (useful with ``combine=joint``)."""
    d = x.shape[-1]
    x1 = x * d**-0.25
    x2 = (x1[..., :, None] * x1[..., None, :]).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x1, x2], dim=-1)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": elu1,
    "relu": relu,
    "softmax": softmax,
    "identity": identity,
    "taylor": taylor,
}


def feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up a feature map by name: elu1, relu, softmax, identity or taylor."""
    check_choice("feature_map", name, options.FEATURE_MAPS)
    return FEATURE_MAPS[name]


def feature_dim(name: str, head_dim: int) -> int:
    """Width F of ``feature_map(name)`` applied to ``head_dim``-wide vectors."""
    check_choice("feature_map", name, options.FEATURE_MAPS)
    return 1 + head_dim + head_dim * head_dim if name == "taylor" else head_dim
