"""Config groups compose, every ablation is one override (one spelling), and bad overrides fail before any model is
built."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from hydra_utils import ROOT, make_cfg
from omegaconf import OmegaConf

from spla_lit.config import SELECTION_KEYS, ConfigError, selection_from_config, uses_spla, validate_config
from spla_lit.layers import DenseAttention, LinearAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.options import Selection
from spla_lit.training import run as run_module

GROUP_OPTIONS = {
    "model": ["spla", "dense", "linear"],
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
    """The ablation table of `docs/spla.md` §6: each is one override and changes what it should."""
    base = instantiate(make_cfg([]).model).layers[0].attn
    assert base.scorer.method == "taylor2" and isinstance(base.rla, ResidualLinearAttention)
    assert base.rla.mode == "subtract" and base.sparse.query_block == 1
    assert isinstance(instantiate(make_cfg(["model=dense"]).model).layers[0].attn, DenseAttention)
    assert instantiate(make_cfg(["scorer=random"]).model).layers[0].attn.scorer.method == "random"
    assert instantiate(make_cfg(["scorer=taylor1"]).model).layers[0].attn.scorer.method == "taylor1"
    assert instantiate(make_cfg(["rla=none"]).model).layers[0].attn.rla is None
    assert instantiate(make_cfg(["rla=explicit"]).model).layers[0].attn.rla.mode == "explicit"
    window = instantiate(make_cfg(["sparse=window"]).model).layers[0].attn
    assert window.selection.mode == "window" and window.scorer is None and window.selection.local_blocks == 4
    with pytest.raises(ConfigCompositionException, match="model"):  # one spelling: no model=sparse
        make_cfg(["model=sparse"])


def test_rla_modes_share_one_base():
    """rla=subtract and rla=explicit differ only in their mode; sparse=topk and sparse=window share the geometry
    keys; no config carries a key its component ignores (a window has no topk)."""
    sub, exp = (OmegaConf.to_container(make_cfg([f"rla={m}"], tiny=False).rla) for m in ("subtract", "explicit"))
    assert sub.pop("mode") == "subtract" and exp.pop("mode") == "explicit" and sub == exp
    top, win = (OmegaConf.to_container(make_cfg([f"sparse={m}"], tiny=False).sparse) for m in ("topk", "window"))
    assert "topk" not in win and top["topk"] == 4
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert "# unused" not in path.read_text(), path


def test_ablation_variants_are_the_same_overrides():
    """Each +variant arm composes to exactly the model of its plain overrides."""
    arms = {"dense": ["model=dense"], "taylor2": ["model=spla", "scorer=taylor2", "rla=subtract"],
            "taylor1": ["scorer=taylor1"], "random": ["scorer=random"], "no_rla": ["rla=none"],
            "joint": ["rla.combine=joint"], "window": ["sparse=window"], "linear": ["model=linear"]}
    assert {p.stem for p in (ROOT / "conf" / "variant").glob("*.yaml")} == set(arms)
    for variant, plain in arms.items():
        a = OmegaConf.to_container(make_cfg([f"+variant={variant}"]).model, resolve=True)
        b = OmegaConf.to_container(make_cfg(plain).model, resolve=True)
        assert a == b, variant


def test_attention_kind_is_read_from_the_config_structure():
    assert uses_spla(make_cfg([])) and uses_spla(make_cfg(["sparse=window", "rla=none"]))
    assert not uses_spla(make_cfg(["model=dense"])) and not uses_spla(make_cfg(["model=linear"]))
    cfg = make_cfg([])
    cfg.model.attention._target_ = "my_project.MyRenamedSPLA"  # a subclass or a renamed layer: same structure
    assert uses_spla(cfg)
    summary = run_module.run_summary(cfg)
    assert summary["sparse.topk"] == 3 and summary["rla"] == "subtract/elu1/add"
    assert "sparse.topk" not in run_module.run_summary(make_cfg(["model=dense"]))


def test_selection_from_config_is_the_layers_selection():
    assert set(SELECTION_KEYS) == {f.name for f in fields(Selection)} - {"scale"}
    for overrides in ([], ["sparse=window"], ["scorer=random", "sparse.sink_blocks=1"], ["scorer.covariance=full"]):
        cfg = make_cfg(overrides)
        assert selection_from_config(cfg) == instantiate(cfg.model).layers[0].attn.selection, overrides


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
    (["rla.mode=none"], "rla.mode"),
    (["sparse.mode=slide"], "sparse.mode"),
    (["sparse.block_size=32", "sparse.query_block=256", "sparse.topk=3"], "sparse.topk"),  # 8 blocks overlapped
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
