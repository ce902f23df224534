"""Config groups compose, every ablation is one override, and bad overrides fail before any model is built."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from hydra_utils import ROOT, make_cfg
from omegaconf import OmegaConf

from spla_lit.config import ConfigError, validate_config
from spla_lit.layers import DenseAttention, LinearAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.training import run as run_module

GROUP_OPTIONS = {
    "model": ["spla", "dense", "sparse", "linear"],
    "scorer": ["taylor2", "taylor1", "random", "oracle"],
    "sparse": ["topk", "window"],
    "rla": ["subtract", "explicit", "none"],
}


def test_every_option_is_on_disk():
    for group, options in GROUP_OPTIONS.items():
        on_disk = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_")}
        assert on_disk == set(options), group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_each_option_composes_and_builds(group, option):
    cfg = make_cfg([f"{group}={option}"])
    validate_config(cfg)
    net = instantiate(cfg.model)
    attn = net.layers[0].attn
    expected = {"dense": DenseAttention, "linear": LinearAttention}.get(cfg.model.attention._target_.split(".")[-1].
                                                                       replace("Attention", "").lower())
    if expected is not None:
        assert isinstance(attn, expected)
    else:
        assert isinstance(attn, SPLAAttention)


def test_ablations_are_one_override():
    """The design note's ablation table: each is one override and changes what it should."""
    base = instantiate(make_cfg([]).model).layers[0].attn
    assert base.scorer.method == "taylor2" and isinstance(base.rla, ResidualLinearAttention)
    assert base.rla.mode == "subtract" and base.sparse.query_block == 1
    assert isinstance(instantiate(make_cfg(["model=dense"]).model).layers[0].attn, DenseAttention)
    assert instantiate(make_cfg(["scorer=random"]).model).layers[0].attn.scorer.method == "random"
    assert instantiate(make_cfg(["scorer=taylor1"]).model).layers[0].attn.scorer.method == "taylor1"
    assert instantiate(make_cfg(["rla=none"]).model).layers[0].attn.rla is None
    assert instantiate(make_cfg(["model=sparse"]).model).layers[0].attn.rla is None
    assert instantiate(make_cfg(["rla=explicit"]).model).layers[0].attn.rla.mode == "explicit"


def test_components_are_built_per_layer():
    net = instantiate(make_cfg([]).model)
    a, b = net.layers[0].attn, net.layers[1].attn
    assert a.rla is not b.rla and a.scorer is not b.scorer
    assert a.rla.gate.weight.data_ptr() != b.rla.gate.weight.data_ptr()


@pytest.mark.parametrize("override,key", [
    (["sparse.topk=1", "sparse.local_blocks=2"], "sparse.topk"),
    (["sparse.topk=0"], "sparse.topk"),
    (["sparse.block_size=-4"], "sparse.block_size"),
    (["sparse.sink_blocks=-1"], "sparse.sink_blocks"),
    (["sparse.query_block=24"], "sparse.query_block"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.n_layers=-1"], "model.n_layers"),
    (["data.seq_len=0"], "data.seq_len"),
    (["scorer.method=foo"], "scorer.method"),
    (["scorer.covariance=dense"], "scorer.covariance"),
    (["rla.feature_map=tanh"], "rla.feature_map"),
    (["rla.feature_map=identity"], "rla.feature_map"),  # identity with normalize=true
    (["rla.combine=mul"], "rla.combine"),
    (["impl=cuda"], "impl"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["optim.lr=-1.0"], "optim.lr"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate_config(make_cfg(override))


def test_gpu_request_without_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^trainer.accelerator.*no CUDA device"):
        validate_config(make_cfg(["trainer.accelerator=gpu"]))


def test_default_config_never_asks_for_cuda():
    cfg = make_cfg([], tiny=False)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.sparse.query_block == 1  # per-token (causal) selection by default


def test_unknown_group_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="scorer"):
        make_cfg(["scorer=foo"])


def test_bad_override_fails_before_the_model_is_built(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(run_module, "safe_instantiate", lambda *a, **k: built.append(a) or None)
    with pytest.raises(ConfigError, match="^sparse.topk"):
        run_module.build(make_cfg(["sparse.topk=0"], tmp_path))
    assert built == []


def test_train_py_bad_override_exits_fast_with_the_key():
    proc = subprocess.run([sys.executable, "train.py", "model.n_kv_heads=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.n_kv_heads" in proc.stderr + proc.stdout


def test_resolved_config_is_plain():
    cfg = make_cfg([])
    plain = OmegaConf.to_container(cfg.model, resolve=True)
    assert plain["attention"]["scorer"]["method"] == "taylor2"
