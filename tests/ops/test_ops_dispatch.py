"""Kernel dispatch: a Triton kernel that declines its arguments on CUDA makes the op warn, once per reason,
that the PyTorch reference runs instead."""

from __future__ import annotations

import warnings

import pytest
import torch

from spla_lit.ops import ReferenceFallbackWarning, _dispatch


@pytest.fixture
def declining_kernel(monkeypatch):
    """``spla_kernels.fake_op`` raises NotImplementedError(reason) for its ``reason`` argument; the CUDA check
    is faked to True; the once-per-reason memory starts empty."""
    calls = []

    def fake_op(x, *, reason):
        calls.append(reason)
        raise NotImplementedError(reason)

    monkeypatch.setattr(_dispatch, "kernel", lambda op: fake_op if op == "fake_op" else None)
    monkeypatch.setattr(_dispatch, "_on_cuda", lambda args, kwargs: True)
    monkeypatch.setattr(_dispatch, "_warned", set())
    return calls


def test_decline_on_cuda_warns_once_per_reason(declining_kernel):
    x = torch.zeros(2)
    with pytest.warns(ReferenceFallbackWarning) as caught:
        assert _dispatch.run_kernel("auto", "fake_op", x, reason="query_block > 1 is not fused") is None
        assert _dispatch.run_kernel("auto", "fake_op", x, reason="query_block > 1 is not fused") is None
        assert _dispatch.run_kernel("auto", "fake_op", x, reason="feature dim 300 has no tile") is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and len(declining_kernel) == 3
    assert "spla_kernels.fake_op" in messages[0] and "query_block > 1 is not fused" in messages[0]
    assert "PyTorch reference" in messages[0] and "feature dim 300 has no tile" in messages[1]


def test_decline_off_cuda_is_silent_and_forced_triton_raises(declining_kernel, monkeypatch):
    with pytest.raises(NotImplementedError, match="nope"):
        _dispatch.run_kernel("triton", "fake_op", torch.zeros(2), reason="nope")
    monkeypatch.setattr(_dispatch, "_on_cuda", lambda args, kwargs: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.run_kernel("auto", "fake_op", torch.zeros(2), reason="cpu") is None


class _CudaLooking(torch.Tensor):
    """A CPU tensor that reports ``is_cuda`` (the check's input on a machine without a GPU)."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_on_cuda_looks_at_positional_and_keyword_tensors():
    cpu, cuda = torch.zeros(1), torch.zeros(1).as_subclass(_CudaLooking)
    assert not _dispatch._on_cuda((cpu, 3), {"x": cpu, "n": None})
    assert _dispatch._on_cuda((cpu, cuda), {})
    assert _dispatch._on_cuda((cpu,), {"cu_seqlens": cuda})
