"""Block scorers: pluggable components (config group ``scorer/``) that choose each token's key blocks."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..options import COVARIANCES, HEAD_REDUCTIONS, SCORERS, check_choice, check_positive_int


class BlockScorer(nn.Module):
    """Scores key blocks with ``method`` (taylor2 | taylor1 | random | oracle) and selects the top-k.

    ``random`` draws from a generator seeded by ``(seed, layer_idx, training call count)``; the count is a
    buffer, so it is checkpointed and a resumed run draws the same selections as an uninterrupted one.
    In eval mode the count does not advance: evaluation is deterministic.
    """

    def __init__(self, method: str = "taylor2", covariance: str = "diag", rank: int = 4, head_reduce: str = "lse",
                 seed: int = 0, layer_idx: int = 0, impl: str = "auto") -> None:
        super().__init__()
        self.method = check_choice("scorer.method", method, SCORERS)
        self.covariance = check_choice("scorer.covariance", covariance, COVARIANCES)
        self.rank = check_positive_int("scorer.rank", rank)
        self.head_reduce = check_choice("scorer.head_reduce", head_reduce, HEAD_REDUCTIONS)
        self.seed, self.layer_idx, self.impl = int(seed), layer_idx, impl
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.method != "random":
            return None
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.seed, self.layer_idx, int(self.calls))) & 0x7FFF_FFFF_FFFF)
        if self.training:
            self.calls += 1
        return g

    @torch.no_grad()
    def forward(self, q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, query_block: int = 1,
                local_blocks: int = 1, sink_blocks: int = 0,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, N, Hq, D], k [B, N, Hkv, D] -> block_idx int32 [B, Hkv, nQ, topk]."""
        return ops.score_and_select(
            q, k, block_size=block_size, topk=topk, query_block=query_block, local_blocks=local_blocks,
            sink_blocks=sink_blocks, scorer=self.method, covariance=self.covariance, rank=self.rank,
            head_reduce=self.head_reduce, generator=self._generator(q.device), cu_seqlens=cu_seqlens,
            impl=self.impl)

    def extra_repr(self) -> str:
        return f"method={self.method}, covariance={self.covariance}, head_reduce={self.head_reduce}"
