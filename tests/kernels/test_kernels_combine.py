"""The fused add-combine (``spla_kernels.combine``) against the PyTorch composition of ``spla_lit.ops``.

``o = o_sparse + gate * RMSNorm(r)`` forward and every gradient (o_sparse, r, a tensor gate, the norm weight),
with and without gate / norm, a scalar gate, bf16 and float32, a value dim that is not a power of two and a row
count that is not a multiple of the tile; the squared norms it reports for ``residual_share``; what autograd
keeps for the backward. Tiny shapes under the Triton interpreter; buffers poisoned.
"""

import pytest
import torch

import spla_kernels.combine as comb
from spla_kernels.config import CombineConfig
from spla_lit import ops
from spla_lit.ops.spla import _combine

POISONED = (comb,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(dtype, B=2, N=13, Hq=3, Dv=24, gate="tensor", norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, N, Hq, Dv, generator=g).to(dtype).requires_grad_()
    r = (torch.randn(B, N, Hq, Dv, generator=g) * 3).requires_grad_()  # float32, as the residual ops return it
    if gate == "tensor":
        gt = torch.randn(B, N, Hq, generator=g).to(dtype).requires_grad_()
    else:
        gt = {"none": None, "float": 0.7}[gate]
    w = (torch.rand(Dv, generator=g) + 0.5).requires_grad_() if norm else None
    return o, r, gt, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate,norm", [("tensor", True), ("none", True), ("float", False), ("none", False),
                                       ("tensor", False)])
def test_combine_add_matches_reference(dtype, gate, norm):
    o, r, gt, w = _inputs(dtype, gate=gate, norm=norm, seed=hash((gate, norm)) % 1000)
    leaves = [x for x in (o, r, gt, w) if isinstance(x, torch.Tensor)]
    cfg = CombineConfig(rows=8, warps=2)  # 78 rows: the last program is partial
    out, stats = comb.combine_add(o, r, gate=gt, norm_weight=w, eps=1e-6, return_stats=True, config=cfg)
    assert out.dtype == dtype and out.shape == o.shape
    ref, share = _combine(o, r, "add", None, gt, w, 1e-6, "reference", share=True)
    # float32 inside both; bf16 outputs differ by the final rounding (the interpreter truncates where the GPU
    # rounds to nearest)
    assert _rel(out, ref) < (8e-3 if dtype == torch.bfloat16 else 1e-6)
    e, s = stats.sqrt()
    assert (e / (s + e + 1e-12)).item() == pytest.approx(share.item(), rel=1e-5)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, do)
    ref_grads = torch.autograd.grad(ref, leaves, do)
    for x, a, b in zip(leaves, grads, ref_grads):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert torch.isfinite(a).all()
        tol = 1e-5 if x.dtype == torch.float32 else 1e-2  # bf16 gradients are rounded once
        assert _rel(a, b) < tol, (tuple(x.shape), _rel(a, b))
    assert torch.equal(grads[0], do)  # d o_sparse is the output's gradient itself


def test_combine_add_partial_gradients_and_float64_declines():
    o, r, gt, w = _inputs(torch.float32)
    out = comb.combine_add(o.detach(), r, gate=gt.detach(), norm_weight=w.detach())
    (dr,) = torch.autograd.grad(out.sum(), (r,))
    ref = _combine(o.detach(), r, "add", None, gt.detach(), w.detach(), 1e-6)[0]
    assert _rel(dr, torch.autograd.grad(ref.sum(), (r,))[0]) < 1e-5
    with pytest.raises(NotImplementedError):
        comb.combine_add(o.double(), r.double())
    with pytest.raises(ValueError, match="gate"):
        comb.combine_add(o, r, gate=torch.ones(3))
    with pytest.raises(ValueError, match="norm_weight"):
        comb.combine_add(o, r, norm_weight=torch.ones(5))


def test_combine_add_saves_no_float32_copies():
    # What autograd keeps for the backward of the combine: the residual itself (shared with its producer), the
    # gate and the weight; the reference keeps two more float32 [B, N, Hq, Dv] tensors (normed, gated).
    o, r, gt, w = _inputs(torch.bfloat16, B=1, N=32, Hq=4, Dv=32)
    r_in = r * 1.0  # a non-leaf residual, as the op's is

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return seen

    fused = saved_bytes(lambda: comb.combine_add(o, r_in, gate=gt, norm_weight=w))
    ref = saved_bytes(lambda: _combine(o, r_in, "add", None, gt, w, 1e-6))
    big = r.numel() * 4
    assert sum(v for v in fused.values() if v >= big) == big  # the residual only
    assert sum(v for v in ref.values() if v >= big) >= 3 * big


def test_ops_combine_residual_and_spla_attention_use_the_kernel():
    o, r, gt, w = _inputs(torch.bfloat16)
    a = ops.combine_residual(o, r, gate=gt, norm_weight=w, impl="triton")
    b = ops.combine_residual(o, r, gate=gt, norm_weight=w, impl="reference")
    assert _rel(a, b) < 8e-3
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g).bfloat16() for h in (4, 2, 2))
    gate = torch.rand(1, 40, 4, generator=g)
    outs = []
    for impl in ("reference", "triton"):
        out, aux = ops.spla_attention(q, k, v, ops.Selection(block_size=8, topk=2), gate=gate,
                                      norm_weight=torch.ones(16) * 1.5, impl=impl, return_aux=True)
        outs.append((out, aux))
    assert _rel(outs[1][0], outs[0][0]) < 2e-2
    assert outs[1][1].residual_share.item() == pytest.approx(outs[0][1].residual_share.item(), rel=2e-2)
    assert outs[1][1].gate_abs.item() == pytest.approx(outs[0][1].gate_abs.item())
