"""Build everything from a composed Hydra config and train (``train.py`` is a thin wrapper).

Everything that can be checked before building is checked first (:func:`check_run`: values, warnings, the
``_target_`` allowlist, the checkpoint to resume from), so a rejected config fails in milliseconds; every
object is built through :func:`spla_lit.safety.safe_instantiate`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, config_warnings, uses_spla, validate_config
from ..hf.init_from import apply_init_from, init_weights, record_tokenizer
from ..safety import check_targets, safe_instantiate
from .callbacks import CompileReport, FinalHparams, GracefulStop, ModelSummary
from .checkpoint_io import AtomicCheckpointIO, inspect_checkpoint
from .compile import CompileOptions
from .fsdp import writes_single_file
from .hydra_launch import distributed_job, install_hydra_launch_fix

log = logging.getLogger(__name__)

# Keys of the `trainer` config group that are not `Trainer` arguments (run.py takes them out).
TRAINER_EXTRAS = {"compile": False, "compile_fullgraph": False, "compile_mode": None, "compile_backend": "inductor"}


def _instantiate_all(node: DictConfig | None, key: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if node is None:
        return []
    return [safe_instantiate(c, f"{key}.{name}") for name, c in node.items()
            if isinstance(c, DictConfig) and "_target_" in c]


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


def check_run(cfg: DictConfig) -> int | None:
    """Everything checkable before building, in order: the values (:func:`validate_config`), the config's
    warnings (logged), every ``_target_`` against the allowlist, and the checkpoint of ``ckpt_path`` (read
    without its tensors: a missing, foreign or unsafe file fails here; its checksums are verified when it is
    loaded). Returns the step the run resumes from (None: a fresh run). Raises :class:`ConfigError`."""
    apply_init_from(cfg)  # with init_from, the checkpoint's sizes are the ones to check (idempotent)
    validate_config(cfg)
    for message in config_warnings(cfg):
        log.warning("%s", message)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)  # Hydra's own config (launcher, sweeper...) is not built by this code
    check_targets(plain)
    if cfg.get("ckpt_path") is None:
        return None
    step = int(inspect_checkpoint(cfg.ckpt_path).get("global_step", 0))
    log.info("resuming from %s at step %d; this run writes to its own folder %s (the checkpoint's folder is "
             "left as it is)", cfg.ckpt_path, step, cfg.paths.output_dir)
    if step >= cfg.trainer.max_steps:
        log.warning("ckpt_path: the checkpoint is at step %d and trainer.max_steps=%d: nothing to train (raise "
                    "trainer.max_steps to continue training)", step, cfg.trainer.max_steps)
    return step


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """Validate ``cfg`` and build the data module and the LightningModule (model inside). With ``init_from``, the
    model's sizes and weights come from a Hugging Face checkpoint (``spla_lit.hf.init_from``)."""
    init = apply_init_from(cfg)
    validate_config(cfg)
    record_tokenizer(cfg, init)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = safe_instantiate(cfg.data, "data")
    net = safe_instantiate(cfg.model, "model")
    new_parameters = init_weights(cfg, net, init)
    module = safe_instantiate(cfg.module, "module", net=net, task_names=datamodule.val_dataset.task_names,
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
    quiet_lightning()
    trainer_cfg, extras = split_trainer_config(cfg.trainer)
    module.compile_options = compile_options(extras)
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
    if not trainer_cfg.get("enable_progress_bar", True):  # `trainer.enable_progress_bar=false` just works
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    if not loggers:  # `logger=none`: a learning-rate monitor would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    else:  # the HPARAMS tab: the run's knobs against its final validation metrics
        callbacks.append(FinalHparams(run_summary(cfg)))
    if module.compile_options is not None:
        callbacks.append(CompileReport())
    if trainer_cfg.pop("enable_model_summary", True):
        callbacks.append(ModelSummary())  # ours: Lightning's printed "Total FLOPs: 0"
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        strategy = safe_instantiate(strategy, "trainer.strategy")
    # The atomic single-file plugin only fits strategies that save one file through CheckpointIO (single
    # device, DDP); FSDP2 writes a folder of shards itself (atomically too: see FSDP2Strategy).
    plugins = [AtomicCheckpointIO()] if writes_single_file(strategy) else []
    return safe_instantiate(trainer_cfg, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins,
                            strategy=strategy, enable_model_summary=False)


def quiet_lightning() -> None:
    """Silence Lightning's messages that are noise on every run here (each with its reason); what is
    actionable (a changed batch on resume, graph breaks, non-finite losses...) stays."""
    # The validation metrics are torchmetrics, whose compute() already reduces over ranks.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")
    # Lightning 2.6's own pytree helper calls a torch API deprecated in torch 2.10; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # A resumed run writes to its own folder (README: Train), so ModelCheckpoint's note that it will not reuse
    # the best-k list of the checkpoint's folder says nothing new.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # spla's data modules restart at the exact sample of the restored global_step (set_start_step), which
    # Lightning cannot see from the loader: its mid-epoch resume warning is a false alarm here.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_lightning_tips)


def _drop_lightning_tips(record: logging.LogRecord) -> bool:
    # An advertisement for a cloud service, printed by every Trainer (lightning >= 2.6).
    return not str(record.msg).startswith("💡 Tip:")


@contextlib.contextmanager
def exit_on_config_error(cfg: DictConfig, logger: logging.Logger) -> Iterator[None]:
    """The body of an entry point (train.py, eval.py, generate.py): a :class:`ConfigError` (a bad value or
    checkpoint) becomes one line naming the key and exit code 2, and the run folder Hydra made for the rejected
    config is removed, so nothing is left behind."""
    try:
        yield
    except ConfigError as e:
        logger.error("invalid config: %s", e)
        discard_rejected_run(cfg.paths.output_dir, cfg.paths.log_dir)
        sys.exit(2)


def discard_rejected_run(output_dir: str | Path, log_dir: str | Path) -> None:
    """Remove the run folder Hydra created before the config could be checked, when it holds nothing but
    Hydra's own files (``.hydra/``, ``<job>.log``), and the folders above it that this leaves empty, up to
    and including ``log_dir``: a rejected config leaves nothing behind."""
    out, top = Path(output_dir).resolve(), Path(log_dir).resolve()
    if not out.is_dir() or top not in out.parents:
        return
    if any(p.name != ".hydra" and not (p.is_file() and p.suffix == ".log") for p in out.iterdir()):
        return  # the run wrote something of its own: keep it
    shutil.rmtree(out, ignore_errors=True)
    for parent in out.parents:
        if not parent.is_dir() or any(p.name != "multirun.yaml" for p in parent.iterdir()):
            break
        shutil.rmtree(parent, ignore_errors=True)
        if parent == top:
            break


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats). Raises :class:`ConfigError` for a bad
    config or checkpoint, ``NonFiniteLossError``, and ``TrainingInterrupted`` after a stop on a signal (its
    checkpoint written)."""
    install_hydra_launch_fix()  # DDP/FSDP child processes re-run this job, not the whole command line
    with distributed_job():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    check_run(cfg)
    datamodule, module = build(cfg)
    output_dir = Path(cfg.paths.output_dir)
    trainer = make_trainer(cfg, module)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_summary(cfg))
    n_params = module.net.num_parameters() if hasattr(module.net, "num_parameters") else 0
    log.info("model: %s non-embedding parameters; output: %s", f"{n_params:,}", output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if stop is not None and stop.interrupted is not None:
        log.warning("%s", stop.interrupted)
        raise stop.interrupted
    last = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # the final state, whatever the checkpoint interval
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = float(trainer.global_step)
    log.info("done at step %d; last checkpoint: %s", trainer.global_step, last)
    return metrics
