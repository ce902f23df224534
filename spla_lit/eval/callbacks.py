"""Lightning callback: selection fidelity of every SPLA layer, logged at validation (TensorBoard).

Enable it with ``python train.py callbacks=fidelity`` (``conf/callbacks/fidelity.yaml``: the default
callbacks plus this one). Logged under ``fidelity/<metric>`` (mean over layers) and
``fidelity/<metric>/layer<i>``; metrics as defined in :mod:`spla_lit.eval.fidelity`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from .capture import capture_spla, spla_layers
from .fidelity import SelectionFidelityMetrics


class SelectionFidelity(L.Callback):
    """Measure selection fidelity on the first validation batch of every ``every_n_val``-th validation.

    Args:
        every_n_val: run at validations 1, 1 + n, 1 + 2n, ... (sanity checks excluded).
        max_tokens: rows of the batch used, ``max(1, max_tokens // seq_len)`` (the metrics need exact
            attention, O(N^2) per row and head).
        prefix: metric name prefix.

    ``last_metrics`` holds the last logged values (a flat dict of floats).
    """

    def __init__(self, every_n_val: int = 1, max_tokens: int = 4096, prefix: str = "fidelity") -> None:
        if every_n_val < 1:
            raise ValueError(f"every_n_val must be >= 1, got {every_n_val}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.every_n_val, self.max_tokens, self.prefix = every_n_val, max_tokens, prefix
        self.last_metrics: dict[str, float] = {}
        self._validations = 0
        self._active = False
        self._context: Any = None
        self._captures: list = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._active = False
            return
        self._validations += 1
        net = getattr(pl_module, "net", pl_module)
        self._active = (self._validations - 1) % self.every_n_val == 0 and bool(spla_layers(net))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or batch_idx != 0 or dataloader_idx != 0:
            return
        rows = max(1, self.max_tokens // batch["input_ids"].shape[1])
        self._context = capture_spla(getattr(pl_module, "net", pl_module), max_rows=rows)
        self._captures = self._context.__enter__()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._context is None:
            return
        self._context.__exit__(None, None, None)
        self._context = None
        captures, self._captures = self._captures, []
        metrics = SelectionFidelityMetrics()
        with torch.no_grad():
            metrics.update(captures)
        result = metrics.compute()
        flat = {f"{self.prefix}/{k}": v for k, v in result["mean"].items()}
        for layer, values in result["layers"].items():
            flat.update({f"{self.prefix}/{k}/layer{layer}": v for k, v in values.items()})
        self.last_metrics = flat
        for name, value in flat.items():
            if not math.isnan(value):  # residual_err is undefined when nothing is left unselected
                pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._context is not None:  # a validation with no batch end (interrupted): never leave hooks behind
            self._context.__exit__(None, None, None)
            self._context = None
