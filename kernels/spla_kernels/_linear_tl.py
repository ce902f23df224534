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

import triton
import triton.language as tl


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
