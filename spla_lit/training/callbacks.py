"""Callbacks: throughput logging."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss or the gradient norm is NaN or inf; the message names the step."""


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` (all devices) and ``train/tokens_per_s_per_device`` from wall time
    between consecutive training batches (so data loading is included, as a user experiences it)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch["input_ids"].numel()
            per_device = tokens / max(now - self._last, 1e-9)
            pl_module.log("train/tokens_per_s_per_device", per_device, on_step=True, on_epoch=False)
            pl_module.log("train/tokens_per_s", per_device * trainer.world_size, on_step=True, on_epoch=False)
        self._last = now

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time is not training throughput
