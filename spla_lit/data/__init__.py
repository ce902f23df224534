"""Data: the embedded synthetic long-context tasks, and token shards of real text (``data=tokens``).

Real text: ``python -m spla_lit.data.train_tokenizer`` and ``python -m spla_lit.data.prepare`` (they need the
``hf`` extra), then :class:`TokenDataModule`. The names below load on first use, so that those command-line
tools do not import torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datamodule": ["DEFAULT_MIXTURE", "VAL_SEED_OFFSET", "IndexedDataModule", "OffsetSequentialSampler",
                   "SyntheticDataModule", "SyntheticTaskDataset", "eval_dataloader"],
    "shards": ["TokenShards", "prepared_vocab_size"],
    "tasks": ["RULER_TASKS", "TASKS", "FillerLanguage", "Sample", "Task", "filler_language", "make_task"],
    "tokens": ["TokenDataModule", "TokenWindowDataset", "collate_windows", "split_documents"],
    "vocab": ["NUM_SPECIAL", "Vocab"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

