"""``nn.Module`` layers: attention variants and their pluggable SPLA components."""

from .attention import DenseAttention, LinearAttention, SPLAAttention
from .norm import RMSNorm
from .rla import ResidualLinearAttention
from .rope import RotaryEmbedding, apply_rotary
from .scorers import BlockScorer
from .sparse import BlockSparseAttention

__all__ = [
    "BlockScorer",
    "BlockSparseAttention",
    "DenseAttention",
    "LinearAttention",
    "RMSNorm",
    "ResidualLinearAttention",
    "RotaryEmbedding",
    "SPLAAttention",
    "apply_rotary",
]
