"""Triton helpers shared by ``linear.py`` and ``select.py``: matrix products at a chosen precision.

Operand modes (constexpr flags):
- ``LOWP``: the inputs are bfloat16, so their tiles are exact bf16 operands; a float32 operand (a state,
  a score matrix, block statistics) is split into ``hi + lo`` bf16 halves and multiplied twice, which keeps
  ~16 mantissa bits at twice the bf16 cost instead of the 8 of a single bf16 product.
- otherwise (float32 / float16 inputs) operands are float32 and products use ``tf32x3`` (~fp32 accuracy).
- ``INTERP``: under ``TRITON_INTERPRET=1`` the interpreter multiplies bf16 operands as raw integers, so every
  product upcasts to float32 first.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``); then also applies the shims of
    :func:`_patch_interpreter` (idempotent), whatever the import order was."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    _patch_interpreter()
    return True


def _patch_interpreter() -> None:
    """Two shims for Triton's CPU interpreter (tests only; nothing changes on a GPU).

    - Loops over a run-time bound (``range(n)`` with ``n`` a loaded scalar): the interpreter keeps scalars as
      1-element arrays and converts them with ``int(array)``, which numpy 2.4 refuses. Re-register
      ``__index__`` after the interpreter's own patch (its scope restores attributes in reverse order).
    - ``tl.sort`` / ``tl.topk`` reduce with XOR, which the interpreter runs element by element in Python
      (minutes for one tile); give it numpy's ``bitwise_xor.reduce``.
    """
    try:
        import numpy as np
        from triton.language import standard
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is not None and not getattr(original, "_spla_patched", False):

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

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



@triton.jit
def op(x, LOWP: tl.constexpr):
    """Cast a loaded tile to the operand dtype: bf16 when LOWP, else float32."""
    if LOWP:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def dot(a, b, acc, LOWP: tl.constexpr, INTERP: tl.constexpr):
    """``acc + a @ b`` for operands already in the operand dtype (see :func:`op`)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif LOWP:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def dot_rhs32(a, b, acc, SPLIT: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr):
    """``acc + a @ b`` with ``b`` float32: split into bf16 hi + lo when LOWP and SPLIT, else one product."""
    if LOWP:
        hi = b.to(tl.bfloat16)
        acc = dot(a, hi, acc, LOWP, INTERP)
        if SPLIT:
            acc = dot(a, (b - hi.to(tl.float32)).to(tl.bfloat16), acc, LOWP, INTERP)
        return acc
    else:
        return dot(a, b, acc, LOWP, INTERP)


@triton.jit
def dot_lhs32(a, b, acc, SPLIT: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr):
    """``acc + a @ b`` with ``a`` float32: split into bf16 hi + lo when LOWP and SPLIT, else one product."""
    if LOWP:
        hi = a.to(tl.bfloat16)
        acc = dot(hi, b, acc, LOWP, INTERP)
        if SPLIT:
            acc = dot((a - hi.to(tl.float32)).to(tl.bfloat16), b, acc, LOWP, INTERP)
        return acc
    else:
        return dot(a, b, acc, LOWP, INTERP)
