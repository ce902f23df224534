"""Callbacks: throughput and MFU logging, the torch.compile graph-break report, the stop on SIGINT/SIGTERM
with a checkpoint, a progress bar in optimizer steps, and a model summary without Lightning's FLOPs column."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import flops

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss or the gradient norm is NaN or inf; the message names the step."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint. ``signum``: the signal; ``checkpoint``: the
    path to resume from (``ckpt_path=<checkpoint>``); ``step``: its optimizer step."""

    def __init__(self, signum: int, checkpoint: str, step: int) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint: {checkpoint} "
                         f"(resume with ckpt_path={checkpoint})")


class Throughput(L.Callback):
    """Logs training speed from the wall time between consecutive training batches (data loading and the
    optimizer step included, as a user experiences it), averaged over the last ``window`` batches:

    * ``train/tokens_per_s`` (all devices) and ``train/tokens_per_s_per_device``;
    * ``train/tflops_per_device``: model TFLOP/s per device, from :func:`.flops.training_flops` (the
      attention variant actually run: dense, block-sparse, SPLA, linear);
    * ``train/mfu``: that over the device's peak; ``peak_flops`` (FLOP/s per device) overrides the
      built-in bf16 table (H100, H200, A100). Unknown devices (and the CPU) log no MFU;
    * ``train/peak_memory_gib``: on CUDA, the most memory this device's tensors held so far
      (``torch.cuda.max_memory_allocated``), to size batches and see what checkpointing/sharding saves.

    It also checks that a resumed run keeps the samples per optimizer step (``batch_size x
    accumulate_grad_batches x world_size``): the data position of a resumed run is ``global_step`` times
    that, so changing it (e.g. fewer GPUs at the same per-device batch) would replay or skip data.
    """

    def __init__(self, window: int = 10, peak_flops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.peak_flops = window, peak_flops
        self._last: float | None = None
        self._steps: deque[tuple[float, int, float]] = deque(maxlen=window)
        self._flops_per_seq: dict[int, float] = {}
        self._peak: float | None = None
        self._loaded_samples_per_step: int | None = None
        self._samples_now: int | None = None

    # --- set-up -------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._samples_now = self._samples_per_step(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._peak = self.peak_flops or flops.peak_flops(pl_module.device, trainer.precision)
        if self._peak is None:
            rank_zero_info(f"MFU is not logged: no peak FLOP/s known for {pl_module.device} at precision "
                           f"{trainer.precision} (set callbacks.throughput.peak_flops); tokens/s and TFLOP/s are "
                           "logged")
        now = self._samples_now
        if self._loaded_samples_per_step not in (None, now):
            rank_zero_warn(f"resumed with {now} samples per optimizer step, but the checkpoint was trained with "
                           f"{self._loaded_samples_per_step}: the data continues at step x {now}, which is not "
                           "where the checkpoint stopped. Keep data.batch_size x accumulate_grad_batches x "
                           "GPUs the same to resume exactly.")

    def _model_flops(self, pl_module: L.LightningModule, seq_len: int) -> float | None:
        if seq_len not in self._flops_per_seq:
            try:
                self._flops_per_seq[seq_len] = flops.training_flops(pl_module.net, seq_len).total
            except (AttributeError, TypeError) as e:  # not a DecoderLM of known attention
                log.info("no model FLOP count (%s): TFLOP/s and MFU are not logged", e)
                self._flops_per_seq[seq_len] = float("nan")
        value = self._flops_per_seq[seq_len]
        return None if value != value else value

    # --- timing ---------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            ids = batch["input_ids"]
            per_seq = self._model_flops(pl_module, ids.shape[-1])
            self._steps.append((now - self._last, ids.numel(), float("nan") if per_seq is None
                                else per_seq * ids.numel() / ids.shape[-1]))
            seconds = max(sum(s[0] for s in self._steps), 1e-9)
            per_device = sum(s[1] for s in self._steps) / seconds
            pl_module.log("train/tokens_per_s_per_device", per_device, on_step=True, on_epoch=False)
            pl_module.log("train/tokens_per_s", per_device * trainer.world_size, on_step=True, on_epoch=False)
            if per_seq is not None:
                flops_per_s = sum(s[2] for s in self._steps) / seconds
                pl_module.log("train/tflops_per_device", flops_per_s / 1e12, on_step=True, on_epoch=False)
                if self._peak:
                    pl_module.log("train/mfu", flops_per_s / self._peak, on_step=True, on_epoch=False)
            if pl_module.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
                pl_module.log("train/peak_memory_gib", peak, on_step=True, on_epoch=False)
        self._last = now

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time is not training throughput

    # --- resume check ---------------------------------------------------------------------------------

    @staticmethod
    def _samples_per_step(trainer: L.Trainer) -> int | None:
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        return None if batch is None else int(batch) * trainer.accumulate_grad_batches * trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        return {} if self._samples_now is None else {"samples_per_step": self._samples_now}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_samples_per_step = state_dict.get("samples_per_step")


class CompileReport(L.Callback):
    """Reports the graph breaks ``torch.compile`` hit, after the first training step (when the blocks have
    been compiled, forward and backward) and again at the end if more appeared: a block that breaks runs as
    several small graphs with Python in between and loses much of the speed-up, so breaks must not be
    silent. Logs ``compile/graph_breaks`` (all of them) and a warning with the reasons of the unexpected
    ones; the breaks at the Triton attention ops (which run between graphs by design) are logged as info."""

    def __init__(self, max_reasons: int = 8) -> None:
        self.max_reasons = max_reasons
        self._reported: int | None = None
        self._before: dict[str, int] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = graph_breaks()  # dynamo's counters are per process: count this run's breaks only

    def _breaks(self) -> dict[str, int]:
        now = graph_breaks()
        return {k: v - self._before.get(k, 0) for k, v in now.items() if v > self._before.get(k, 0)}

    def _report(self, pl_module: L.LightningModule | None) -> None:
        breaks = self._breaks()
        total = sum(breaks.values())
        # The Triton attention ops run between compiled graphs by design (spla_lit.ops._dispatch.run_kernel):
        # those breaks are expected and reported once as information; any other break is a warning.
        expected = {r: c for r, c in breaks.items() if "run_kernel" in r}
        other = {r: c for r, c in breaks.items() if r not in expected}
        if pl_module is not None:
            pl_module.log("compile/graph_breaks", float(total), on_step=True, on_epoch=False)
        if total and total != self._reported:
            if expected:
                rank_zero_info(f"torch.compile: {sum(expected.values())} graph breaks at the Triton attention ops, "
                               "which run between the compiled graphs (expected)")
            if other:
                reasons = sorted(other.items(), key=lambda kv: -kv[1])[: self.max_reasons]
                lines = "\n".join(f"  {count} x {' '.join(reason.split())[:300]}" for reason, count in reasons)
                rank_zero_warn(f"torch.compile hit {sum(other.values())} graph breaks ({len(other)} distinct) in the "
                               f"compiled blocks; each splits a block into separate graphs. Most frequent:\n{lines}\n"
                               "trainer.compile_fullgraph=true makes them errors; TORCH_LOGS=graph_breaks shows where.")
        elif not total and self._reported is None:
            rank_zero_info("torch.compile: the blocks compiled without graph breaks")
        self._reported = total

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._reported is None and trainer.global_step >= 1:
            self._report(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reported is not None and sum(self._breaks().values()) != self._reported:
            self._report(None)


def graph_breaks() -> dict[str, int]:
    """Graph-break reasons dynamo met so far in this process, with counts."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


class GracefulStop(L.Callback):
    """Stop cleanly on SIGINT (Ctrl-C) or SIGTERM (a cluster preempting the job): finish the current optimizer
    step, write ``<dirpath>/<filename>`` (atomically; a folder of shards under ``trainer=fsdp``) and end
    ``fit`` without validating. :attr:`interrupted` then holds the :class:`TrainingInterrupted` that
    ``run.py`` raises (``train.py`` exits with ``128 + signal``). Resuming from that checkpoint continues at
    the exact step and data position. A second Ctrl-C aborts at once, without a checkpoint.

    All ranks stop at the same step: the signal flags are reduced (max) across ranks before each optimizer
    step. SIGTERM received by the launching process is forwarded to the processes it launched, as Lightning
    does. Lightning's SLURM auto-requeue (its requeue signal, SIGUSR1 by default) is left as it is; only
    Lightning's SIGTERM handler, which would exit without a checkpoint, is replaced while training runs.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.received: int = 0  # the signal this process got (0: none)
        self.interrupted: TrainingInterrupted | None = None
        self._stop_signal = 0  # agreed by all ranks before the optimizer step
        self._announced = False
        self._previous: dict[int, Any] = {}

    # --- handlers -----------------------------------------------------------------------------------

    def _handler(self, trainer: L.Trainer):
        # Only flags and signals here: printing from a handler can interrupt a write to the same stream.
        def handle(signum: int, frame: Any) -> None:
            if self.received and signum == signal.SIGINT:
                self._restore()
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            if not self.received:
                self.received = signum
                launcher = trainer.strategy.launcher
                if signum == signal.SIGTERM and launcher is not None:
                    launcher.kill(signum)  # the processes it started (Ctrl-C reaches them through the terminal)

        return handle

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning registered its own SIGTERM handler (at the start of the fit stage).
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        handler = self._handler(trainer)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # --- stopping -----------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, before it: every rank learns whether any rank got a signal. (The module's
        # finiteness check reads the device at this point anyway, so this adds no extra wait.)
        signum = self.received
        if signum and not self._announced:
            self._announced = True
            rank_zero_info(f"{signal.Signals(signum).name} received: stopping after this optimizer step and writing "
                           f"{self.path} (Ctrl-C again aborts without a checkpoint)")
        if trainer.world_size > 1:
            flag = torch.tensor(float(signum), device=pl_module.device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        self._stop_signal = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stop_signal or self.interrupted is not None:
            return
        # The optimizer step is done: the state ModelCheckpoint would save here, which resumes exactly.
        trainer.save_checkpoint(self.path, weights_only=False)
        self.interrupted = TrainingInterrupted(self._stop_signal, str(self.path), trainer.global_step)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates before an early stop: not now, time may be short


class FinalHparams(L.Callback):
    """At the end of training, log the run's knobs (``params``, e.g. ``run.run_summary``) with its final
    validation metrics to TensorBoard: the HPARAMS tab then lists every run with ``hp/val_loss``,
    ``hp/val_ppl``, ``hp/val_answer_acc``, ``hp/val_exact_match`` and ``hp/global_step`` (also after a stop on
    a signal; not after a run that raised)."""

    METRICS = ("val/loss", "val/ppl", "val/answer_acc", "val/exact_match")

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        values = trainer.callback_metrics
        metrics = {f"hp/{k.replace('/', '_')}": float(values[k]) for k in self.METRICS if k in values}
        if not metrics:
            return  # no validation ran: nothing to compare runs by
        metrics["hp/global_step"] = float(trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.params, metrics)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps out of ``trainer.max_steps`` (with their ETA)
    instead of the batches of an epoch: runs here are sized in steps (``max_epochs=-1`` showed "Epoch 0/-2"),
    and a resumed run starts at its step ("40/19" was batch 40 of the remaining 19)."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            # start at the resumed step, with an empty speed history (no jump in the ETA)
            self.progress.reset(self.train_progress_bar_id, total=self.total_train_batches,
                                completed=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column, which printed 0 (Lightning counts FLOPs only
    by running an ``example_input_array``, and its counter cannot see the Triton kernels). The analytic
    training FLOPs of one sequence (:func:`.flops.training_flops`, the count MFU uses) are stated instead."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        summary = self._summary(trainer, pl_module)
        columns = [(name, values) for name, values in summary._get_summary_data() if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        table.add_column(" ", style="dim")
        for name, _ in columns[1:]:
            table.add_column(name, justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = Console()
        console.print(table)
        seq_len = getattr(trainer.datamodule, "seq_len", None)
        lines = [f"Trainable params: {summary.trainable_parameters:,}", f"Total params: {summary.total_parameters:,}",
                 f"Params size: {summary.model_size:.1f} MB"]
        try:
            if seq_len is not None:
                total = flops.training_flops(pl_module.net, int(seq_len)).total
                lines.append(f"Training FLOPs per sequence of {seq_len} tokens: {total:.3g} (forward + backward)")
        except (AttributeError, TypeError, ValueError):  # not a DecoderLM of known attention: no count
            pass
        console.print("\n".join(lines))
