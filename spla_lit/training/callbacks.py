"""Callbacks: throughput and MFU logging, the torch.compile graph-break report."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import flops

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss or the gradient norm is NaN or inf; the message names the step."""


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
                           f"{trainer.precision} (set callbacks.throughput.peak_flops); tokens/s and TFLOP/s are")
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
