"""Choose between the PyTorch reference and the Triton kernels.

``impl="auto"`` takes the Triton kernel when every tensor is on CUDA and ``spla_kernels`` provides the op;
``"triton"`` forces it (on CPU tensors it runs only under ``TRITON_INTERPRET=1``); ``"reference"`` forces
the PyTorch path. The environment variable ``SPLA_IMPL`` overrides ``"auto"`` globally.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

import torch

from ..options import IMPLS, check_choice


@cache
def _kernels():
    try:
        return importlib.import_module("spla_kernels")
    except ImportError:  # triton missing or the kernels package not installed
        return None


def kernel(name: str):
    """The Triton entry point ``spla_kernels.<name>``, or None when unavailable."""
    mod = _kernels()
    return getattr(mod, name, None) if mod is not None else None


@torch._dynamo.assume_constant_result
def available(op: str) -> bool:
    """Whether ``spla_kernels.<op>`` can be imported (fixed for the process: ``torch.compile`` takes it as
    a constant instead of tracing the import, which would break the graph)."""
    return kernel(op) is not None


def _missing(op: str) -> RuntimeError:
    return RuntimeError(f"impl='triton' was requested but no Triton kernel for {op} is available")


def use_triton(impl: str, op: str, *tensors: torch.Tensor) -> bool:
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        impl = os.environ.get("SPLA_IMPL", "auto")
        check_choice("SPLA_IMPL", impl, IMPLS)
    if impl == "reference":
        return False
    has_kernel = available(op)
    if impl == "triton":
        if not has_kernel:
            raise _missing(op)
        if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"impl='triton' for {op} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return True
    return has_kernel and all(t.is_cuda for t in tensors)


class ReferenceFallbackWarning(RuntimeWarning):
    """A Triton kernel declined its arguments on CUDA and the (slower, often O(N^2)-memory) PyTorch reference
    ran instead."""


_warned: set[tuple[str, str]] = set()  # (op, reason) pairs already reported by warn_fallback


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether any tensor argument lives on a CUDA device (the only place a decline costs anything)."""
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values()))


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per ``(op, reason)`` that ``spla_kernels.<op>`` declined and the reference runs instead."""
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"spla_kernels.{op} declined these arguments ({reason}); running the PyTorch reference instead, "
                  "which is slower and may need O(N^2) memory (warned once per reason)",
                  ReferenceFallbackWarning, stacklevel=3)


@torch.compiler.disable
def run_kernel(impl: str, op: str, *args, **kwargs):
    """Call ``spla_kernels.<op>``; None when the kernel is unavailable or declines these arguments
    (``NotImplementedError``, e.g. ``query_block > 1`` or a feature dim it has no tile for) and ``impl`` is
    not a forced ``"triton"``, so the caller falls back to its reference. A decline on CUDA tensors warns
    (:class:`ReferenceFallbackWarning`, once per op and reason).

    Under ``torch.compile`` the call runs as it is, between compiled graphs (one reported graph break):
    traced, Inductor would recompile the kernels with its own argument typing, and their index building
    has data-dependent shapes.
    """
    fn = kernel(op)
    if fn is None:
        if impl == "triton":
            raise _missing(op)
        return None
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        if impl == "triton":
            raise
        if _on_cuda(args, kwargs):
            warn_fallback(op, str(e) or "not implemented")
        return None
