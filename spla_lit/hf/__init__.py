"""Hugging Face interop: ``init_from=`` (Llama / Mistral / Qwen2 checkpoints into ``DecoderLM``, any attention) and
``python -m spla_lit.export`` (a checkpoint as a Hugging Face model folder).

``transformers`` and ``safetensors`` (the ``hf`` extra) are imported only by the functions that use them.
"""

from .build import build_decoder
from .convert import ImportReport, hf_state_dict, load_hf_weights, spec_from_model
from .exporter import export, verify_export
from .init_from import InitFrom, apply_init_from, init_weights, record_tokenizer
from .spec import FAMILIES, HFModelSpec, read_hf_config, spec_from_hf_config, weight_names

__all__ = ["FAMILIES", "HFModelSpec", "ImportReport", "InitFrom", "apply_init_from", "build_decoder", "export",
           "hf_state_dict", "init_weights", "load_hf_weights", "read_hf_config", "record_tokenizer",
           "spec_from_hf_config", "spec_from_model", "verify_export", "weight_names"]
