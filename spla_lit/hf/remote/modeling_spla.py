"""An SPLA language model for transformers (remote code written by ``python -m spla_lit.export``).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The network is ``spla_lit.models.DecoderLM``, imported from the ``spla`` package (``pip install spla``: its
attention ops and Triton kernels are not copied here), so the logits are exactly those of the training code.
``generate()`` works by running the whole prefix at every step (no KV cache yet: SPLA's decode cache plugs in
at :meth:`SPLAForCausalLM.forward`'s ``past_key_values``).
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from spla_lit.hf.build import build_decoder, init_module

from .configuration_spla import SPLAConfig


class SPLAPreTrainedModel(PreTrainedModel):
    config_class = SPLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        init_module(module, getattr(self.config, "initializer_range", 0.02))


class SPLAForCausalLM(SPLAPreTrainedModel, GenerationMixin):
    """``model``: the ``DecoderLM``. ``forward(input_ids)`` -> ``CausalLMOutputWithPast(logits [B, N, vocab])``
    (and the shifted next-token ``loss`` with ``labels``)."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = build_decoder(config.spla_model)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # Without a cache every step runs the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("SPLAForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("SPLAForCausalLM does not support padding (attention_mask with zeros): run "
                             "sequences of different lengths one at a time")
        if past_key_values is not None:
            raise ValueError("SPLAForCausalLM has no KV cache yet: call it with the whole sequence")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits)
