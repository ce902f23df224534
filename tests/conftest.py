"""Test session setup: the Triton kernels run under the interpreter on a machine without a GPU.

Shared helpers live beside this file (``reference.py``, ``hydra_utils.py``, ``poison.py``); pytest puts this
folder on ``sys.path`` (rootdir conftest, prepend import mode), so tests in the sub-folders import them by name.
"""

from __future__ import annotations

import os

import torch

# Set before any test module imports spla_kernels: a @triton.jit function decorated outside interpreter
# mode cannot be interpreted later.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
