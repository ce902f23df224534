"""Kernel tests run on the CPU under Triton's interpreter, at tiny shapes.

``TRITON_INTERPRET=1`` is set here, before any module of this folder imports Triton (a ``@triton.jit``
function decorated outside interpreter mode cannot be interpreted later), and the folder is skipped when
Triton is not installed. A test module that lists kernel modules in ``POISONED`` gets, in each of them,
``torch`` replaced by ``tests/poison.py``'s ``PoisonTorch``: every buffer they allocate starts as NaN (or -7),
so an element no kernel writes shows up in the result.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_*.py"]


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(request, monkeypatch):
    from poison import PoisonTorch

    for module in getattr(request.module, "POISONED", ()):
        monkeypatch.setattr(module, "torch", PoisonTorch())
