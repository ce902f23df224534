"""The SPLA layer is a thin wrapper over ``spla_lit.ops.spla_attention``: on the same tensors the op gives the
layer's output and gradients exactly, in every combine, residual and sparse mode; the Triton path of the layer
equals its reference path; capture hooks see what the layer computed."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from spla_lit.layers import (
    BlockScorer,
    BlockSparseAttention,
    ResidualLinearAttention,
    RMSNorm,
    RotaryEmbedding,
    SPLAAttention,
)
from spla_lit.ops import rms_norm, spla_attention

D_MODEL, HEADS, KV_HEADS = 32, 4, 2

MODES = [(combine, rla) for combine in ("add", "joint") for rla in ("subtract", "explicit")] + [("add", "none")]


def _layer(combine="add", rla="subtract", mode="topk", *, d_model=D_MODEL, block_size=4, topk=3, impl="reference",
           scorer="taylor2", norm=True):
    """A layer whose residual is switched on: gate weights and bias non-zero, a non-trivial norm weight."""
    torch.manual_seed(0)
    rla_factory = None if rla == "none" else partial(ResidualLinearAttention, mode=rla, combine=combine, norm=norm)
    sparse = partial(BlockSparseAttention, block_size=block_size, topk=topk, mode=mode,
                     local_blocks=2 if mode == "window" else 1)
    layer = SPLAAttention(d_model, HEADS, KV_HEADS, scorer=partial(BlockScorer, method=scorer), sparse=sparse,
                          rla=rla_factory, impl=impl)
    with torch.no_grad():
        if layer.rla is not None and combine == "add":
            layer.rla.gate.weight.normal_(std=0.2)
            layer.rla.gate.bias.fill_(0.5)
            if norm:
                layer.rla.norm.weight.uniform_(0.5, 1.5)
    return layer


def _inputs(n=37, batch=2, d_model=D_MODEL, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d_model, generator=g, requires_grad=True)
    rope = RotaryEmbedding(d_model // HEADS).cos_sin(torch.arange(n))
    return x, rope, torch.randn(batch, n, d_model, generator=g)


def _run_layer(layer, x, rope, w, cu_seqlens=None):
    """Forward and backward of the layer; returns (its capture record with retained gradients, output,
    parameter gradients)."""
    records = []

    def hook(_, record):
        for t in (record.q, record.k, record.v, record.phi_q, record.phi_k, record.gate):
            if t is not None:
                t.retain_grad()
        records.append(record)

    handle = layer.register_capture_hook(hook)
    y = layer(x, rope, cu_seqlens)
    handle.remove()
    layer.zero_grad()
    (y * w).sum().backward()
    return records[0], y, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _residual_kwargs(layer):
    rla = layer.rla
    if rla is None:
        return dict(rla="none")
    return dict(rla=rla.mode, combine=rla.combine, normalize=rla.normalize)


@pytest.mark.parametrize("mode", ["topk", "window"])
@pytest.mark.parametrize(("combine", "rla"), MODES)
def test_layer_is_the_op_forward_and_backward(combine, rla, mode):
    layer = _layer(combine, rla, mode)
    x, rope, w = _inputs()
    rec, y, param_grads = _run_layer(layer, x, rope, w)
    add = layer.rla is not None and combine == "add"

    # 1. The op on the layer's own tensors (fresh leaves): the same output, and the same gradients for q, k, v,
    #    the features, the gate and the norm weight.
    q, k, v = (t.detach().clone().requires_grad_() for t in (rec.q, rec.k, rec.v))
    extra, wrt = {}, [q, k, v]
    if layer.rla is not None:  # features of the leaves, so q and k get the gradient through phi too
        extra.update(phi_q=layer.rla.phi(q), phi_k=layer.rla.phi(k))
    if add:
        gate = rec.gate.detach().clone().requires_grad_()
        norm_weight = layer.rla.norm.weight.detach().clone().requires_grad_()
        extra.update(gate=gate, norm_weight=norm_weight)
        wrt += [gate, norm_weight]
    o = spla_attention(q, k, v, layer.selection, impl="reference", **_residual_kwargs(layer), **extra)
    assert torch.equal(o, rec.out)
    assert torch.equal(layer.out(o), y)
    got = torch.autograd.grad((layer.out(o) * w).sum(), wrt, retain_graph=True)
    want = [rec.q.grad, rec.k.grad, rec.v.grad]
    if add:
        want += [rec.gate.grad, param_grads["rla.norm.weight"]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.abs().sum() > 0
    if layer.rla is not None:
        torch.testing.assert_close(*_phi_grads(layer, rec, w, extra), rtol=1e-6, atol=1e-7)

    # 2. The layer's parameters: projections -> the op -> output projection gives the layer's gradients.
    q2, k2, v2 = layer.qkv(x, rope)
    inputs = {} if layer.rla is None else layer.rla.op_inputs(x, q2, k2)
    o2 = spla_attention(q2, k2, v2, layer.selection, impl="reference", **({"rla": "none"} | inputs))
    names = list(param_grads)
    params = [dict(layer.named_parameters())[n] for n in names]
    grads = torch.autograd.grad((layer.out(o2) * w).sum(), params)
    for name, g in zip(names, grads):
        torch.testing.assert_close(g, param_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert {"wq.weight", "wk.weight", "wv.weight", "wo.weight"} <= set(names)
    if add:
        assert {"rla.gate.weight", "rla.gate.bias", "rla.norm.weight"} <= set(names)


def _phi_grads(layer, rec, w, extra):
    """d loss / d (phi_q, phi_k): through the op, from leaves holding the layer's features, and the gradients
    the layer's own features received."""
    leaves = [rec.phi_q.detach().clone().requires_grad_(), rec.phi_k.detach().clone().requires_grad_()]
    kw = {key: value.detach() for key, value in extra.items() if key in ("gate", "norm_weight")}
    o = spla_attention(rec.q.detach(), rec.k.detach(), rec.v.detach(), layer.selection, phi_q=leaves[0],
                       phi_k=leaves[1], impl="reference", **_residual_kwargs(layer), **kw)
    got = torch.cat([g.flatten() for g in torch.autograd.grad((layer.out(o) * w).sum(), leaves)])
    return got, torch.cat([rec.phi_q.grad.flatten(), rec.phi_k.grad.flatten()])


@pytest.mark.parametrize(("combine", "rla"), [("add", "subtract"), ("joint", "explicit"), ("add", "none")])
def test_packed_layer_is_the_op(combine, rla):
    layer = _layer(combine, rla)
    x, rope, w = _inputs(n=30, batch=1)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    pos = torch.cat([torch.arange(11), torch.arange(19)])
    rope = RotaryEmbedding(D_MODEL // HEADS).cos_sin(pos)
    rec, y, _ = _run_layer(layer, x, rope, w, cu_seqlens=cu)
    assert rec.cu_seqlens is cu
    kw = {key: getattr(rec, key) for key in ("phi_q", "phi_k", "gate") if getattr(rec, key) is not None}
    if layer.rla is not None and combine == "add":
        kw["norm_weight"] = layer.rla.norm.weight
    o = spla_attention(rec.q, rec.k, rec.v, layer.selection, cu_seqlens=cu, impl="reference",
                       **_residual_kwargs(layer), **kw)
    assert torch.equal(o, rec.out)


@pytest.mark.parametrize(("combine", "rla", "mode"), [("add", "subtract", "topk"), ("joint", "subtract", "topk"),
                                                      ("add", "explicit", "window")])
def test_layer_triton_path_equals_reference(combine, rla, mode):
    """The layer with impl="triton" (kernels under TRITON_INTERPRET on the CPU) against impl="reference":
    output, capture record and every parameter gradient, at a tiny shape the kernels take."""
    pytest.importorskip("triton")
    d_model = 64  # head dim 16
    x, rope, w = _inputs(n=70, batch=1, d_model=d_model, seed=5)
    results = []
    for impl in ("reference", "triton"):
        layer = _layer(combine, rla, mode, d_model=d_model, block_size=16, topk=2, impl=impl)
        results.append(_run_layer(layer, x, rope, w))
    (rec_r, y_r, g_r), (rec_t, y_t, g_t) = results
    assert torch.equal(rec_r.block_idx, rec_t.block_idx)
    torch.testing.assert_close(rec_t.out, rec_r.out, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(y_t, y_r, rtol=2e-4, atol=2e-4)
    assert g_r.keys() == g_t.keys()
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], rtol=2e-3, atol=2e-3, msg=name)


def test_stats_come_from_the_ops_aux():
    layer = _layer("add", "subtract")
    x, rope, _ = _inputs()
    records = []
    layer.register_capture_hook(lambda _, r: records.append(r))
    with torch.no_grad():
        layer(x, rope)
    (rec,) = records
    assert set(layer.stats) == {"rla/gate_abs", "rla/residual_share"}
    assert layer.stats["rla/gate_abs"].item() == pytest.approx(rec.gate.abs().mean().item())
    extra = (rec.out.float() - rec.o_sparse.float()).norm()
    share = extra / (rec.o_sparse.float().norm() + extra)
    assert layer.stats["rla/residual_share"].item() == pytest.approx(share.item(), rel=1e-4)
    joint = _layer("joint", "subtract")
    with torch.no_grad():
        joint(x, rope)
    assert set(joint.stats) == {"rla/residual_share"}
    none = _layer("add", "none")
    with torch.no_grad():
        none(x, rope)
    assert none.stats == {}


def test_capture_hooks_register_and_remove():
    layer = _layer()
    x, rope, _ = _inputs(n=12)
    seen = []
    handle = layer.register_capture_hook(lambda lay, rec: seen.append((lay, rec)))
    with torch.no_grad():
        layer(x, rope)
        handle.remove()
        layer(x, rope)
    assert len(seen) == 1 and seen[0][0] is layer
    rec = seen[0][1]
    assert rec.q.shape == (2, 12, HEADS, 8) and rec.k.shape == rec.v.shape == (2, 12, KV_HEADS, 8)
    assert rec.block_idx.shape == (2, KV_HEADS, 12, 3) and rec.out.shape == rec.o_sparse.shape == (2, 12, HEADS, 8)
    assert rec.gate.shape == (2, 12, HEADS) and rec.phi_q.shape == rec.q.shape and rec.cu_seqlens is None


def test_selection_is_built_from_the_components():
    layer = _layer(scorer="oracle")
    sel = layer.selection
    assert (sel.mode, sel.block_size, sel.topk, sel.scorer) == ("topk", 4, 3, "oracle")
    window = _layer(mode="window")
    assert window.scorer is None and window.selection.mode == "window" and window.selection.k == 2
    assert window.sparse.topk == 2  # the window's width
    with pytest.raises(ValueError, match="topk"):
        BlockSparseAttention(block_size=4, topk=1, local_blocks=2)
    with pytest.raises(ValueError, match="needs a scorer"):
        SPLAAttention(D_MODEL, HEADS, KV_HEADS, scorer=None, sparse=partial(BlockSparseAttention))
    with pytest.raises(ValueError, match="rla.mode"):
        ResidualLinearAttention(D_MODEL, HEADS, 8, mode="none")
    with pytest.raises(ValueError, match="impl"):
        _layer(impl="cuda")


def test_rms_norm_module_is_the_ops_norm():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 8)
    assert torch.equal(norm(x), rms_norm(x, norm.weight, 1e-5))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_residual_without_norm_passes_no_norm_weight():
    layer = _layer(norm=False)
    x, rope, _ = _inputs(n=12)
    inputs = layer.rla.op_inputs(x, *layer.qkv(x, rope)[:2])
    assert "norm_weight" not in inputs and inputs["gate"].shape == (2, 12, HEADS)
