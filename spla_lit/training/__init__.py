"""Lightning pieces: the LightningModule, callbacks, atomic checkpoint I/O and the schedule."""

from .callbacks import (
    GracefulStop,
    ModelSummary,
    NonFiniteLossError,
    StepProgressBar,
    Throughput,
    TrainingInterrupted,
)
from .checkpoint_io import AtomicCheckpointIO, CheckpointError
from .lm_module import LMModule
from .schedule import warmup_cosine

__all__ = ["AtomicCheckpointIO", "CheckpointError", "GracefulStop", "LMModule", "ModelSummary", "NonFiniteLossError",
           "StepProgressBar", "Throughput", "TrainingInterrupted", "warmup_cosine"]
