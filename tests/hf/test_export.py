"""python -m spla_lit.export: a checkpoint as a Hugging Face folder. model=dense loads with plain
AutoModelForCausalLM in its family's native format, SPLA with its modeling code (trust_remote_code); logits equal
ours, weights in safetensors shards, tokenizer copied, the folder written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from hfmodels import cpt_overrides, make_hf_model
from hydra_utils import make_cfg

from spla_lit.config import ConfigError
from spla_lit.eval.loading import load_model
from spla_lit.export import export, main
from spla_lit.training.run import train

transformers = pytest.importorskip("transformers", reason='the hf extra: pip install "spla[hf]"')
pytestmark = pytest.mark.slow  # each module fixture trains a model for 2 steps


def _train(out, source, prepared, *extra):
    """2 steps of experiment=cpt from ``source`` (all parameters training)."""
    train(make_cfg(cpt_overrides(source, prepared, "trainer.max_steps=2", "optim.freeze_pretrained_steps=0", *extra),
                   out, tiny=False))
    return out


@pytest.fixture(scope="module")
def vocab(prepared):
    return json.loads((prepared / "manifest.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, prepared, tokenizer_dir, vocab):
    source = tmp_path_factory.mktemp("qwen2")
    make_hf_model(source, "qwen2", vocab_size=vocab, tokenizer=tokenizer_dir)
    return _train(tmp_path_factory.mktemp("dense"), source, prepared, "model=dense")


@pytest.fixture(scope="module")
def spla_run(tmp_path_factory, prepared, tokenizer_dir, vocab):
    source = tmp_path_factory.mktemp("llama")
    make_hf_model(source, "llama-tied", vocab_size=vocab, tokenizer=tokenizer_dir)
    return _train(tmp_path_factory.mktemp("spla"), source, prepared)


def _ours_and_theirs(run, out, **kwargs):
    ours = load_model(run).net
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kwargs).eval()
    ids = torch.randint(0, ours.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return ours(ids), theirs(ids).logits, theirs


@pytest.mark.parametrize("family", [None, "llama", "mistral"])
def test_dense_exports_to_its_native_family(dense_run, tmp_path, family):
    out = tmp_path / "export"
    if family in ("llama", "mistral"):  # the q/k/v biases of the Qwen2 source have no place there
        with pytest.raises(ConfigError, match=f"^family: {family} checkpoints have no q/k/v biases"):
            export(dense_run, out, family=family)
        assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
        return
    export(dense_run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    ours, logits, model = _ours_and_theirs(dense_run, out)  # plain from_pretrained: no remote code
    diff = (ours - logits).abs().max().item()
    print(f"dense -> Qwen2ForCausalLM: max |logits - ours| = {diff:.2e}")
    assert diff < 1e-4 and type(model).__name__ == "Qwen2ForCausalLM"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_dense_without_biases_exports_as_llama_and_mistral(tmp_path, prepared, tokenizer_dir, vocab):
    source = tmp_path / "llama"
    make_hf_model(source, "llama-llama3", vocab_size=vocab, tokenizer=tokenizer_dir)
    run = _train(tmp_path / "run", source, prepared, "model=dense")
    for family in ("llama", "mistral"):
        out = tmp_path / f"export-{family}"
        export(run, out, family=family, max_shard_size="40KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # sharded by size
        ours, logits, model = _ours_and_theirs(run, out)
        diff = (ours - logits).abs().max().item()
        print(f"dense -> {type(model).__name__} (llama3 rope, {len(set(index['weight_map'].values()))} shards): "
              f"max |logits - ours| = {diff:.2e}")
        assert diff < 1e-4


def test_spla_exports_with_its_modeling_code_and_generates(spla_run, tmp_path):
    out = tmp_path / "export"
    main([f"ckpt_path={spla_run}", f"out={out}", "verify=true"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "configuration_spla.py", "modeling_spla.py",
                                               "model.safetensors", "tokenizer.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["spla_model"]["attention"]["_target_"] == "spla_lit.layers.SPLAAttention"
    ours, logits, model = _ours_and_theirs(spla_run, out, trust_remote_code=True)
    diff = (ours - logits).abs().max().item()
    print(f"SPLA -> SPLAForCausalLM (remote code): max |logits - ours| = {diff:.2e}")
    assert diff < 1e-4
    assert model.model.lm_head.weight is model.model.embed.weight  # tied, stored once
    # generate() (greedy, whole prefix each step until the inference cache) = our greedy loop
    from spla_lit.eval.text_tasks import greedy_generate

    prompt = torch.tensor([[5, 17, 42, 8, 99]])
    out_ids = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_ids[:, 5:], greedy_generate(load_model(spla_run).net, prompt, 6))
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok.decode(tok("def f(x):").input_ids) == "def f(x):"


def test_export_refuses_an_existing_folder_and_leaves_nothing_on_failure(spla_run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(ConfigError, match="^out: .* exists; give another folder or overwrite=true"):
        export(spla_run, out)
    import spla_lit.hf.exporter as module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_sharded", fail)
    with pytest.raises(OSError, match="disk full"):
        export(spla_run, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and not list(out.iterdir())  # old one kept
    with pytest.raises(ConfigError, match="^family: only model=dense exports to a native family"):
        export(spla_run, tmp_path / "x", family="llama")
    with pytest.raises(ConfigError, match="^max_shard_size: expected a size like 2GB"):
        export(spla_run, tmp_path / "x", max_shard_size="lots")


def test_remote_code_refuses_a_config_that_builds_anything_else(tmp_path):
    from spla_lit.hf.build import build_decoder

    model = {"_target_": "spla_lit.models.DecoderLM", "vocab_size": 8,
             "attention": {"_target_": "builtins.exec", "_partial_": True}}
    with pytest.raises(ConfigError, match=r"^spla_model.attention._target_: 'builtins.exec' is not an allowed target"):
        build_decoder(model)
    with pytest.raises(ConfigError, match="^spla_model: expected the config of a spla_lit.models.DecoderLM"):
        build_decoder({"_target_": "os.system", "command": "true"})
