"""Lightning pieces: the LightningModule, callbacks, atomic checkpoint I/O and the schedule."""

from .callbacks import NonFiniteLossError, Throughput
from .checkpoint_io import AtomicCheckpointIO
from .lm_module import LMModule
from .schedule import warmup_cosine

__all__ = ["AtomicCheckpointIO", "LMModule", "NonFiniteLossError", "Throughput", "warmup_cosine"]
