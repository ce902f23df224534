"""The decoder LM with every attention config: causality, packed sequences, and the SPLA identities."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.utils import instantiate
from hydra_utils import make_cfg

from spla_lit.layers import DenseAttention

CONFIGS = (
    [["model=dense"], ["model=linear"]]
    + [["model=spla", f"scorer={s}", f"rla={r}"]
       for s, r in itertools.product(["taylor2", "taylor1", "random", "oracle"], ["subtract", "explicit", "none"])]
    + [["model=spla", "sparse=window"], ["model=spla", "rla.combine=joint"], ["model=spla", "scorer.covariance=full"],
       ["model=spla", "scorer.covariance=lowrank"], ["model=spla", "rla.feature_map=taylor"],
       ["model=spla", "sparse.sink_blocks=1"], ["model=spla", "sparse=window", "rla=none"],
       ["model=spla", "sparse=window", "rla.combine=joint"], ["model=spla", "rla.norm=false"]]
)
SMALL = ["model.d_model=32", "model.n_layers=2", "sparse.block_size=4", "sparse.topk=3", "data.vocab_size=64"]


def _model(overrides, seed=0, gate=0.5):
    torch.manual_seed(seed)
    net = instantiate(make_cfg(SMALL + overrides).model).eval()
    with torch.no_grad():  # open the zero-initialised RLA gates so the residual path is exercised
        for m in net.modules():
            if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Linear):
                m.gate.bias.fill_(gate)
    return net


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(o))
def test_model_is_causal(overrides):
    net = _model(overrides)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 37), generator=g)
    with torch.no_grad():
        ref = net(x)
        for i in (0, 5, 16, 30):
            y = x.clone()
            y[:, i + 1:] = torch.randint(0, 64, y[:, i + 1:].shape, generator=g)
            out = net(y)
            torch.testing.assert_close(out[:, : i + 1], ref[:, : i + 1], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out[:, i + 1:], ref[:, i + 1:])  # the change did reach the future


@pytest.mark.parametrize("overrides", [["model=dense"], ["model=linear"], ["model=spla"], ["model=spla", "rla=none"],
                                       ["model=spla", "rla.combine=joint"]], ids=lambda o: ",".join(o))
def test_packed_sequences_equal_separate_runs(overrides):
    net = _model(overrides)
    g = torch.Generator().manual_seed(2)
    lengths = [11, 20, 6]
    seqs = [torch.randint(0, 64, (1, n), generator=g) for n in lengths]
    cu = torch.tensor([0, 11, 31, 37], dtype=torch.int32)
    with torch.no_grad():
        packed = net(torch.cat(seqs, 1), cu_seqlens=cu)
        separate = torch.cat([net(s) for s in seqs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_zero_gate_spla_equals_pure_sparse_attention():
    """With the RLA gate at its zero init, a converted model computes exactly the sparse attention."""
    torch.manual_seed(0)
    spla = instantiate(make_cfg(SMALL + ["model=spla"]).model).eval()
    sparse = instantiate(make_cfg(SMALL + ["model=spla", "rla=none"]).model).eval()
    missing, unexpected = sparse.load_state_dict(spla.state_dict(), strict=False)
    assert not missing and all(".rla." in k for k in unexpected)
    x = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(spla(x), sparse(x), rtol=0, atol=0)


def test_all_blocks_selected_equals_dense_attention():
    torch.manual_seed(0)
    dense = instantiate(make_cfg(SMALL + ["model=dense"]).model).eval()
    sparse = instantiate(make_cfg(SMALL + ["rla=none", "sparse.topk=16"]).model).eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randint(0, 64, (2, 40))  # 10 blocks of 4 <= topk
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
    assert isinstance(dense.layers[0].attn, DenseAttention)


def test_rla_gets_gradients_and_stats():
    net = _model(["model=spla"], gate=0.0).train()
    x = torch.randint(0, 64, (2, 33))
    net(x).float().logsumexp(-1).mean().backward()
    rla = net.layers[0].attn.rla
    # zero gate: the gate's own gradient is non-zero, so it opens during training
    assert rla.gate.weight.grad is not None and rla.gate.weight.grad.abs().sum() > 0
    stats = net.attention_stats()
    assert set(stats) == {"rla/gate_abs", "rla/residual_share"} and float(stats["rla/gate_abs"]) == 0.0


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = instantiate(make_cfg(SMALL + [f"model.activation_checkpointing={str(ckpt).lower()}"]).model).train()
        x = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(3))
        net(x).float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_random_scorer_is_deterministic_in_eval_and_advances_in_training():
    net = _model(["model=spla", "scorer=random"])
    x = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        a, b = net(x), net(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    scorer = net.layers[0].attn.scorer
    net.train()
    with torch.no_grad():
        net(x)
    assert int(scorer.calls) == 1
