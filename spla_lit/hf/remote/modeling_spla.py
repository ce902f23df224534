"""An SPLA language model for transformers (remote code written by ``python -m spla_lit.export``).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The network is ``spla_lit.models.DecoderLM``, imported from the ``spla`` package (``pip install spla``: its
attention ops and Triton kernels are not copied here), so the logits are exactly those of the training code.
``generate()`` decodes with SPLA's KV cache (``DecoderLM.generate``: prefill, then one token per step reading only
the selected blocks) for greedy decoding and for plain temperature / top-p sampling (``top_k=0``); any other
generation feature (logits processors, stopping criteria, beams, streamers, top-k, ...) goes through
transformers' own loop, which runs the whole prefix at every step (exact, quadratic).
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from spla_lit.hf.build import build_decoder, init_module
from spla_lit.inference import generate as cached_generate

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
        # transformers' own loop (generate's fallback) has no cache: every step runs the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # generate() arguments the cached path implements; any other argument goes to transformers' loop
    _CACHED_GENERATE_KEYS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                       "eos_token_id", "pad_token_id", "attention_mask", "generator"})

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """``[B, P + new]`` ids, as transformers' ``generate``: with SPLA's KV cache for greedy decoding and for
        sampling with ``top_k=0`` (``temperature``, ``top_p``; ``generator`` seeds it), rows finishing at
        ``eos_token_id`` padded with ``pad_token_id`` and the output cut after the last row's eos; anything
        else (a ``generation_config``, other arguments, a padded ``attention_mask``) runs transformers' loop."""
        plan = self._cached_plan(inputs, generation_config, kwargs)
        if plan is None:
            kwargs.pop("generator", None)
            return super().generate(inputs, generation_config, **kwargs)
        temperature, top_p, eos, pad = plan
        new = cached_generate(self.model, inputs, int(kwargs["max_new_tokens"]), temperature=temperature,
                              top_p=top_p, eos_token_id=eos, generator=kwargs.get("generator"))
        if eos is not None and new.shape[1]:
            hit = (new == eos).int()
            after = (hit.cumsum(1) - hit) > 0  # positions after a row's first eos
            new = new.masked_fill(after, eos if pad is None else pad)
            if bool(hit.any(1).all()):  # transformers stops once every row has finished
                new = new[:, :int((hit.cumsum(1) == 0).sum(1).max()) + 1]
        return torch.cat([inputs, new], dim=1)

    def _cached_plan(self, inputs, generation_config, kwargs):
        """(temperature, top_p, eos, pad) when the cached path implements this call, else None."""
        if generation_config is not None or not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 \
                or not set(kwargs) <= self._CACHED_GENERATE_KEYS or kwargs.get("max_new_tokens") is None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            return None
        config = self.generation_config
        pick = lambda key, default: next((v for v in (kwargs.get(key), getattr(config, key, None)) if v is not None),
                                         default)  # noqa: E731
        eos, pad = pick("eos_token_id", None), pick("pad_token_id", None)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                return None
            eos = eos[0]
        if not pick("do_sample", False):
            return 0.0, 1.0, eos, pad
        if pick("top_k", 50) != 0:  # transformers' default top-k 50: only its own loop does top-k
            return None
        return float(pick("temperature", 1.0)), float(pick("top_p", 1.0)), eos, pad

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("SPLAForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("SPLAForCausalLM does not support padding (attention_mask with zeros): run "
                             "sequences of different lengths one at a time")
        if past_key_values is not None:
            raise ValueError("SPLAForCausalLM.forward takes no past_key_values: call it with the whole sequence "
                             "(generate() decodes with SPLA's KV cache)")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits)
