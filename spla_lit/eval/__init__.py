"""Long-context evaluation: the RULER-style suite, perplexity by position, selection fidelity, sweep tables.

``eval.py`` (config ``conf/eval.yaml``) runs :func:`spla_lit.eval.runner.evaluate`; ``scripts/collect_results.py``
runs :func:`spla_lit.eval.sweep.collect`; ``python train.py callbacks=fidelity`` adds
:class:`~spla_lit.eval.callbacks.SelectionFidelity` to training.
"""

from .callbacks import SelectionFidelity
from .capture import LayerCapture, capture_spla, spla_layers
from .fidelity import AttentionMassShare, BlockRecall, LayerFidelity, ResidualError, SelectionFidelityMetrics
from .perplexity import PositionBucketLoss

__all__ = [
    "AttentionMassShare", "BlockRecall", "LayerCapture", "LayerFidelity", "PositionBucketLoss", "ResidualError",
    "SelectionFidelity", "SelectionFidelityMetrics", "capture_spla", "spla_layers",
]
