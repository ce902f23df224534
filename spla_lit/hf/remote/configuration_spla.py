"""Configuration of an SPLA language model exported by ``python -m spla_lit.export`` (transformers remote code).

Loaded with ``AutoConfig.from_pretrained(folder, trust_remote_code=True)``; the model itself is built by the
``spla`` package (``pip install spla``), from ``spla_model``: the ``DecoderLM`` config of the training run.
"""

from transformers import PretrainedConfig


class SPLAConfig(PretrainedConfig):
    """``spla_model``: the run's resolved model config (``spla_lit.models.DecoderLM`` and its attention); the other
    fields mirror its sizes under transformers' usual names (read by generation and serving tools)."""

    model_type = "spla"

    def __init__(self, spla_model=None, vocab_size=None, hidden_size=None, num_hidden_layers=None,
                 num_attention_heads=None, num_key_value_heads=None, head_dim=None, intermediate_size=None,
                 max_position_embeddings=None, tie_word_embeddings=True, spla_version=None, **kwargs):
        self.spla_model = spla_model
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.spla_version = spla_version
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
