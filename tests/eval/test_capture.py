"""capture_spla: what each SPLA layer computed, through the layer's capture hooks (no recomputation)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from spla_lit.eval.capture import capture_spla, spla_layers
from spla_lit.eval.fidelity import LayerFidelity, SelectionFidelityMetrics
from spla_lit.layers import BlockScorer, BlockSparseAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.models import DecoderLM


def _model(rla=True, mode="topk", n_layers=2):
    torch.manual_seed(0)
    attention = partial(SPLAAttention, scorer=partial(BlockScorer),
                        sparse=partial(BlockSparseAttention, block_size=4, topk=3, mode=mode, local_blocks=2),
                        rla=partial(ResidualLinearAttention) if rla else None)
    net = DecoderLM(64, attention, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ResidualLinearAttention):
                m.gate.bias.fill_(0.5)
    return net


@pytest.mark.parametrize("rla", [True, False])
def test_capture_is_what_the_layer_fed_its_output_projection(rla):
    net = _model(rla)
    wo_inputs = []
    for layer in spla_layers(net):
        layer.wo.register_forward_hook(lambda m, args, out: wo_inputs.append(args[0].detach()))
    x = torch.randint(0, 64, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_spla(net) as captures:
        net(x)
    assert [c.layer for c in captures] == [0, 1] and [c.attn for c in captures] == spla_layers(net)
    for cap, wo_in in zip(captures, wo_inputs):
        assert torch.equal(cap.out.flatten(-2), wo_in)
        assert cap.q.shape == (3, 29, 4, 8) and cap.k.shape == cap.v.shape == (3, 29, 2, 8)
        assert cap.block_idx.shape == (3, 2, 29, 3) and cap.selection == cap.attn.selection
        assert torch.equal(cap.out, cap.o_sparse) != rla  # the residual is open (gate bias 0.5)
        assert not cap.q.requires_grad and cap.cu_seqlens is None
    with torch.no_grad():
        net(x)  # the context is closed: its hooks are gone
    assert len(captures) == 2 and all(not layer._capture_hooks for layer in spla_layers(net))


def test_max_rows_and_packed_rows():
    net = _model()
    x = torch.randint(0, 64, (3, 20))
    with torch.no_grad(), capture_spla(net, max_rows=1) as captures:
        net(x)
    assert all(c.q.shape[0] == c.block_idx.shape[0] == c.out.shape[0] == c.o_sparse.shape[0] == 1 for c in captures)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    with torch.no_grad(), capture_spla(net, max_rows=1) as captures:
        net(x[:1], cu_seqlens=cu)
    assert all(c.cu_seqlens is cu and c.q.shape[:2] == (1, 20) for c in captures)
    with pytest.raises(ValueError, match="cu_seqlens"):
        LayerFidelity().update(captures[0])


def test_fidelity_of_a_window_layer_and_of_a_model():
    """A window's oracle is the window itself: recall 1; without a residual residual_err is exactly 1."""
    net = _model(rla=False, mode="window")
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    metrics = SelectionFidelityMetrics()
    with torch.no_grad(), capture_spla(net) as captures:
        net(x)
    metrics.update(captures)
    out = metrics.compute()
    assert set(out["layers"]) == {0, 1}
    assert out["mean"]["recall"] == 1.0 and out["mean"]["residual_err"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < out["mean"]["mass_share"] <= out["mean"]["oracle_mass_share"] + 1e-9
