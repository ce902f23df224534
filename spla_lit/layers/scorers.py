"""Block scorers (config group ``scorer/``): how each token's key blocks are ranked."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..options import COVARIANCES, HEAD_REDUCTIONS, SCORERS, Selection, check_choice, check_positive_int


class BlockScorer(nn.Module):
    """The scorer part of a layer's :class:`~spla_lit.options.Selection` (``method`` is its ``scorer``:
    taylor2 | taylor1 | random | oracle), and the random scorer's generator.

    ``random`` draws from a generator seeded by ``(seed, layer_idx, training call count)``; the count is a
    buffer, so it is checkpointed and a resumed run draws the same selections as an uninterrupted one.
    In eval mode the count does not advance: evaluation is deterministic.
    """

    def __init__(self, method: str = "taylor2", covariance: str = "diag", rank: int = 4, head_reduce: str = "lse",
                 seed: int = 0, layer_idx: int = 0) -> None:
        super().__init__()
        self.method = check_choice("scorer.method", method, SCORERS)
        self.covariance = check_choice("scorer.covariance", covariance, COVARIANCES)
        self.rank = check_positive_int("scorer.rank", rank)
        self.head_reduce = check_choice("scorer.head_reduce", head_reduce, HEAD_REDUCTIONS)
        self.seed, self.layer_idx = int(seed), layer_idx
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def apply_to(self, geometry: Selection) -> Selection:
        """``geometry`` (a layer's block geometry) with this scorer's fields."""
        return replace(geometry, scorer=self.method, covariance=self.covariance, rank=self.rank,
                       head_reduce=self.head_reduce)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of this call (``random`` only; advances the call count in training), else None."""
        if self.method != "random":
            return None
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.seed, self.layer_idx, int(self.calls))) & 0x7FFF_FFFF_FFFF)
        if self.training:
            self.calls += 1
        return g

    def extra_repr(self) -> str:
        return f"method={self.method}, covariance={self.covariance}, head_reduce={self.head_reduce}"
