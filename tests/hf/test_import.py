"""init_from: tiny random Llama / Mistral / Qwen2 checkpoints made with transformers convert into DecoderLM with
equal logits (float32, 1e-4): dense, and SPLA with every block selected and the residual gate at zero. Errors name
what is wrong: architecture, weight, shape, heads."""

from __future__ import annotations

import json

import pytest
import torch
from hfmodels import VARIANTS, hf_logits, make_hf_model
from hydra.utils import instantiate
from hydra_utils import make_cfg

from spla_lit.config import ConfigError, validate_config
from spla_lit.hf import apply_init_from, init_weights, load_hf_weights, spec_from_hf_config
from spla_lit.layers.rope import rope_inv_freq

pytest.importorskip("transformers", reason='the hf extra: pip install "spla[hf]"')
pytest.importorskip("safetensors", reason='the hf extra: pip install "spla[hf]"')

N = 80  # beyond the llama3 variant's original_max_position_embeddings (16) and max_position_embeddings (64)
# SPLA that selects every block at N: 5 blocks of 16, topk 5; the residual gate starts at zero
ALL_BLOCKS = ["model=spla", "sparse.block_size=16", "sparse.topk=5", "impl=reference"]


def convert(path, overrides=()):
    """Compose `train.py init_from=<path> <overrides>`, build the model, load the checkpoint (as run.build does)."""
    cfg = make_cfg([f"init_from={path}", "data.vocab_size=64", *overrides], tiny=False)
    init = apply_init_from(cfg)
    validate_config(cfg)
    torch.manual_seed(0)
    net = instantiate(cfg.model).eval()
    return net, init_weights(cfg, net, init), cfg


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, make_hf_model(folder, request.param)


def test_dense_conversion_has_the_checkpoint_logits(checkpoint):
    variant, folder, model = checkpoint
    net, new, cfg = convert(folder, ["model=dense"])
    assert new == []
    ids = torch.randint(0, 96, (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (net(ids) - hf_logits(model, ids)).abs().max().item()
    print(f"{variant}: max |logits - HF logits| = {diff:.2e}")  # the report quotes these
    assert diff < 1e-4
    assert cfg.model.mlp_hidden == 72 and cfg.model.head_dim == 16 and cfg.model.d_model == 48
    assert cfg.model.attention.qkv_bias == variant.startswith("qwen2")
    assert cfg.hf.family == VARIANTS[variant][0] and cfg.model.tie_embeddings == variant.endswith("tied")


@pytest.mark.parametrize("variant", ["llama-llama3", "qwen2-tied"])
def test_spla_with_every_block_selected_and_the_gate_at_zero_has_the_checkpoint_logits(variant, tmp_path, caplog):
    model = make_hf_model(tmp_path, variant)
    with caplog.at_level("INFO"):
        net, new, _ = convert(tmp_path, ALL_BLOCKS)
    # the new parameters: the residual's gate (zeros) and norm (ones) per layer, listed in the log
    assert sorted(new) == sorted(f"layers.{i}.attn.rla.{p}" for i in range(2)
                                 for p in ("gate.weight", "gate.bias", "norm.weight"))
    assert "layers.*.attn.rla.gate.weight x2 (zeros)" in caplog.text and "rla.norm.weight x2 (ones)" in caplog.text
    ids = torch.randint(0, 96, (2, N), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (net(ids) - hf_logits(model, ids)).abs().max().item()
    print(f"{variant} as SPLA (all blocks, gate 0): max |logits - HF logits| = {diff:.2e}")
    assert diff < 1e-4


def test_both_config_layouts_read_the_same(tmp_path):
    make_hf_model(tmp_path, "llama-llama3")
    new = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = {"type": params.pop("rope_type"), **params}  # the oldest spelling of rope_type
    assert spec_from_hf_config(old) == spec_from_hf_config(new)


def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 5e5})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    torch.testing.assert_close(rope_inv_freq(128, 5e5, scaling), theirs, rtol=0, atol=0)
    assert not torch.equal(rope_inv_freq(128, 5e5), theirs)  # the scaling changed some frequencies


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"init_from: unsupported architecture GPT2LMHeadModel"):
        convert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="init_from: hidden_act='gelu' is not supported"):
        convert(tmp_path)
    make_hf_model(tmp_path, "llama", rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="init_from: unsupported RoPE scaling rope_type='yarn'"):
        convert(tmp_path)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model(tmp_path, "llama")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, file)
    with pytest.raises(ConfigError, match=r"init_from: missing weight\(s\) model.layers.1.mlp.up_proj.weight"):
        convert(tmp_path, ["model=dense"])
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, file)
    with pytest.raises(ConfigError, match=r"init_from: unexpected weight\(s\) model.layers.0.self_attn.q_norm"):
        convert(tmp_path, ["model=dense"])


def test_shape_mismatch_is_named(tmp_path):
    make_hf_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ConfigError, match=r"init_from: shape mismatch for model.layers.0.mlp.gate_proj.weight: "
                                          r"the checkpoint has \[72, 48\], the model's layers.0.mlp.w_gate.weight is"):
        convert(tmp_path, ["model=dense"])


@pytest.mark.parametrize(("override", "key"), [("model.n_kv_heads=4", "model.n_kv_heads"),
                                               ("model.n_heads=8", "model.n_heads"),
                                               ("model.d_model=64", "model.d_model"),
                                               ("model.attention.qkv_bias=true", "model.attention.qkv_bias")])
def test_an_override_that_conflicts_with_the_checkpoint_is_named(tmp_path, override, key):
    make_hf_model(tmp_path, "llama")
    with pytest.raises(ConfigError, match=rf"^{key}: .* conflicts with the checkpoint"):
        convert(tmp_path, [override])


def test_attention_that_cannot_hold_the_checkpoint_heads_is_named(tmp_path):
    make_hf_model(tmp_path, "llama")
    with pytest.raises(ConfigError, match=r"^model.attention.qk_norm: the checkpoint .* has no q/k norms"):
        convert(tmp_path, ["model.attention.qk_norm=true"])
    # the API on a model built by hand with other heads
    net, _, _ = convert(tmp_path, ["model=dense"])
    from spla_lit.layers import DenseAttention
    from spla_lit.models import DecoderLM

    other = DecoderLM(96, DenseAttention, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                      mlp_hidden=72, tie_embeddings=False)
    with pytest.raises(ConfigError, match=r"^model.n_kv_heads: the model has 4 but the checkpoint \(init_from\) "
                                          r"has num_key_value_heads=2"):
        load_hf_weights(other, tmp_path)


def test_rope_may_be_changed_on_purpose_and_data_must_fit_the_vocabulary(tmp_path):
    make_hf_model(tmp_path, "llama")
    _, _, cfg = convert(tmp_path, ["model=dense", "model.rope_theta=5000.0"])
    assert cfg.model.rope_theta == 5000.0 and cfg.hf.rope_theta == 500.0
    with pytest.raises(ConfigError, match=r"^data.vocab_size: the data's ids reach 512, more than the checkpoint's"):
        convert(tmp_path, ["data.vocab_size=512"])
    with pytest.raises(ConfigError, match=r"^init_from: .* is not a Hugging Face model folder \(no such folder\)"):
        convert(tmp_path / "nowhere")


@pytest.mark.parametrize(("scaling", "message"), [
    ({"rope_type": "yarn", "factor": 2.0}, "model.rope_scaling.rope_type"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "model.rope_scaling.original_max_position_embeddings: must be a number > 0, got None"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, "model.rope_scaling.high_freq_factor \\(1.0\\) must be larger"),
    ({"rope_type": "llama3", "factor": 8.0, "beta": 1}, "model.rope_scaling: unknown key\\(s\\) beta"),
])
def test_a_bad_rope_scaling_is_named(scaling, message):
    from spla_lit.layers.rope import RotaryEmbedding

    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(16, 10000.0, scaling)


@pytest.mark.parametrize(("overrides", "warning"), [
    (["model=linear"], "model=linear replaces softmax attention"),
    (["model=spla", "rla.combine=joint"], "rla.combine=joint has no zero-initialised gate"),
])
def test_attention_that_cannot_start_as_the_checkpoint_says_so(tmp_path, caplog, overrides, warning):
    make_hf_model(tmp_path, "llama")
    with caplog.at_level("WARNING"):
        convert(tmp_path, overrides)
    assert warning in caplog.text
