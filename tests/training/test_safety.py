"""Configs build only allowlisted classes: every shipped `_target_` is allowed, and crafted configs and
checkpoints (builtins.open, pathlib.Path.touch, os.system, targets hidden in lists / `_args_` / resolvers) are
refused, naming the key and the target, before anything is built, on every path that reads a checkpoint."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra_utils import CONF, make_cfg
from omegaconf import OmegaConf

from spla_lit.config import ConfigError
from spla_lit.eval.loading import load_model
from spla_lit.safety import ALLOWED_TARGETS, MODEL_TARGETS, UnsafeConfigError, check_targets, safe_instantiate
from spla_lit.training.checkpoint_io import CheckpointError, read_checkpoint, save_checkpoint_file
from spla_lit.training.consolidate import main as consolidate_main
from spla_lit.training.run import train


def _targets(node, key=""):
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "_target_":
                yield key, value
            yield from _targets(value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def test_every_target_of_the_shipped_configs_is_allowed():
    found = {}
    for path in sorted(CONF.rglob("*.yaml")):
        for key, target in _targets(yaml.safe_load(path.read_text()) or {}):
            found[f"{path.relative_to(CONF)}:{key}"] = target
    assert len(found) >= 15  # the walk sees the configs
    unknown = {where: t for where, t in found.items() if t not in ALLOWED_TARGETS}
    assert not unknown, f"add these to spla_lit.safety.ALLOWED_TARGETS (after review): {unknown}"
    composed = make_cfg(["callbacks=fidelity"])  # and the composed default config
    check_targets({k: v for k, v in composed.items() if k != "hydra"})


def test_every_allowed_target_imports():
    from hydra._internal.utils import _locate

    for target in sorted(ALLOWED_TARGETS):
        assert callable(_locate(target)), target


def _crafted(victim: Path) -> list[tuple[str, dict, str]]:
    """(name, config, the key the error must name): each would create or truncate ``victim`` if built."""
    open_ = {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
    return [
        ("open", {"model": {"attention": open_}}, "model.attention._target_"),
        ("touch", {"model": {"_target_": "pathlib.Path.touch", "_args_": [str(victim)]}}, "model._target_"),
        ("system", {"model": {"_target_": "os.system", "_args_": [f"touch {victim}"]}}, "model._target_"),
        ("in a list", {"model": {"layers": [1, {"x": open_}]}}, "model.layers[1].x._target_"),
        ("in _args_", {"model": {"_target_": "spla_lit.models.DecoderLM", "_args_": [open_]}},
         "model._args_[0]._target_"),
        ("partial", {"model": {"_target_": "functools.partial", "_args_": [open_]}}, "model._target_"),
        ("partial flag", {"model": {**open_, "_partial_": True}}, "model._target_"),
        ("not a string", {"model": {"_target_": {"_target_": "builtins.open"}}}, "model._target_"),
    ]


def test_crafted_configs_are_refused_naming_key_and_target(tmp_path):
    victim = tmp_path / "victim"
    for name, config, key in _crafted(victim):
        for node in (config, OmegaConf.create(config)):
            with pytest.raises(UnsafeConfigError, match=f"^{re.escape(key)}: ") as e:
                safe_instantiate(node, "")
            assert "is not an allowed target" in str(e.value), name
    assert not victim.exists()
    with pytest.raises(UnsafeConfigError, match=r"^model\._partial_: 'yes'"):
        check_targets({"model": {"_target_": "spla_lit.models.DecoderLM", "_partial_": "yes"}})


def test_resolvers_cannot_smuggle_a_target(tmp_path):
    victim = tmp_path / "victim"
    # oc.create builds a node when resolved: refused as an interpolation in a stored config, and its resolved
    # value is checked again before instantiation
    config = {"model": {"attention": f"${{oc.create:{{_target_: builtins.open, _args_: [{victim}, w]}}}}"}}
    with pytest.raises(UnsafeConfigError, match=r"^spla_config\.model\.attention: .* is an interpolation"):
        check_targets(config, "spla_config", stored=True)
    with pytest.raises(UnsafeConfigError, match=r"^model\.attention\._target_: 'builtins\.open'"):
        safe_instantiate(OmegaConf.create(config).model, "model")
    with pytest.raises(UnsafeConfigError, match=r"_target_: '\$\{oc\.env:X\}'"):
        check_targets({"model": {"_target_": "${oc.env:X}"}})
    assert not victim.exists()


def test_safe_instantiate_builds_allowed_classes_only_from_their_list():
    cfg = make_cfg(["model=dense"])
    net = safe_instantiate(cfg.model, "model", MODEL_TARGETS)
    assert type(net).__name__ == "DecoderLM"
    with pytest.raises(UnsafeConfigError, match=r"^data\._target_: 'spla_lit\.data\.SyntheticDataModule'"):
        safe_instantiate(cfg.data, "data", MODEL_TARGETS)  # eval builds models only


# ------------------------------------------------------------------------------------ crafted checkpoints


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2"], out))
    return out / "checkpoints" / "last.ckpt"


def _craft(good: Path, out: Path, edit) -> Path:
    """A copy of ``good`` with its stored config edited, re-saved with valid checksums (as an attacker would)."""
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["spla_config"] = edit(copy.deepcopy(ckpt["spla_config"]))
    ckpt.pop("spla_checksums")
    save_checkpoint_file(ckpt, out)
    return out


@pytest.mark.parametrize("name", ["open", "touch", "system", "in a list", "in _args_", "partial", "partial flag"])
def test_crafted_checkpoints_are_refused_by_eval_resume_and_consolidate(good_ckpt, tmp_path, name):
    victim = tmp_path / "victim"
    _, crafted, key = next(c for c in _crafted(victim) if c[0] == name)

    def edit(config):
        config["model"] = {**config["model"], **crafted["model"]}
        return config

    bad = _craft(good_ckpt, tmp_path / "bad.ckpt", edit)
    pattern = "^" + re.escape(f"ckpt_path: {bad}: spla_config.{key}: ")
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(bad)  # eval.py
    with pytest.raises(ConfigError, match=pattern):  # train.py ckpt_path=... (resume), refused before building
        train(make_cfg(["trainer.max_steps=3", f"ckpt_path={bad}"], tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists() and not victim.exists()


def test_a_crafted_sharded_checkpoint_is_refused_by_consolidate(good_ckpt, tmp_path, capsys):
    victim = tmp_path / "victim"
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    meta = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    del meta["state_dict"], meta["spla_checksums"]
    meta["spla_config"]["model"]["attention"] = {"_target_": "pathlib.Path.touch", "_args_": [str(victim)]}
    torch.save(meta, folder / "meta.pt")
    (folder / ".metadata").write_bytes(b"not read: refused before")
    assert consolidate_main([str(folder), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: src: {folder}: spla_config.model.attention._target_: "
                                           "'pathlib.Path.touch' is not an allowed target")
    assert not victim.exists() and not (tmp_path / "out.ckpt").exists()


def test_train_refuses_a_config_target_outside_the_allowlist(tmp_path):
    victim = tmp_path / "victim"
    with pytest.raises(UnsafeConfigError, match=r"^callbacks\.evil\._target_: 'pathlib\.Path\.touch'"):
        train(make_cfg(["+callbacks.evil._target_=pathlib.Path.touch", f"+callbacks.evil._args_=[{victim}]"],
                       tmp_path / "run"))
    assert not victim.exists() and not (tmp_path / "run").exists()
