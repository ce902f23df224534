"""Weights between a Hugging Face Llama / Mistral / Qwen2 folder and a ``DecoderLM`` of any attention.

:func:`load_hf_weights` fills the pretrained tensors of a model built with the checkpoint's sizes (see
:func:`~spla_lit.hf.init_from.apply_init_from`); what the checkpoint does not have (an SPLA layer's residual gate
and norm, a scorer's counter) keeps the model's own initialisation, which for ``model=spla`` with ``rla.combine=add``
leaves every layer computing the pretrained function (the gate starts at zero) up to the block selection.
:func:`hf_state_dict` is the reverse, for the export.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .spec import FAMILIES, IGNORED_SUFFIXES, HFModelSpec, read_hf_config, spec_from_hf_config, weight_names
from .weights import iter_tensors, tensor_shapes, weight_files

log = logging.getLogger(__name__)

# DecoderLM attribute -> (model.* config key, config.json key) checked against a checkpoint
_SIZES = (("vocab_size", "model.vocab_size", "vocab_size"), ("d_model", "model.d_model", "hidden_size"),
          ("n_layers", "model.n_layers", "num_hidden_layers"), ("n_heads", "model.n_heads", "num_attention_heads"),
          ("n_kv_heads", "model.n_kv_heads", "num_key_value_heads"), ("head_dim", "model.head_dim", "head_dim"),
          ("mlp_hidden", "model.mlp_hidden", "intermediate_size"),
          ("tie_embeddings", "model.tie_embeddings", "tie_word_embeddings"))


@dataclass
class ImportReport:
    """What :func:`load_hf_weights` did. ``loaded``: DecoderLM names filled from the checkpoint;
    ``new_parameters``: the model's parameters it did not have (trained from their initialisation);
    ``warnings``: why the converted model may not compute the pretrained function."""

    spec: HFModelSpec
    loaded: list[str]
    new_parameters: list[str]
    warnings: list[str] = field(default_factory=list)


def _qkv_bias(net: nn.Module) -> bool:
    return net.layers[0].attn.wq.bias is not None


def check_model_matches(net: nn.Module, spec: HFModelSpec, key: str = "init_from") -> None:
    """``ConfigError`` naming the ``model.*`` key where ``net`` cannot hold the checkpoint ``spec`` (sizes, heads,
    tying, q/k/v biases) or cannot start as it (q/k norms the checkpoint does not have)."""
    for attr, config_key, hf_key in _SIZES:
        ours, theirs = getattr(net, attr, None), getattr(spec, attr)
        if ours != theirs:
            raise ConfigError(f"{config_key}: the model has {ours!r} but the checkpoint ({key}) has "
                              f"{hf_key}={theirs!r}; the attention config must keep the checkpoint's sizes and heads")
    if _qkv_bias(net) != spec.qkv_bias:
        raise ConfigError(f"model.attention.qkv_bias: the model has {_qkv_bias(net)}, the {spec.family} checkpoint "
                          f"({key}) {'has' if spec.qkv_bias else 'has no'} q/k/v biases")
    if not isinstance(net.layers[0].attn.q_norm, nn.Identity):
        raise ConfigError(f"model.attention.qk_norm: the checkpoint ({key}) has no q/k norms; a new norm would change "
                          "every attention score (use qk_norm=false)")


def starting_point_warnings(net: nn.Module) -> list[str]:
    """Why ``net``, filled with a dense checkpoint, would not compute the checkpoint's function (beyond SPLA's
    block selection): attention without a zero-initialised residual gate."""
    from ..layers import LinearAttention, SPLAAttention

    attn = net.layers[0].attn
    if isinstance(attn, LinearAttention):
        return ["model=linear replaces softmax attention by linear attention: the converted model does not "
                "compute the pretrained function (expect a high initial loss)"]
    if isinstance(attn, SPLAAttention) and attn.rla is not None and attn.rla.combine == "joint":
        return ["rla.combine=joint has no zero-initialised gate: the residual changes every layer's output from "
                "the first step (rla.combine=add starts as the pretrained model)"]
    return []


def _describe(t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return "counter"
    if torch.all(t == 0):
        return "zeros"
    return "ones" if torch.all(t == 1) else "random"


def summarize_names(names: list[str], net: nn.Module) -> str:
    """``layers.*.attn.rla.gate.weight x4 (zeros), ...``: names with the layer index folded."""
    params = dict(net.named_parameters())
    groups: Counter[str] = Counter()
    init: dict[str, str] = {}
    for name in names:
        pattern = re.sub(r"^layers\.\d+\.", "layers.*.", name)
        groups[pattern] += 1
        init.setdefault(pattern, _describe(params[name].detach()) if name in params else "")
    return ", ".join(f"{p} x{n} ({init[p]})" if n > 1 else f"{p} ({init[p]})" for p, n in groups.items())


@torch.no_grad()
def load_hf_weights(net: nn.Module, path: str | os.PathLike, key: str = "init_from") -> ImportReport:
    """Copy the weights of the Hugging Face folder ``path`` into ``net`` (a ``DecoderLM`` built with the
    checkpoint's sizes, any attention). Raises :class:`ConfigError` naming ``key`` for an unsupported
    architecture, a missing or unexpected weight, or a shape mismatch, before changing anything."""
    spec = spec_from_hf_config(read_hf_config(path, key), key)
    check_model_matches(net, spec, key)
    files = weight_files(path, key)
    names = weight_names(spec)
    missing = [n for n in names if n not in files]
    if missing:
        raise ConfigError(f"{key}: missing weight(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          f"({len(missing)} of {len(names)}) in {path}: not a complete {FAMILIES[spec.family]}")
    ignorable = ("lm_head.weight",) if spec.tie_embeddings else ()  # some tied checkpoints store the copy too
    unexpected = sorted(n for n in files if n not in names and not n.endswith(IGNORED_SUFFIXES) and n not in ignorable)
    if unexpected:
        raise ConfigError(f"{key}: unexpected weight(s) {', '.join(unexpected[:3])} in {path}: not the "
                          f"{FAMILIES[spec.family]} layout this converter reads")
    ours = net.state_dict(keep_vars=True)
    shapes = tensor_shapes({n: files[n] for n in names})
    for hf, mine in names.items():
        if shapes[hf] != tuple(ours[mine].shape):
            raise ConfigError(f"{key}: shape mismatch for {hf}: the checkpoint has {list(shapes[hf])}, the model's "
                              f"{mine} is {list(ours[mine].shape)}")
    for hf, tensor in iter_tensors(files, set(names)):
        ours[names[hf]].copy_(tensor)
    loaded = sorted(names.values())
    done = set(loaded)
    new = [n for n, _ in net.named_parameters() if n not in done]
    return ImportReport(spec=spec, loaded=loaded, new_parameters=new, warnings=starting_point_warnings(net))


def spec_from_model(net: nn.Module, family: str, **extra: Any) -> HFModelSpec:
    """The :class:`HFModelSpec` of a ``DecoderLM`` exported as ``family`` (``extra``: max_position_embeddings,
    token_ids). Qwen2 always has q/k/v biases (zeros when the model has none)."""
    if family not in FAMILIES:
        raise ConfigError(f"family: unknown value {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = HFModelSpec(family=family, vocab_size=net.vocab_size, d_model=net.d_model, n_layers=net.n_layers,
                       n_heads=net.n_heads, n_kv_heads=net.n_kv_heads, head_dim=net.head_dim,
                       mlp_hidden=net.mlp_hidden, rope_theta=net.rope.theta, rope_scaling=net.rope.scaling,
                       norm_eps=net.norm_eps, tie_embeddings=net.tie_embeddings, qkv_bias=family == "qwen2")
    return replace(spec, **extra)


@torch.no_grad()
def hf_state_dict(net: nn.Module, spec: HFModelSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{Hugging Face name: tensor}`` of ``net`` in the layout of ``spec`` (see :func:`spec_from_model`), as
    ``dtype`` (None: unchanged), no two tensors sharing memory."""
    if _qkv_bias(net) and not spec.qkv_bias:
        raise ConfigError(f"family: {spec.family} checkpoints have no q/k/v biases, the model has them; "
                          "export as family=qwen2")
    ours = net.state_dict()
    out = {}
    for hf, mine in weight_names(spec).items():
        tensor = ours.get(mine)
        if tensor is None:  # a Qwen2 bias the model does not have
            rows = ours[mine.replace(".bias", ".weight")].shape[0]
            tensor = torch.zeros(rows, dtype=ours["embed.weight"].dtype)
        out[hf] = tensor.to(dtype or tensor.dtype).clone()
    return out
