"""Next-token loss by position bucket: does the model use long context (loss falling with position)?"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

IGNORE = -100


def bucket_edges(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
    """``num_buckets`` contiguous position ranges ``[start, end)`` covering ``[0, seq_len)``; position
    ``i`` is in bucket ``i * num_buckets // seq_len`` (equal sizes when ``num_buckets`` divides it)."""
    if num_buckets < 1 or seq_len < num_buckets:
        raise ValueError(f"need 1 <= num_buckets <= seq_len, got num_buckets={num_buckets}, seq_len={seq_len}")
    starts = [-(-b * seq_len // num_buckets) for b in range(num_buckets)]
    return list(zip(starts, starts[1:] + [seq_len]))


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (nats) float32 [B, N]; 0 where ``labels == -100``."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")


class PositionBucketLoss(Metric):
    """Mean next-token loss per position bucket over sequences of ``seq_len`` tokens.

    ``update(losses [B, N], valid [B, N] bool or None)`` with ``N == seq_len``; ``compute()`` -> float64
    [num_buckets] mean loss (NaN for a bucket with no valid token). ``perplexity()`` is its ``exp``.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, seq_len: int, num_buckets: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.edges = bucket_edges(seq_len, num_buckets)
        self.seq_len, self.num_buckets = seq_len, num_buckets
        bucket = torch.arange(seq_len) * num_buckets // seq_len
        self.register_buffer("bucket", bucket, persistent=False)
        self.add_state("loss_sum", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if losses.dim() != 2 or losses.shape[1] != self.seq_len:
            raise ValueError(f"losses must be [B, {self.seq_len}], got {tuple(losses.shape)}")
        w = torch.ones_like(losses, dtype=torch.float64) if valid is None else valid.to(torch.float64)
        bucket = self.bucket.to(losses.device)
        self.loss_sum.index_add_(0, bucket, (losses.double() * w).sum(0))
        self.count.index_add_(0, bucket, w.sum(0))

    def compute(self) -> torch.Tensor:
        # [num_buckets] even for one bucket (torchmetrics squeezes a one-element result to a scalar)
        return torch.where(self.count > 0, self.loss_sum / self.count.clamp_min(1), float("nan"))

    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.compute().reshape(-1))

    def table(self) -> list[dict[str, float]]:
        """One dict per bucket: ``start``, ``end`` (exclusive), ``tokens``, ``loss``, ``ppl``."""
        loss = self.compute().reshape(-1).tolist()
        return [{"start": s, "end": e, "tokens": int(n), "loss": lo, "ppl": math.exp(lo) if lo == lo else lo}
                for (s, e), n, lo in zip(self.edges, self.count.tolist(), loss)]
