"""What a Hugging Face Llama / Mistral / Qwen2 checkpoint is, in ``DecoderLM`` terms: its config read into an
:class:`HFModelSpec`, and the weight names of each side.

Everything here reads plain ``config.json`` dictionaries (no ``transformers`` import): importing a checkpoint
needs only ``safetensors``. Both config layouts are read: ``rope_parameters`` (transformers >= 5) and
``rope_theta`` + ``rope_scaling`` (earlier versions, most checkpoints on the Hub).

The architecture, as in transformers' Llama / Mistral / Qwen2 modeling: pre-norm blocks
``x + o_proj(attn(input_layernorm(x)))`` then ``x + down_proj(silu(gate_proj(h)) * up_proj(h))`` with
``h = post_attention_layernorm(x)``; RMSNorm computed in float32; RoPE in the rotate-half convention applied to
q and k of every head; grouped-query attention with ``num_key_value_heads``; Qwen2 adds biases to q/k/v (not o).
That is ``DecoderLM`` with ``model=dense``, so a converted model's logits equal the original's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError

# family (config.json's model_type) -> the transformers class in config.json's architectures
FAMILIES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# transformers' defaults where a config.json leaves a key out (the same in every family)
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class HFModelSpec:
    """A checkpoint's architecture. ``model_kwargs()`` gives the ``DecoderLM`` arguments (the ``model.*`` keys).

    family: llama | mistral | qwen2. qkv_bias: the q/k/v projections have biases (Qwen2).
    max_position_embeddings: the context the source was trained for (None if the config omits it).
    token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the config (None where absent).
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int | None = None
    token_ids: dict[str, Any] | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """The ``DecoderLM`` keyword arguments (= ``model.*`` config keys) this checkpoint fixes."""
        d = asdict(self)
        return {k: d[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                  "mlp_hidden", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings")}


def read_hf_config(path: str | os.PathLike, key: str = "init_from") -> dict[str, Any]:
    """``config.json`` of the model folder ``path`` (``ConfigError`` naming ``key`` if absent or unreadable)."""
    folder = Path(path)
    file = folder / "config.json"
    if not file.is_file():
        why = "no such folder" if not folder.is_dir() else "no config.json in it"
        raise ConfigError(f"{key}: {folder} is not a Hugging Face model folder ({why}); give a local folder "
                          "holding config.json and *.safetensors (nothing is downloaded)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {file} is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {file} does not hold a JSON object")
    return config


def _family(config: Mapping[str, Any], key: str) -> str:
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    family = model_type if model_type in FAMILIES else next(
        (f for f, cls in FAMILIES.items() if model_type is None and architectures == [cls]), None)
    if family is None or any(a != FAMILIES[family] for a in architectures):
        found = ", ".join(architectures) or f"model_type={model_type!r}"
        raise ConfigError(f"{key}: unsupported architecture {found}; supported: {', '.join(FAMILIES.values())} "
                          f"(model_type {', '.join(FAMILIES)})")
    return family


def _int(config: Mapping[str, Any], name: str, key: str, default: Any = None) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: config.json's {name} must be an integer >= 1, got {value!r}")
    return value


def rope_from_config(config: Mapping[str, Any], key: str = "init_from") -> tuple[float, dict[str, Any] | None]:
    """(rope theta, llama3 scaling or None) from either config layout; other scalings are refused by name."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" not in params and params:  # one entry per layer type
        raise ConfigError(f"{key}: per-layer-type rope_parameters are not supported")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"{key}: config.json's rope_theta must be a number > 0, got {theta!r}")
    if params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{key}: partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"{key}: unsupported RoPE scaling rope_type={rope_type!r}; supported: default, llama3")
    from ..layers.rope import LLAMA3_KEYS, check_rope_scaling

    scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_KEYS if k in params}}
    try:
        return float(theta), check_rope_scaling(scaling)
    except ValueError as e:
        raise ConfigError(f"{key}: config.json's llama3 rope scaling: {e}") from None


def spec_from_hf_config(config: Mapping[str, Any], key: str = "init_from") -> HFModelSpec:
    """Read a Llama / Mistral / Qwen2 ``config.json`` dict; :class:`ConfigError` naming ``key`` and the feature for
    anything ``DecoderLM`` cannot reproduce exactly (another architecture or activation, MLP or output biases,
    RoPE on part of the head, scalings other than llama3)."""
    family = _family(config, key)
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{key}: hidden_act={config['hidden_act']!r} is not supported (SwiGLU needs silu)")
    if config.get("mlp_bias"):
        raise ConfigError(f"{key}: mlp_bias=true (biases in the MLP) is not supported")
    if config.get("attention_bias"):
        raise ConfigError(f"{key}: attention_bias=true (biases on q/k/v and o) is not supported; q/k/v biases "
                          "alone (Qwen2) are")
    d_model = _int(config, "hidden_size", key)
    n_heads = _int(config, "num_attention_heads", key)
    n_kv_heads = _int(config, "num_key_value_heads", key, n_heads)
    head_dim = config.get("head_dim") or d_model // n_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ConfigError(f"{key}: head_dim {head_dim!r} must be an even integer (RoPE rotates pairs)")
    if n_heads % n_kv_heads:
        raise ConfigError(f"{key}: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads "
                          f"({n_kv_heads})")
    theta, scaling = rope_from_config(config, key)
    eps = config.get("rms_norm_eps", DEFAULT_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"{key}: config.json's rms_norm_eps must be a number > 0, got {eps!r}")
    max_pos = config.get("max_position_embeddings")
    return HFModelSpec(
        family=family, vocab_size=_int(config, "vocab_size", key), d_model=d_model,
        n_layers=_int(config, "num_hidden_layers", key), n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        mlp_hidden=_int(config, "intermediate_size", key), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(eps), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", max_position_embeddings=max_pos if isinstance(max_pos, int) else None,
        token_ids={k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


def sliding_window(config: Mapping[str, Any]) -> int | None:
    """The sliding window a Mistral / Qwen2 config turns on (None: full causal attention)."""
    if config.get("model_type") == "qwen2" and not config.get("use_sliding_window", False):
        return None
    window = config.get("sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) else None


# Weight names. Hugging Face (``model.``-prefixed decoder, ``lm_head``) -> DecoderLM's state dict.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
_BIAS_NAMES = {f"self_attn.{p}_proj.bias": f"attn.w{p}.bias" for p in "qkv"}
# Tensors some checkpoints store that carry no weights (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def weight_names(spec: HFModelSpec) -> dict[str, str]:
    """``{Hugging Face name: DecoderLM state-dict name}`` of every weight a checkpoint of ``spec`` holds
    (``lm_head.weight`` only when the embeddings are untied; q/k/v biases only with ``qkv_bias``)."""
    layer = dict(_LAYER_NAMES, **(_BIAS_NAMES if spec.qkv_bias else {}))
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    for i in range(spec.n_layers):
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{ours}" for hf, ours in layer.items()})
    if not spec.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names
