"""Rebuild a trained model from a checkpoint, optionally with other selection knobs for evaluation.

A checkpoint written by ``train.py`` holds the resolved run config under ``checkpoint["spla_config"]``
and the LightningModule's weights under ``state_dict`` (``net.*``). :func:`load_model` rebuilds
``cfg.model`` and loads the weights strictly. Model-side overrides (``override.sparse.topk=8`` on the
``eval.py`` command line) edit the stored config before the rebuild; they only touch weight-free knobs
(the scorer, the selection geometry, the residual's mode), so the trained weights still fit.
``override.model.attention=spla`` evaluates a dense checkpoint as block-sparse attention (SPLA without a
residual: the dense model has no residual weights) with the run's ``sparse`` / ``scorer`` groups, which the
other overrides may change: the same weights, read through each scorer's selection.

The file is read by :func:`spla_lit.training.checkpoint_io.read_checkpoint` (``weights_only``, checksums,
finite weights, the stored config's targets checked against the allowlist) and the model is built by
:func:`spla_lit.safety.safe_instantiate` from the model classes only: a crafted checkpoint is refused
before anything is built.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ..config import ConfigError, uses_spla, validate_config
from ..safety import MODEL_TARGETS, safe_instantiate
from ..training.checkpoint_io import read_checkpoint

# Keys that ``override.<section>.<key>`` may set, per section. rla.mode also takes ``none``: drop the
# residual at evaluation (its gate weights are then unused).
OVERRIDABLE: dict[str, tuple[str, ...]] = {
    "model": ("attention",),
    "sparse": ("mode", "block_size", "topk", "query_block", "local_blocks", "sink_blocks"),
    "scorer": ("method", "covariance", "rank", "head_reduce"),
    "rla": ("mode",),
}


@dataclass
class LoadedModel:
    """A rebuilt model in eval mode and what it came from.

    net: the ``DecoderLM`` (weights loaded). cfg: the checkpoint's run config with the overrides applied.
    overrides: the applied overrides, flat (``{"sparse.topk": 8}``). global_step: training step of the weights.
    """

    net: nn.Module
    cfg: DictConfig
    overrides: dict[str, Any]
    global_step: int
    ckpt_path: str


def resolve_ckpt_path(path: str | Path | None) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.ckpt``)."""
    if path is None or str(path) == "":
        raise ConfigError("ckpt_path: missing; give ckpt_path=<a .ckpt file written by train.py, or its run folder>")
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.exists():
        raise ConfigError(f"ckpt_path: no checkpoint at {str(path)!r} (give a .ckpt file or a run directory)")
    return p


def attention_kind(cfg: DictConfig) -> str:
    """``SPLAAttention`` | ``DenseAttention`` | ``LinearAttention`` (the class name of the model's attention)."""
    return str(OmegaConf.select(cfg, "model.attention._target_", default="")).rsplit(".", 1)[-1]


def flatten_overrides(override: Mapping | None) -> dict[str, Any]:
    """``{"sparse": {"topk": 8, "mode": None}}`` -> ``{"sparse.topk": 8}`` (None means: keep the trained value)."""
    flat: dict[str, Any] = {}
    if override is None:
        return flat
    if not isinstance(override, Mapping):
        raise ConfigError(f"override: expected a mapping like override.sparse.topk=8, got {override!r}")
    for section, values in override.items():
        if section not in OVERRIDABLE:
            raise ConfigError(f"override.{section}: unknown section; known: {', '.join(OVERRIDABLE)}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"override.{section}: expected keys like override.{section}."
                              f"{OVERRIDABLE[section][0]}=..., got {values!r}")
        for key, value in values.items():
            if key not in OVERRIDABLE[section]:
                raise ConfigError(f"override.{section}.{key}: unknown key; known: "
                                  f"{', '.join(f'override.{section}.{k}' for k in OVERRIDABLE[section])}")
            if value is not None:
                flat[f"{section}.{key}"] = value
    return flat


def apply_overrides(cfg: DictConfig, override: Mapping | None) -> tuple[DictConfig, dict[str, Any]]:
    """Return a copy of the run config ``cfg`` with the eval-time overrides applied, and them flat.

    Both copies of each knob are edited: the top-level group (``sparse.topk``, checked by
    ``validate_config``) and the one resolved into the model (``model.attention.sparse.topk``).
    Raises :class:`ConfigError` naming ``override.<key>`` for an unknown key, a bad value, or a knob the
    checkpoint's model does not have.
    """
    flat = flatten_overrides(override)
    cfg = copy.deepcopy(cfg)
    if not flat:
        return cfg, flat
    if "model.attention" in flat:
        _dense_to_block_sparse(cfg, flat["model.attention"])
    if not uses_spla(cfg):
        kind = attention_kind(cfg)
        raise ConfigError(f"override.{next(iter(flat))}: the checkpoint's model uses {kind or 'no known attention'}; "
                          "selection overrides need an SPLA model")
    attention = cfg.model.attention
    with open_dict(cfg):
        for key, value in flat.items():
            section, name = key.split(".")
            if section == "model":
                continue
            if section == "rla":
                if attention.rla is None:
                    raise ConfigError(f"override.{key}: the checkpoint's model has no residual (trained with rla=none)")
                if value == "none":
                    attention.rla = None
                    cfg.rla = None
                    continue
            for node in (cfg[section], attention[section]):
                node[name] = value
    try:
        validate_config(_without_trainer(cfg))
    except ConfigError as e:
        message = str(e)
        key = message.split(":", 1)[0]
        raise ConfigError(f"override.{message}" if key in flat else message) from None
    return cfg, flat


def _dense_to_block_sparse(cfg: DictConfig, value: Any) -> None:
    """``override.model.attention=spla``: the dense checkpoint's attention becomes SPLA without a residual, with the
    run's top-level ``sparse`` / ``scorer`` groups (the same projections, so the same weights load), in place."""
    if value != "spla":
        raise ConfigError(f"override.model.attention: only 'spla' (a dense checkpoint read as block-sparse attention), "
                          f"got {value!r}")
    kind = attention_kind(cfg)
    if kind != "DenseAttention":
        raise ConfigError(f"override.model.attention: only a dense checkpoint can be switched to SPLA; this one uses "
                          f"{kind or 'no known attention'}")
    for group in ("sparse", "scorer"):
        if not isinstance(cfg.get(group), DictConfig):
            raise ConfigError(f"override.model.attention: the checkpoint's config has no '{group}' group to select "
                              "with")
    dense = cfg.model.attention
    with open_dict(cfg):
        cfg.model.attention = OmegaConf.create({
            "_target_": "spla_lit.layers.SPLAAttention", "_partial_": True, "qk_norm": dense.get("qk_norm", False),
            "qkv_bias": dense.get("qkv_bias", False), "scorer": copy.deepcopy(cfg.scorer),
            "sparse": copy.deepcopy(cfg.sparse), "rla": None, "impl": cfg.get("impl", "auto")})
        cfg.rla = None


def _without_trainer(cfg: DictConfig) -> DictConfig:
    # The training hardware (trainer.accelerator=gpu...) is irrelevant to evaluation.
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.pop("trainer", None)
    return out


def set_impl(cfg: DictConfig, impl: str) -> None:
    """Set ``impl`` (auto | reference | triton) on every model component that has one, in place."""
    def visit(node: Any) -> None:
        if isinstance(node, DictConfig):
            if "impl" in node:
                node.impl = impl
            for value in node.values():
                visit(value)

    visit(cfg.model)
    with open_dict(cfg):
        cfg.impl = impl


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, read and checked on the CPU (:func:`read_checkpoint`), with ``spla_config``."""
    p = resolve_ckpt_path(path)
    ckpt = read_checkpoint(p, key="ckpt_path")
    if not isinstance(ckpt.get("spla_config"), Mapping):
        raise ConfigError(f"ckpt_path: {p}: no 'spla_config' (the run config train.py stores): cannot rebuild "
                          "the model")
    return ckpt


def load_model(ckpt_path: str | Path, override: Mapping | None = None, impl: str | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the checkpoint's model with ``override`` applied, load its weights, move it to ``device``."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = OmegaConf.create(ckpt["spla_config"])
    validate_config(_without_trainer(cfg))
    cfg, flat = apply_overrides(cfg, override)
    if impl is not None:
        set_impl(cfg, impl)
    net = safe_instantiate(cfg.model, "spla_config.model", MODEL_TARGETS)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if flat.get("rla.mode") == "none":
        state = {k: v for k, v in state.items() if ".attn.rla." not in k}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if "model.attention" in flat:  # a switched dense model: the scorers' call counters start at zero
        missing = [k for k in missing if not k.endswith(".attn.scorer.calls")]
    if missing or unexpected:
        raise ConfigError(f"ckpt_path: the weights do not fit the rebuilt model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    net.eval().to(device)
    return LoadedModel(net=net, cfg=cfg, overrides=flat, global_step=int(ckpt.get("global_step", 0)),
                       ckpt_path=str(resolve_ckpt_path(ckpt_path)))
