"""Triton causal linear attention (``spla_kernels.linear``) against the float64 PyTorch reference.

Runs on CPU under the Triton interpreter at tiny shapes (tests/kernels/conftest.py); buffers poisoned.
"""

import pytest
import torch

import spla_kernels.linear as lin
from spla_kernels.config import LinearConfig
from spla_lit.ops import causal_linear_attention

POISONED = (lin,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _check(B, N, Hq, Hkv, F, Dv, dtype, *, cu=None, tol_out, tol_grad, seed=0, config=None):
    g = torch.Generator().manual_seed(seed)
    # Non-negative features, like elu + 1; values of both signs.
    q = torch.rand(B, N, Hq, F, generator=g).to(dtype).requires_grad_()
    k = torch.rand(B, N, Hkv, F, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, N, Hkv, Dv, generator=g).to(dtype).requires_grad_()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = lin.causal_linear_attention(q, k, v, cu_seqlens=cu_t, config=config)
    assert out.dtype == torch.float32 and out.shape == (B, N, Hq, Dv)
    assert torch.isfinite(out).all()
    do = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = causal_linear_attention(q64, k64, v64, cu_seqlens=cu_t, impl="reference")
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert _rel(out, ref) < tol_out
    for name, a, b, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < tol_grad, (name, _rel(a, b))


def test_float32_gqa_partial_chunk_batch():
    # B = 2 (folded into packed sequences), N not a multiple of the 64-token chunk, G = 2.
    _check(2, 100, 4, 2, 32, 32, torch.float32, tol_out=1e-5, tol_grad=1e-5)


def test_bf16_no_gqa_normalizer_column():
    # G = 1, Dv = F + 1 (the ones column of the normalized residual): a main value tile plus a tail tile.
    _check(1, 70, 2, 2, 16, 17, torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


def test_bf16_packed_sequences_odd_group():
    # cu_seqlens: the state restarts at every sequence, chunks never straddle one; G = 3, Dv = D + 1.
    _check(1, 130, 6, 2, 32, 33, torch.bfloat16, cu=[0, 5, 69, 130], tol_out=1e-4, tol_grad=2e-2)


def test_value_dim_over_128():
    # Dv = 128 + 1 (D = 128 with the normalizer column): one 128-wide tile plus a float32 extra column.
    _check(1, 70, 2, 1, 16, 129, torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


def test_value_dim_column_slices():
    # Dv = 144 (no main + extra-column form): column slices of 128 and 64, dk summed over both.
    _check(1, 70, 2, 1, 16, 144, torch.bfloat16, tol_out=1e-4, tol_grad=2e-2)


def test_float32_extra_column_gqa_packed():
    # float32 (tf32x3) with the extra column (Dv = 32 + 1), G = 2, packed sequences and partial chunks.
    _check(1, 150, 4, 2, 32, 33, torch.float32, cu=[0, 70, 150], tol_out=1e-5, tol_grad=1e-5)


@pytest.mark.parametrize("dv", [16, 17])
def test_super_chunks_and_fixup(dv):
    # Several chunks per super-chunk (the two-level scan and the fix-up pass), forward and reverse states,
    # with sequences of 1, 4 and 6 chunks; dv = 17: with the extra state column.
    _check(1, 700, 4, 2, 16, dv, torch.float32, cu=[0, 20, 300, 700], tol_out=1e-5, tol_grad=1e-5,
           config=LinearConfig(super_target=1))


def test_bf16_forward_keeps_float32_state_accuracy():
    # The residual subtracts large terms: the bf16 forward must be near float32 accuracy, far better than bf16.
    g = torch.Generator().manual_seed(1)
    N, F = 300, 32
    q = torch.rand(1, N, 2, F, generator=g).bfloat16()
    k = torch.rand(1, N, 1, F, generator=g).bfloat16()
    v = (torch.randn(1, N, 1, F, generator=g) + 3).bfloat16()  # large common component: big, similar states
    out = lin.causal_linear_attention(q, k, v)
    ref = causal_linear_attention(q.double(), k.double(), v.double(), impl="reference")
    assert _rel(out, ref) < 2e-5


def test_dispatch_through_op():
    # spla_lit.ops dispatches to the kernel with impl="triton" (CPU tensors run under the interpreter).
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.rand(1, 40, h, 16, generator=g) for h in (2, 1, 1))
    out = causal_linear_attention(q, k, v, impl="triton")
    ref = causal_linear_attention(q.double(), k.double(), v.double(), impl="reference")
    assert _rel(out, ref) < 1e-5


def test_float64_falls_back_to_reference():
    q, k, v = (torch.rand(1, 10, 1, 16, dtype=torch.float64) for _ in range(3))
    out = lin.causal_linear_attention(q, k, v)
    assert out.dtype == torch.float64
    assert torch.allclose(out, causal_linear_attention(q, k, v, impl="reference"))


def test_tile_configs_agree():
    # The unsplit backward products, other row tiles, two super-chunks per scan step, and the table's entry for
    # float32 inputs (half the key-gradient rows): same results within the same tolerances.
    from spla_kernels.config import _LINEAR

    for config in (LinearConfig(super_target=1, bwd_split=False, out_rows=32, dkdv_rows=16, scan_chunks=2),
                   _LINEAR["sm90", True]):
        _check(1, 130, 4, 2, 16, 17, torch.bfloat16, cu=[0, 100, 130], tol_out=1e-4, tol_grad=2e-2, config=config)


def test_declines_where_the_table_has_no_tiles(monkeypatch):
    # sm89 has no linear-attention tiles (160 KiB of shared memory at F = Dv = 128): NotImplementedError before
    # any launch, so spla_lit.ops runs its reference.
    monkeypatch.setattr(lin, "arch_of", lambda device: "sm89")
    q, k, v = (torch.rand(1, 8, h, 16) for h in (2, 1, 1))
    with pytest.raises(NotImplementedError, match="sm89"):
        lin.causal_linear_attention(q, k, v)
    out = causal_linear_attention(q, k, v, impl="auto")  # CPU tensors: the reference, whatever the kernels say
    assert torch.isfinite(out).all()
