"""Tiny randomly initialised Llama / Mistral / Qwen2 models made with transformers inside the tests, saved to a
temporary folder (nothing is downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# Small, but with GQA (4 query heads, 2 KV heads), an intermediate size no mlp_ratio gives, a head_dim != d / heads
SIZES = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)
VARIANTS = {  # id -> (family, config kwargs)
    "llama": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    "llama-llama3": ("llama", {"rope_parameters": {**LLAMA3, "rope_theta": 500.0}}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def make_hf_model(folder: Path, variant: str = "llama", vocab_size: int = 96, tokenizer: Path | None = None,
                  seed: int = 0, **overrides):
    """Save a random ``variant`` (see :data:`VARIANTS`) to ``folder`` in float32; returns the transformers model.

    Weights are drawn larger than transformers' init (std 0.2; norms and biases random too), so that a wrong
    mapping, RoPE or norm shows in the logits. ``tokenizer``: a folder whose tokenizer files are copied beside."""
    transformers = pytest.importorskip("transformers", reason='the hf extra: pip install "spla[hf]"')
    family, kwargs = VARIANTS[variant]
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[family]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[family]
    config = config_cls(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        **{**SIZES, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    if tokenizer is not None:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / file, folder / file)
    return model


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def cpt_overrides(source: Path, prepared: Path, *extra: str) -> list[str]:
    """``train.py experiment=cpt`` from ``source`` on ``prepared`` at test size: 4 steps of 2 x 64 tokens, SPLA
    with 4 blocks of 16 (topk 2), checkpoints every 2 steps, the first 3 steps training the new parameters only."""
    return ["experiment=cpt", f"init_from={source}", f"data.path={prepared}", "data.seq_len=64", "data.batch_size=2",
            "sparse.block_size=16", "sparse.topk=2", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "~callbacks.progress_bar", "optim.warmup_steps=2", "optim.freeze_pretrained_steps=3", *extra]
