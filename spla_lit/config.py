"""Validation of a composed run config, before anything is built.

Hydra already rejects an unknown option of a config group (``scorer=foo``); this catches bad values
(``sparse.topk=1`` below the forced blocks, ``model.n_kv_heads=3`` with 4 heads, a negative size, an
unknown ``rla.feature_map``...) and names the key, so a bad override fails in milliseconds.
"""

from __future__ import annotations

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
    SCORERS,
    min_topk,
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


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


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
    attention = _target(_get(cfg, "model.attention"))
    if attention.endswith("SPLAAttention"):
        _validate_sparse(cfg)
        if _get(cfg, "sparse.mode") == "topk":
            _validate_scorer(cfg)
        if _get(cfg, "model.attention.rla") is not None:
            _validate_rla(cfg, "rla")
    elif attention.endswith("LinearAttention"):
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
    _choice(cfg, "sparse.mode", ("topk", "window"))
    _positive(cfg, ["sparse.block_size", "sparse.query_block", "sparse.local_blocks"])
    _positive(cfg, ["sparse.sink_blocks"], minimum=0)
    if _get(cfg, "sparse.mode") == "topk":
        _positive(cfg, ["sparse.topk"])
    block, qblock = _get(cfg, "sparse.block_size"), _get(cfg, "sparse.query_block")
    if qblock > 1 and block % qblock and qblock % block:
        raise ConfigError(f"sparse.query_block: {qblock} and sparse.block_size ({block}) must divide one another")
    need = min_topk(block_size=block, query_block=qblock, local_blocks=_get(cfg, "sparse.local_blocks"),
                    sink_blocks=_get(cfg, "sparse.sink_blocks"))
    if _get(cfg, "sparse.mode") == "topk" and _get(cfg, "sparse.topk") < need:
        raise ConfigError(f"sparse.topk: {_get(cfg, 'sparse.topk')} is smaller than the {need} forced blocks "
                          f"(sparse.local_blocks + sparse.sink_blocks, and the blocks a query block overlaps)")


def _validate_rla(cfg: DictConfig, prefix: str) -> None:
    _choice(cfg, f"{prefix}.mode", ("subtract", "explicit"))
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
