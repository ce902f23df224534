"""Build everything from a composed Hydra config and train (``train.py`` is a thin wrapper)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, uses_spla, validate_config
from ..hf.init_from import apply_init_from, init_weights, record_tokenizer
from .callbacks import CompileReport
from .checkpoint_io import AtomicCheckpointIO
from .compile import CompileOptions
from .fsdp import writes_single_file
from .hydra_launch import distributed_job, install_hydra_launch_fix

log = logging.getLogger(__name__)

# Keys of the `trainer` config group that are not `Trainer` arguments (run.py takes them out).
TRAINER_EXTRAS = {"compile": False, "compile_fullgraph": False, "compile_mode": None, "compile_backend": "inductor"}


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if node is None:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def run_summary(cfg: DictConfig) -> dict[str, Any]:
    """The knobs that tell runs apart, flat, for TensorBoard's HPARAMS tab."""
    attention = str(OmegaConf.select(cfg, "model.attention._target_", default="")).rsplit(".", 1)[-1]
    summary: dict[str, Any] = {"attention": attention, "seed": cfg.seed, "seq_len": cfg.data.seq_len,
                               "lr": OmegaConf.select(cfg, "optim.lr")}
    if uses_spla(cfg):
        for key in ("scorer.method", "scorer.covariance", "sparse.mode", "sparse.block_size", "sparse.topk",
                    "sparse.query_block"):
            summary[key] = OmegaConf.select(cfg, key)
        rla = OmegaConf.select(cfg, "model.attention.rla")
        summary["rla"] = "none" if rla is None else f"{rla.mode}/{rla.feature_map}/{rla.combine}"
    try:
        from hydra.core.hydra_config import HydraConfig

        summary["overrides"] = " ".join(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra
        pass
    return {k: v for k, v in summary.items() if v is not None}


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """Validate ``cfg`` and build the data module and the LightningModule (model inside). With ``init_from``, the
    model's sizes and weights come from a Hugging Face checkpoint (``spla_lit.hf.init_from``)."""
    init = apply_init_from(cfg)
    validate_config(cfg)
    record_tokenizer(cfg, init)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    new_parameters = init_weights(cfg, net, init)
    module = instantiate(cfg.module, net=net, task_names=datamodule.val_dataset.task_names,
                         new_parameters=new_parameters)
    # Stored in every checkpoint so eval.py can rebuild the model (set after instantiation: Hydra would
    # otherwise instantiate the _target_ entries inside it).
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)  # present when composed with return_hydra_config (tests, notebooks)
    module.run_config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(plain), {"paths": cfg.paths}),
                                               resolve=True)
    return datamodule, module


def split_trainer_config(node: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """(the `Trainer` arguments, the extras of :data:`TRAINER_EXTRAS` with their defaults filled in)."""
    plain = OmegaConf.to_container(node, resolve=True)
    extras = {key: plain.pop(key, default) for key, default in TRAINER_EXTRAS.items()}
    return OmegaConf.create(plain), extras


def compile_options(extras: dict[str, Any]) -> CompileOptions | None:
    """The ``trainer.compile*`` keys as :class:`CompileOptions` (None: no compilation)."""
    for key in ("compile", "compile_fullgraph"):
        if not isinstance(extras[key], bool):
            raise ConfigError(f"trainer.{key}: must be true or false, got {extras[key]!r}")
    if not extras["compile"]:
        return None
    return CompileOptions(mode=extras["compile_mode"], fullgraph=extras["compile_fullgraph"],
                          backend=extras["compile_backend"])


def make_trainer(cfg: DictConfig, module: L.LightningModule) -> L.Trainer:
    """The `Trainer` of ``cfg.trainer`` with its strategy, checkpoint plugin, callbacks and loggers; sets the
    module's compile options (applied in ``LMModule.configure_model``)."""
    trainer_cfg, extras = split_trainer_config(cfg.trainer)
    module.compile_options = compile_options(extras)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not trainer_cfg.get("enable_progress_bar", True):  # `trainer.enable_progress_bar=false` just works
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # `logger=none`: a learning-rate monitor would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if module.compile_options is not None:
        callbacks.append(CompileReport())
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        strategy = instantiate(strategy)
    # The atomic single-file plugin only fits strategies that save one file through CheckpointIO (single
    # device, DDP); FSDP2 writes a folder of shards itself (atomically too: see FSDP2Strategy).
    plugins = [AtomicCheckpointIO()] if writes_single_file(strategy) else []
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                       plugins=plugins, strategy=strategy)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats)."""
    install_hydra_launch_fix()  # DDP/FSDP child processes re-run this job, not the whole command line
    # The validation metrics are torchmetrics, whose compute() already reduces over ranks.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")
    with distributed_job():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    datamodule, module = build(cfg)
    output_dir = Path(cfg.paths.output_dir)
    trainer = make_trainer(cfg, module)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_summary(cfg))
    n_params = module.net.num_parameters() if hasattr(module.net, "num_parameters") else 0
    log.info("model: %s non-embedding parameters; output: %s", f"{n_params:,}", output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.interrupted:
        log.warning("training was interrupted at step %d", trainer.global_step)
    last = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)  # the final state, whatever the checkpoint interval
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = float(trainer.global_step)
    log.info("done at step %d; last checkpoint: %s", trainer.global_step, last)
    return metrics
