"""Small helpers shared by the Triton kernels: running under Triton's CPU interpreter; recomputing features."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``); then also applies the
    interpreter shims of :func:`patch_interpreter` (idempotent), whatever the import order was."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    patch_interpreter()
    return True


def patch_interpreter() -> None:
    """Two shims for Triton's CPU interpreter (tests only; compiled kernels are unaffected). Idempotent.

    - Loops over a run-time bound (``range(n)`` with ``n`` a scalar loaded inside a kernel): the interpreter
      keeps scalars as 1-element arrays and converts them with ``int(array)``, which NumPy >= 2.4 refuses.
      Re-register ``__index__`` after the interpreter's own patch.
    - ``tl.sort`` / ``tl.topk`` reduce with XOR, which the interpreter runs element by element in Python
      (minutes for one tile): give it NumPy's ``bitwise_xor.reduce``.
    """
    try:
        import numpy as np
        from triton.language import standard
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton without the interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is not None and not getattr(original, "_spla_patched", False):

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        patched._spla_patched = True
        interpreter._patch_lang_tensor = patched
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    xor = getattr(standard, "_xor_combine", None)
    if reduce_ops is not None and xor is not None and not getattr(reduce_ops.apply_impl, "_spla_patched", False):
        apply_impl = reduce_ops.apply_impl

        def fast_apply_impl(self, input):
            if self.combine_fn == xor and len(input) == 1 and self.axis is not None:
                data = np.bitwise_xor.reduce(input[0].handle.data, axis=self.axis, keepdims=self.keep_dims)
                return self.to_tensor(data, input[0].dtype)
            return apply_impl(self, input)

        fast_apply_impl._spla_patched = True
        reduce_ops.apply_impl = fast_apply_impl


def recompute_features(name: str, x: torch.Tensor) -> torch.Tensor:
    """``spla_lit.ops.feature_map(name)(x)``, contiguous, without autograd: a backward pass recomputing the
    ``phi`` its forward was given instead of keeping it (the same bits for the elementwise maps)."""
    from spla_lit.ops.feature_maps import feature_map

    with torch.no_grad():
        return feature_map(name)(x).contiguous()
