"""Embedded synthetic long-context data: integer vocab, task generators, datasets and DataModule."""

from .datamodule import (
    DEFAULT_MIXTURE,
    VAL_SEED_OFFSET,
    OffsetSequentialSampler,
    SyntheticDataModule,
    SyntheticTaskDataset,
    eval_dataloader,
)
from .tasks import RULER_TASKS, TASKS, FillerLanguage, Sample, Task, filler_language, make_task
from .vocab import NUM_SPECIAL, Vocab

__all__ = [
    "DEFAULT_MIXTURE", "NUM_SPECIAL", "RULER_TASKS", "TASKS", "VAL_SEED_OFFSET", "FillerLanguage",
    "OffsetSequentialSampler", "Sample", "SyntheticDataModule", "SyntheticTaskDataset", "Task", "Vocab",
    "eval_dataloader", "filler_language", "make_task",
]
