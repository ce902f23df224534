"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def patch_interpreter_scalar_index() -> None:
    """Let ``range(n)`` take a scalar loaded inside a kernel under the Triton interpreter.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
    NumPy >= 2.4 refuses for arrays of one dimension. Compiled kernels are unaffected. Idempotent.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton without the interpreter
        return
    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_spla_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._spla_patched = True
    interpreter._patch_lang_tensor = patched
