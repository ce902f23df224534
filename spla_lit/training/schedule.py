"""Learning-rate schedule."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``
    at ``total_steps`` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
