"""The fused residual of SPLA's kernel path (``spla_kernels.residual``) against the float64 PyTorch reference.

``subtract_residual`` = global causal linear attention with its normalizer column (computed inside the
linear-attention kernels), minus the selected part, zeroed where nothing is unselected, normalized or not,
forward and gradients (including the selected part's). Tiny shapes under the Triton interpreter; every
buffer the kernel modules allocate starts as NaN.
"""

import pytest
import torch
from reference import random_block_idx

import spla_kernels.linear as lin
import spla_kernels.residual as res
from spla_kernels.config import LinearConfig
from spla_lit import ops
from spla_lit.ops.linear_attention import _append_ones, _finish_residual, has_unselected_keys

POISONED = (lin, res)
# Several chunks per super-chunk wherever a sequence has several chunks (the stored local states and the
# fix-up pass, with the normalizer's extra state column).
SMALL_SUPER_CHUNKS = LinearConfig(super_target=1, epilogue_rows=16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference(pq, pk, v, sel, nonempty, mode, cu):
    """float64 composition of the ops: _finish_residual(glob([v, 1]) - sel, nonempty, normalize)."""
    vv = v if mode == "sub" else _append_ones(v)
    glob = ops.causal_linear_attention(pq, pk, vv, cu_seqlens=cu, impl="reference")
    return _finish_residual(glob - sel, nonempty, mode == "norm", 1e-6)


@pytest.mark.parametrize("mode", ["norm", "sub", "pair"])
@pytest.mark.parametrize("dtype,B,N,Hq,Hkv,F,Dv,cu", [
    (torch.bfloat16, 1, 150, 4, 2, 16, 16, [0, 37, 101, 150]),  # GQA, packed sequences, partial chunks
    (torch.float32, 2, 70, 2, 2, 32, 16, None),  # G = 1, batch of 2, a partial second chunk
])
def test_subtract_residual_matches_reference(mode, dtype, B, N, Hq, Hkv, F, Dv, cu):
    g = torch.Generator().manual_seed(hash((mode, B, N)) % 2**31)
    block_size, topk = 16, 3
    pq = torch.rand(B, N, Hq, F, generator=g).to(dtype).requires_grad_()
    pk = torch.rand(B, N, Hkv, F, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, N, Hkv, Dv, generator=g).to(dtype).requires_grad_()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    if cu is None:
        idx = random_block_idx(B, Hkv, N, block_size, topk, seed=3)
    else:  # block indices local to each sequence
        idx = torch.cat([random_block_idx(B, Hkv, e - s, block_size, topk, seed=s) for s, e in zip(cu[:-1], cu[1:])],
                        dim=2)
    nonempty = has_unselected_keys(idx, N, block_size, 1, cu_t)
    assert nonempty.any() and not nonempty.all()
    # The selected part, exactly (float64) from the same inputs, as a float32 leaf of its own.
    with torch.no_grad():
        vv = v.double() if mode == "sub" else _append_ones(v.double())
        sel64 = ops.selected_linear_attention(pq.double(), pk.double(), vv, idx, block_size=block_size,
                                              cu_seqlens=cu_t, impl="reference")
    sel = sel64.float().requires_grad_()

    out = res.subtract_residual(pq, pk, v, sel, nonempty, normalize=mode == "norm",
                                return_normalizer=mode == "pair", cu_seqlens=cu_t, config=SMALL_SUPER_CHUNKS)
    assert out.dtype == torch.float32 and out.shape == (B, N, Hq, Dv + (mode == "pair"))
    assert torch.isfinite(out).all()
    do = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (pq, pk, v, sel), do)

    leaves = [x.detach().double().requires_grad_() for x in (pq, pk, v, sel)]
    ref = _reference(*leaves, nonempty, mode, cu_t)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    # rows with nothing unselected are exactly zero
    keep = nonempty.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=2)
    assert (out[~keep] == 0).all()
    lowp = dtype == torch.bfloat16
    # bf16: float32-state accuracy (the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so
    # its hi/lo splits are a few times less accurate than on the GPU), far below bf16 rounding (4e-3).
    assert _rel(out, ref) < (1e-4 if lowp else 1e-5), _rel(out, ref)
    for name, a, b, x in zip(("phi_q", "phi_k", "v", "sel"), grads, ref_grads, (pq, pk, v, sel)):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert torch.isfinite(a).all(), name
        # bf16 inputs: the backward products round the gradient to bf16 (like the linear kernel's backward);
        # the selected part's gradient is float32 throughout.
        tol = 2e-2 if lowp and name != "sel" else 1e-5
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_spla_attention_triton_residual_bf16_packed():
    # The whole op on the kernel path (fused select, fused sparse + selected-linear, the fused residual) with
    # bf16 inputs and packed sequences equals the reference path, forward and gradients.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 90, h, 16, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, 41, 90], dtype=torch.int32)
    gate = torch.rand(1, 90, 4, generator=g)
    kw = dict(normalize=True, gate=gate, cu_seqlens=cu, return_aux=True)
    outs, grads = [], []
    for impl in ("reference", "triton"):
        o, aux = ops.spla_attention(q, k, v, ops.Selection(block_size=16, topk=2), impl=impl, **kw)
        outs.append((o, aux.residual))
        grads.append(torch.autograd.grad(o.float().square().sum() + aux.residual.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outs[1][0].float(), outs[0][0].float(), rtol=2e-2, atol=2e-2)
    for g_t, g_r in zip(grads[1], grads[0]):
        assert _rel(g_t, g_r.double()) < 2e-2


def test_subtract_residual_declines_wide_values():
    # Dv > 128 is not covered by the fused residual: NotImplementedError (the op falls back to the composition).
    pq, pk = torch.rand(1, 8, 1, 16), torch.rand(1, 8, 1, 16)
    v = torch.randn(1, 8, 1, 130)
    with pytest.raises(NotImplementedError):
        res.subtract_residual(pq, pk, v, torch.zeros(1, 8, 1, 131), torch.ones(1, 1, 8, dtype=torch.bool),
                              normalize=True)
