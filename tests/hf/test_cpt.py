"""experiment=cpt: a pretrained checkpoint (a tiny random Llama made with transformers, with the test tokenizer)
continues training as SPLA on prepared text. The new parameters train alone for the first steps (exactly: the
pretrained weights do not move), a resume at any step is exact, and trainer=fsdp on 2 CPU processes (gloo)
matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ckpt_weights import assert_same_weights, net_weights
from hfmodels import cpt_overrides, make_hf_model
from hydra_utils import ROOT, make_cfg

from spla_lit.config import ConfigError
from spla_lit.hf import spec_from_hf_config
from spla_lit.hf.spec import weight_names
from spla_lit.training.run import train

pytest.importorskip("transformers", reason='the hf extra: pip install "spla[hf]"')


@pytest.fixture(scope="module")
def source(tmp_path_factory, prepared, tokenizer_dir):
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model(folder, "llama", vocab_size=vocab, tokenizer=tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory, source, prepared):
    out = tmp_path_factory.mktemp("cpt")
    train(make_cfg(cpt_overrides(source, prepared), out, tiny=False))
    return out


def _pretrained(source, weights):
    """{our name: (checkpoint tensor, the source's tensor)} of every weight init_from loaded."""
    from safetensors.torch import load_file

    spec = spec_from_hf_config(json.loads((source / "config.json").read_text()))
    theirs = load_file(source / "model.safetensors")
    return {ours: (weights[f"net.{ours}"], theirs[hf]) for hf, ours in weight_names(spec).items()}


@pytest.mark.slow
def test_new_parameters_train_alone_first_then_everything(cpt_run, source):
    step2 = net_weights(cpt_run / "checkpoints" / "step000002.ckpt")
    for name, (ours, theirs) in _pretrained(source, step2).items():
        assert torch.equal(ours, theirs), f"{name} moved during freeze_pretrained_steps"
    gates = [step2[f"net.layers.{i}.attn.rla.gate.weight"] for i in range(2)]
    assert all(g.abs().sum() > 0 for g in gates)  # the new parameters did train
    last = net_weights(cpt_run / "checkpoints" / "last.ckpt")
    moved = [n for n, (ours, theirs) in _pretrained(source, last).items() if not torch.equal(ours, theirs)]
    assert len(moved) == len(_pretrained(source, last))  # step 3 on, everything trains


@pytest.mark.slow
def test_the_run_records_its_source_and_tokenizer(cpt_run, source, tokenizer_dir):
    ckpt = torch.load(cpt_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cfg = ckpt["spla_config"]
    assert cfg["hf"]["family"] == "llama" and cfg["hf"]["path"] == str(source.resolve())
    assert cfg["model"]["d_model"] == 48 and cfg["model"]["mlp_hidden"] == 72 and cfg["model"]["n_kv_heads"] == 2
    assert cfg["tokenizer"] == str((cpt_run / "tokenizer").resolve())
    assert (cpt_run / "tokenizer" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert cfg["sparse"]["sink_blocks"] == 1 and cfg["optim"]["lr"] == 1e-4  # the experiment's CPT settings


@pytest.mark.slow
def test_resume_inside_and_after_the_frozen_steps_is_exact(cpt_run, source, prepared, tmp_path):
    ckpt = cpt_run / "checkpoints" / "step000002.ckpt"
    train(make_cfg(cpt_overrides(source, prepared, f"ckpt_path={ckpt}"), tmp_path, tiny=False))
    assert_same_weights(net_weights(tmp_path / "checkpoints" / "last.ckpt"),
                        net_weights(cpt_run / "checkpoints" / "last.ckpt"), rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process(cpt_run, source, prepared, tmp_path):
    overrides = cpt_overrides(source, prepared, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                              "trainer.precision=32-true", "data.batch_size=1", f"hydra.run.dir={tmp_path}")
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = tmp_path / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    assert_same_weights(net_weights(sharded), net_weights(cpt_run / "checkpoints" / "last.ckpt"))
    frozen = net_weights(tmp_path / "checkpoints" / "step000002.ckpt")
    for name, (ours, theirs) in _pretrained(source, frozen).items():
        assert torch.equal(ours, theirs), f"{name} moved during freeze_pretrained_steps under FSDP"


def test_cpt_needs_init_from_and_freezing_needs_new_parameters(tmp_path, source, prepared):
    from spla_lit.training.run import build

    with pytest.raises(ConfigError, match="^init_from: required by this experiment"):
        build(make_cfg(["experiment=cpt", f"data.path={prepared}"], tmp_path, tiny=False))
    with pytest.raises(ConfigError, match="^optim.freeze_pretrained_steps: the model has no parameter"):
        build(make_cfg(cpt_overrides(source, prepared, "model=dense"), tmp_path, tiny=False))
    with pytest.raises(ConfigError, match="^optim.freeze_pretrained_steps: only applies with init_from"):
        build(make_cfg(["optim.freeze_pretrained_steps=2"], tmp_path))


def test_data_prepared_with_another_tokenizer_is_refused(tmp_path, source, prepared):
    from spla_lit.training.run import build

    other = tmp_path / "other"
    other.mkdir()
    for f in source.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer.json").write_text((source / "tokenizer.json").read_text().replace('"<pad>"', '"<PAD>"'))
    with pytest.raises(ConfigError, match="^data.path: .* was prepared with another tokenizer"):
        build(make_cfg(cpt_overrides(other, prepared), tmp_path, tiny=False))


def test_held_schedule_is_zero_then_the_warmup_cosine_restarted():
    from spla_lit.training.schedule import held_then_warmup_cosine, warmup_cosine

    kw = dict(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [held_then_warmup_cosine(s, hold_steps=5, **kw) for s in range(5)] == [0.0] * 5
    assert [held_then_warmup_cosine(s, hold_steps=5, **kw) for s in range(5, 25)] == [
        warmup_cosine(s, warmup_steps=4, total_steps=15, min_lr_ratio=0.1) for s in range(20)]
    assert [held_then_warmup_cosine(s, hold_steps=0, **kw) for s in range(25)] == [
        warmup_cosine(s, **kw) for s in range(25)]


def test_a_run_records_its_tokenizer_when_it_can(tmp_path, prepared, tokenizer_dir, caplog):
    from spla_lit.hf import record_tokenizer

    tokens = ["data=tokens", f"data.path={prepared}"]
    cfg = make_cfg(tokens, tmp_path / "a", tiny=False)
    assert record_tokenizer(cfg, None) == tmp_path / "a" / "tokenizer" and cfg.tokenizer.endswith("tokenizer")
    cfg = make_cfg([*tokens, f"tokenizer={tokenizer_dir / 'tokenizer.json'}"], tmp_path / "b", tiny=False)
    assert (record_tokenizer(cfg, None) / "tokenizer_config.json").is_file()  # a file names its folder
    with pytest.raises(ConfigError, match="^tokenizer: .* holds no tokenizer file"):
        record_tokenizer(make_cfg([*tokens, f"tokenizer={tmp_path}"], tmp_path / "c", tiny=False), None)
    assert record_tokenizer(make_cfg([], tmp_path / "d"), None) is None  # synthetic data: none
