"""``init_from=<Hugging Face model folder>``: start a run from a pretrained Llama / Mistral / Qwen2 checkpoint.

    python train.py experiment=cpt init_from=<dir> data=tokens data.path=<shards>

:func:`apply_init_from` sets the model's sizes from the checkpoint's ``config.json`` before anything is built
(``model.vocab_size``, ``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``mlp_hidden``,
``norm_eps``, ``tie_embeddings``, ``model.attention.qkv_bias``, and RoPE's ``rope_theta`` / ``rope_scaling``);
the attention variant is the run's own (``model=``, ``scorer=``, ``sparse=``, ``rla=``). A command-line override
of a size that disagrees with the checkpoint is an error naming the key; ``model.rope_theta`` and
``model.rope_scaling`` may be overridden on purpose (a longer context), and the change is logged.
:func:`init_weights` then loads the weights into the built model and lists the parameters the checkpoint did not
have. The run's tokenizer (the checkpoint's, or the prepared data's) is copied into the run folder by
:func:`record_tokenizer`; its path is the run config's ``tokenizer``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ..config import ConfigError
from .spec import HFModelSpec, read_hf_config, sliding_window, spec_from_hf_config, weight_names
from .tokenizer import copy_tokenizer, tokenizer_files

log = logging.getLogger(__name__)

TOKEN_DATA = "spla_lit.data.TokenDataModule"
# model.* keys a checkpoint fixes (its weights' shapes) -> the HFModelSpec field
FIXED_KEYS = {"model.vocab_size": "vocab_size", "model.d_model": "d_model", "model.n_layers": "n_layers",
              "model.n_heads": "n_heads", "model.n_kv_heads": "n_kv_heads", "model.head_dim": "head_dim",
              "model.mlp_hidden": "mlp_hidden", "model.norm_eps": "norm_eps",
              "model.tie_embeddings": "tie_embeddings", "model.attention.qkv_bias": "qkv_bias"}
# model.* keys taken from the checkpoint unless given on the command line (RoPE for a longer context)
ROPE_KEYS = {"model.rope_theta": "rope_theta", "model.rope_scaling": "rope_scaling"}


@dataclass
class InitFrom:
    """A run's pretrained source: the folder, its spec, its raw ``config.json``."""

    path: Path
    spec: HFModelSpec
    config: dict[str, Any]


def command_line_keys() -> set[str]:
    """Config keys set on the command line (``model.d_model=64``, ``++model.d_model=64``...); empty when not
    running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _init_from_path(cfg: DictConfig) -> str | None:
    path = OmegaConf.select(cfg, "init_from")
    if path is None and OmegaConf.select(cfg, "init_from_required"):
        raise ConfigError("init_from: required by this experiment (continual pretraining starts from a "
                          "pretrained model): give init_from=<local Hugging Face model folder>")
    return path


def apply_init_from(cfg: DictConfig) -> InitFrom | None:
    """Set ``cfg``'s model sizes from ``cfg.init_from``'s ``config.json`` (in place); None without ``init_from``.
    Raises :class:`ConfigError` naming the key: an unsupported checkpoint, a command-line size that conflicts with
    it, data whose token ids do not fit its vocabulary or were made by another tokenizer."""
    path = _init_from_path(cfg)
    if path is None:
        if OmegaConf.select(cfg, "optim.freeze_pretrained_steps"):
            raise ConfigError("optim.freeze_pretrained_steps: only applies with init_from (it trains the parameters "
                              "a pretrained checkpoint does not have, alone, for the first steps)")
        return None
    config = read_hf_config(path)
    spec = spec_from_hf_config(config)
    explicit = command_line_keys()
    with open_dict(cfg):
        for key, field in FIXED_KEYS.items():
            value = getattr(spec, field)
            if key in explicit and _select(cfg, key) != value:
                raise ConfigError(f"{key}: {_select(cfg, key)!r} conflicts with the checkpoint (init_from={path} has "
                                  f"{value!r}); the checkpoint's sizes and heads are kept: drop the override")
            OmegaConf.update(cfg, key, value, force_add=True)
        for key, field in ROPE_KEYS.items():
            value = getattr(spec, field)
            if key in explicit:
                if _select(cfg, key) != value:
                    log.info("init_from: %s=%s on the command line (the checkpoint's: %s)", key, _select(cfg, key),
                             value)
            else:
                OmegaConf.update(cfg, key, value, force_add=True)
        cfg.hf = {"path": str(Path(path).resolve()), **asdict(spec)}
    _check_data(cfg, spec, path)
    window = sliding_window(config)
    if window is not None:
        log.warning("init_from: the checkpoint uses a %d-token sliding window; this model attends causally over the "
                    "whole context (the same function on sequences up to %d tokens)", window, window)
    seq_len = OmegaConf.select(cfg, "data.seq_len")
    if spec.max_position_embeddings and seq_len and seq_len > spec.max_position_embeddings:
        log.info("init_from: training at %d tokens, beyond the checkpoint's %d (rope_theta %s)", seq_len,
                 spec.max_position_embeddings, _select(cfg, "model.rope_theta"))
    return InitFrom(path=Path(path), spec=spec, config=config)


def _check_data(cfg: DictConfig, spec: HFModelSpec, path: str) -> None:
    data_vocab = OmegaConf.select(cfg, "data.vocab_size")
    if isinstance(data_vocab, int) and data_vocab > spec.vocab_size:
        raise ConfigError(f"data.vocab_size: the data's ids reach {data_vocab}, more than the checkpoint's "
                          f"vocabulary ({spec.vocab_size}, init_from={path})")
    if OmegaConf.select(cfg, "data._target_") != TOKEN_DATA:
        return
    from ..data.prepare import _sha256
    from ..data.shards import read_manifest

    manifest = read_manifest(cfg.data.path)
    file = Path(path) / "tokenizer.json"
    if file.is_file() and _sha256(file) != manifest["key"]["tokenizer_sha256"]:
        raise ConfigError(f"data.path: {cfg.data.path} was prepared with another tokenizer "
                          f"({manifest['tokenizer']}) than init_from's ({file}); prepare it with "
                          f"tokenizer={path}")


def init_weights(cfg: DictConfig, net: nn.Module, init: InitFrom | None) -> list[str]:
    """Load ``init``'s weights into ``net`` (skipped when ``ckpt_path`` resumes a run: its weights come from there)
    and return the names of the parameters the checkpoint did not have; [] without ``init``. Logs them, and why
    the model may not start as the pretrained one."""
    if init is None:
        return []
    from .convert import check_model_matches, load_hf_weights, starting_point_warnings, summarize_names

    if cfg.get("ckpt_path"):
        check_model_matches(net, init.spec)
        done = set(weight_names(init.spec).values())
        new = [n for n, _ in net.named_parameters() if n not in done]
        warnings = starting_point_warnings(net)
        log.info("init_from: weights from ckpt_path (resuming), not from %s", init.path)
    else:
        report = load_hf_weights(net, init.path)
        new, warnings = report.new_parameters, report.warnings
        log.info("init_from: %d tensors of %s (%s) loaded", len(report.loaded), init.path, init.spec.family)
    if new:
        log.info("init_from: %d new parameter tensors, not in the checkpoint: %s", len(new), summarize_names(new, net))
    for warning in warnings:
        log.warning("init_from: %s", warning)
    if OmegaConf.select(cfg, "optim.freeze_pretrained_steps") and not new:
        raise ConfigError("optim.freeze_pretrained_steps: the model has no parameter the checkpoint lacks "
                          "(nothing would train in those steps); use it with model=spla")
    return new


def record_tokenizer(cfg: DictConfig, init: InitFrom | None) -> Path | None:
    """Copy the run's tokenizer into ``<output_dir>/tokenizer`` and set ``cfg.tokenizer`` to that folder; returns
    it (None when the run has no tokenizer, e.g. synthetic data). Source: ``cfg.tokenizer`` if set, else the
    ``init_from`` folder when it holds one, else the folder of the prepared data's tokenizer."""
    source = OmegaConf.select(cfg, "tokenizer")
    key = "tokenizer"
    if source is None and init is not None and tokenizer_files(init.path):
        source, key = init.path, "init_from"
    if source is None and OmegaConf.select(cfg, "data._target_") == TOKEN_DATA:
        from ..data.shards import read_manifest

        source, key = Path(read_manifest(cfg.data.path)["tokenizer"]).parent, "data.path"
        if not tokenizer_files(source):  # moved since prepare: the run trains, eval.py / export will ask for it
            log.warning("data.path: the tokenizer the data was prepared with (%s) is gone; the run records no "
                        "tokenizer (set tokenizer=<folder> to keep one with it)", source)
            return None
    if source is None:
        return None
    source = Path(source)
    if source.is_file():  # a tokenizer.json
        source = source.parent
    dest = copy_tokenizer(source, Path(cfg.paths.output_dir) / "tokenizer", key)
    with open_dict(cfg):
        cfg.tokenizer = str(dest.resolve())
    return dest
