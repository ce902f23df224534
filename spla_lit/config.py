"""Validation of a composed run config, before anything is built.

Hydra already rejects an unknown option of a config group (``scorer=foo``); this catches bad values
(``sparse.topk=1`` below the forced blocks, ``model.n_kv_heads=3`` with 4 heads, a negative size, an
unknown ``rla.feature_map``...) and names the key, so a bad override fails in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .options import (
    COMBINES,
    COVARIANCES,
    FEATURE_MAPS,
    HEAD_REDUCTIONS,
    IMPLS,
    POSITIVE_FEATURE_MAPS,
    RLA_MODES,
    SCORERS,
    SPARSE_MODES,
    Selection,
)


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the offending key."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _positive(cfg: DictConfig, keys: Iterable[str], minimum: int = 1) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")


def _choice(cfg: DictConfig, key: str, choices: Iterable[str]) -> None:
    value = _get(cfg, key)
    if value is not None and value not in tuple(choices):
        raise ConfigError(f"{key}: unknown value {value!r}; expected one of {', '.join(choices)}")


def uses_spla(cfg: DictConfig) -> bool:
    """Whether the run's attention is SPLA, read from the config's structure: its attention has a ``sparse``
    (block geometry) component. Dense and linear attention have none."""
    attention = OmegaConf.select(cfg, "model.attention")
    return isinstance(attention, DictConfig) and "sparse" in attention


# The config key of each Selection field (the sparse/ and scorer/ groups).
SELECTION_KEYS = {"block_size": "sparse.block_size", "topk": "sparse.topk", "query_block": "sparse.query_block",
                  "local_blocks": "sparse.local_blocks", "sink_blocks": "sparse.sink_blocks", "mode": "sparse.mode",
                  "scorer": "scorer.method", "covariance": "scorer.covariance", "rank": "scorer.rank",
                  "head_reduce": "scorer.head_reduce"}


def selection_from_config(cfg: DictConfig) -> Selection:
    """The :class:`~spla_lit.options.Selection` the SPLA layers of ``cfg`` build (scorer fields only in
    ``topk`` mode); :class:`ConfigError` naming the key of the field whose rule failed."""
    values = {}
    for name, key in SELECTION_KEYS.items():
        if key.startswith("scorer.") and _get(cfg, "sparse.mode") != "topk":
            continue
        value = OmegaConf.select(cfg, key)
        if value is not None:
            values[name] = value
    try:
        return Selection(**values)
    except ValueError as e:
        # Selection's messages name the field that failed first (e.g. "topk (1) is smaller than the 2 forced
        # blocks", "query_block (24) and block_size (32) must divide one another").
        field = next((w for w in re.findall(r"[a-z_]+", str(e)) if w in SELECTION_KEYS), None)
        raise ConfigError(f"{SELECTION_KEYS.get(field, 'sparse')}: {e}") from None


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid key of a training/eval config."""
    _choice(cfg, "impl", IMPLS)
    _positive(cfg, ["data.seq_len", "data.batch_size", "data.vocab_size"])
    _positive(cfg, ["model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim"])
    heads, kv_heads = _get(cfg, "model.n_heads"), _get(cfg, "model.n_kv_heads")
    if heads % kv_heads:
        raise ConfigError(f"model.n_kv_heads: {kv_heads} does not divide model.n_heads ({heads}) "
                          "(grouped-query attention needs n_heads % n_kv_heads == 0)")
    head_dim = _get(cfg, "model.head_dim") or _get(cfg, "model.d_model") // heads
    if head_dim % 2:
        raise ConfigError(f"model.head_dim: RoPE needs an even head dim, got {head_dim}")
    if uses_spla(cfg):
        _validate_sparse(cfg)
        if _get(cfg, "sparse.mode") == "topk":
            _validate_scorer(cfg)
        selection_from_config(cfg)  # the rules between fields (topk >= the forced blocks...)
        if _get(cfg, "model.attention.rla") is not None:
            _validate_rla(cfg, "rla")
    elif OmegaConf.select(cfg, "model.attention.feature_map") is not None:  # pure linear attention
        _choice(cfg, "model.attention.feature_map", POSITIVE_FEATURE_MAPS)
    _validate_trainer(cfg)


def _validate_scorer(cfg: DictConfig) -> None:
    _choice(cfg, "scorer.method", SCORERS)
    if OmegaConf.select(cfg, "scorer.covariance") is not None:
        _choice(cfg, "scorer.covariance", COVARIANCES)
    if OmegaConf.select(cfg, "scorer.head_reduce") is not None:
        _choice(cfg, "scorer.head_reduce", HEAD_REDUCTIONS)
    _positive(cfg, ["scorer.rank"] if OmegaConf.select(cfg, "scorer.rank") is not None else [])


def _validate_sparse(cfg: DictConfig) -> None:
    _choice(cfg, "sparse.mode", SPARSE_MODES)
    _positive(cfg, ["sparse.block_size", "sparse.query_block", "sparse.local_blocks"])
    _positive(cfg, ["sparse.sink_blocks"], minimum=0)
    if _get(cfg, "sparse.mode") == "topk":
        if OmegaConf.select(cfg, "sparse.topk") is None:
            raise ConfigError("sparse.topk: required with sparse.mode=topk")
        _positive(cfg, ["sparse.topk"])


def _validate_rla(cfg: DictConfig, prefix: str) -> None:
    _choice(cfg, f"{prefix}.mode", RLA_MODES)
    if _get(cfg, f"{prefix}.mode") == "none":
        raise ConfigError(f"{prefix}.mode: 'none' is spelled rla=none (no residual component)")
    _choice(cfg, f"{prefix}.feature_map", FEATURE_MAPS)
    _choice(cfg, f"{prefix}.combine", COMBINES)
    positive_needed = _get(cfg, f"{prefix}.normalize") or _get(cfg, f"{prefix}.combine") == "joint"
    if positive_needed and _get(cfg, f"{prefix}.feature_map") not in POSITIVE_FEATURE_MAPS:
        raise ConfigError(f"{prefix}.feature_map: {_get(cfg, f'{prefix}.feature_map')} can be negative; "
                          f"use it with {prefix}.normalize=false and {prefix}.combine=add")


def _validate_trainer(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "trainer") is None:
        return
    steps = _get(cfg, "trainer.max_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"trainer.max_steps: must be an integer >= 1, got {steps!r}")
    lr = OmegaConf.select(cfg, "optim.lr")
    if lr is not None and not lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {lr!r}")
    accelerator = str(_get(cfg, "trainer.accelerator"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator: {accelerator} was requested but no CUDA device is available "
                              "(torch.cuda.is_available() is False); use trainer.accelerator=cpu")
