"""Test session setup: the Triton kernels run under the interpreter on a machine without a GPU; the warnings
in WARNING_FILTERS are filtered (each for its reason); the session fails if a test wrote into the checkout.

Shared helpers live beside this file (``reference.py``, ``hydra_utils.py``, ``poison.py``); pytest puts this
folder on ``sys.path`` (rootdir conftest, prepend import mode), so tests in the sub-folders import them by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Set before any test module imports spla_kernels: a @triton.jit function decorated outside interpreter
# mode cannot be interpreted later.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores (two workers on two cores: one thread each, not two
# threads each fighting over both cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


# Warnings the suite would otherwise end with, each filtered for a reason (the others are fixed at their source).
WARNING_FILTERS = [
    # torch 2.13's own torch.utils.mkldnn (imported by Inductor when compiling on the CPU) uses its deprecated
    # torch.jit.script_method; nothing in this project calls it.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    for line in WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)


# ------------------------------------------------------------------------ nothing written into the checkout

_ROOT = Path(__file__).resolve().parents[1]
# Caches and environments that tools (not tests) keep in the checkout.
_SKIP = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl"}


def _checkout_entries() -> set[str]:
    """Every file and folder of the checkout, except tool caches, build metadata and virtual environments."""
    entries = set()
    for folder, dirs, files in os.walk(_ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.endswith(".egg-info")
                   and not (Path(folder, d) / "pyvenv.cfg").exists()]
        base = Path(folder).relative_to(_ROOT)
        entries.update(str(base / name) for name in dirs + files)
    return entries


@pytest.fixture(scope="session", autouse=True)
def no_files_left_in_the_checkout():
    """Tests write only under pytest's tmp_path: the session fails if it left anything in the checkout (a
    ``logs/`` run folder from a CLI run without ``paths.log_dir``, an eval output, a checkpoint...)."""
    before = _checkout_entries()
    yield
    new = sorted(_checkout_entries() - before)
    assert not new, f"the test session wrote into the checkout {_ROOT}: {new[:10]}"
