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


def held_then_warmup_cosine(step: int, *, hold_steps: int, warmup_steps: int, total_steps: int,
                            min_lr_ratio: float = 0.1) -> float:
    """LR multiplier 0 for the first ``hold_steps`` steps, then :func:`warmup_cosine` restarted at ``hold_steps``
    (its warmup from there, its cosine ending at ``total_steps``): the schedule of parameters held frozen at first
    (``optim.freeze_pretrained_steps``)."""
    if step < hold_steps:
        return 0.0
    return warmup_cosine(step - hold_steps, warmup_steps=warmup_steps, total_steps=max(1, total_steps - hold_steps),
                         min_lr_ratio=min_lr_ratio)
