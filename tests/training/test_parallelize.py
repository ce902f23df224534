"""``configure_model`` composes compile and FSDP2 sharding over the transformer blocks, in that order, once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from hydra_utils import make_cfg
from lightning.pytorch.strategies import ModelParallelStrategy

from spla_lit.models.transformer import TransformerBlock
from spla_lit.training import parallelize
from spla_lit.training.compile import CompileOptions
from spla_lit.training.fsdp import FSDP2Strategy


def _module(strategy, compile_options=None) -> SimpleNamespace:
    """What ``configure_model`` reads from the LightningModule."""
    net = instantiate(make_cfg(["model.n_layers=3"]).model)
    return SimpleNamespace(net=net, compile_options=compile_options, _trainer=SimpleNamespace(strategy=strategy))


def test_blocks_are_compiled_then_sharded_once(monkeypatch):
    calls = []
    monkeypatch.setattr(parallelize, "compile_blocks", lambda blocks, options: calls.append(("compile", blocks)))
    strategy = FSDP2Strategy()
    monkeypatch.setattr(strategy, "shard", lambda net, blocks: calls.append(("shard", blocks)))
    module = _module(strategy, CompileOptions(fullgraph=True))
    parallelize.configure_model(module)
    parallelize.configure_model(module)  # Lightning calls the hook again on every fit/validate
    blocks = list(module.net.layers)
    assert [kind for kind, _ in calls] == ["compile", "shard"]
    assert all(units == blocks for _, units in calls)
    assert len(blocks) == 3 and all(isinstance(b, TransformerBlock) for b in blocks)
    assert parallelize.transformer_blocks(module.net) == blocks


def test_no_compile_options_and_no_sharding_strategy_leave_the_net_as_it_is(monkeypatch):
    monkeypatch.setattr(parallelize, "compile_blocks", lambda *a: pytest.fail("compiled without options"))
    module = _module("auto")
    parallelize.configure_model(module)
    assert type(module.net.layers[0]) is TransformerBlock


def test_a_plain_model_parallel_strategy_is_refused():
    with pytest.raises(TypeError, match="FSDP2Strategy"):
        parallelize.configure_model(_module(ModelParallelStrategy()))
