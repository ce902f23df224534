"""Language models built from the layers in ``spla_lit.layers``."""

from .transformer import DecoderLM, SwiGLU, TransformerBlock

__all__ = ["DecoderLM", "SwiGLU", "TransformerBlock"]
