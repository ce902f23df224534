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


def config_warnings(cfg: DictConfig) -> list[str]:
    """Valid but probably unintended knob values of a training config, one message each (naming the key):
    ``sparse.topk`` at or above the number of key blocks at ``data.seq_len`` (the selection keeps every block),
    and, for a run on CUDA with ``impl`` other than ``reference``, the values for which a Triton kernel
    declines and the PyTorch reference runs instead (more memory: the score matrix or dense masks). The
    conditions mirror the kernels' ``NotImplementedError`` cases in ``kernels/spla_kernels``."""
    from .ops.feature_maps import feature_dim
    from .ops.utils import cdiv

    messages: list[str] = []
    if not uses_spla(cfg):
        return messages
    mode, block, topk = _get(cfg, "sparse.mode"), _get(cfg, "sparse.block_size"), _get(cfg, "sparse.topk")
    seq_len = _get(cfg, "data.seq_len")
    if mode == "topk" and topk >= cdiv(seq_len, block):
        messages.append(f"sparse.topk: {topk} is at least the {cdiv(seq_len, block)} key blocks of data.seq_len="
                        f"{seq_len} at sparse.block_size={block}: every block is selected (dense attention)")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator not in ("gpu", "cuda") or _get(cfg, "impl") == "reference":
        return messages
    head_dim = _get(cfg, "model.head_dim") or _get(cfg, "model.d_model") // _get(cfg, "model.n_heads")
    group = _get(cfg, "model.n_heads") // _get(cfg, "model.n_kv_heads")
    reference = "the PyTorch reference runs on the GPU instead"
    if mode == "topk":
        method, covariance = _get(cfg, "scorer.method"), OmegaConf.select(cfg, "scorer.covariance")
        why = ("sparse.query_block > 1" if _get(cfg, "sparse.query_block") > 1 else
               f"scorer.method={method}" if method not in ("taylor1", "taylor2") else
               "scorer.covariance=full" if method == "taylor2" and covariance == "full" else
               f"head dim {head_dim} > 256" if head_dim > 256 else
               f"{group} query heads per KV head > 128" if group > 128 else
               f"sparse.topk={topk} > 1024" if topk > 1024 else None)
        if why is not None:
            messages.append(f"{why}: the fused block selection kernel declines; {reference}, holding the score "
                            f"matrix [batch, KV heads, data.seq_len, blocks] = {seq_len} x {cdiv(seq_len, block)} "
                            "per KV head")
    if head_dim > 256:
        messages.append(f"model.head_dim: {head_dim} > 256 is beyond the sparse attention kernels")
    rla = OmegaConf.select(cfg, "model.attention.rla")
    if rla is not None:
        features = feature_dim(str(_get(cfg, "rla.feature_map")), head_dim)
        if _get(cfg, "rla.mode") == "explicit":
            messages.append(f"rla.mode: explicit reads every unselected block (a check of subtract, O(N^2) memory "
                            f"at data.seq_len={seq_len}); use rla.mode=subtract for training")
        elif features > 128 or head_dim > 128:
            messages.append(f"rla.feature_map: {_get(cfg, 'rla.feature_map')} at head dim {head_dim} gives "
                            f"{features} features (value dim {head_dim}); the residual kernels take <= 128: "
                            f"{reference}")
    return messages
