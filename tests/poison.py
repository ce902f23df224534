"""A stand-in for ``torch`` inside a kernel module under test: every buffer it allocates starts poisoned
(NaN for floats, -7 for integers), so an element that no kernel writes shows up in the result."""

from __future__ import annotations

import torch


class PoisonTorch:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    @staticmethod
    def empty_like(x, **kwargs):
        t = torch.empty_like(x, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)
