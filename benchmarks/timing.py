"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable

import torch


def event_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` between two CUDA events (the call's own stream work, synchronised)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
