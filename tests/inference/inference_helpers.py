"""Tiny models for the inference tests: every parameter randomly perturbed (the RLA gate open)."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from hydra_utils import make_cfg

VOCAB = 64


def tiny_model(overrides: list[str], *, block_size: int = 4, topk: int = 3, sink: int = 0, seed: int = 0,
               d_model: int = 32, n_layers: int = 2):
    """A float32 ``DecoderLM`` in eval mode; all parameters perturbed so the residual, its gate and the norms
    are all non-trivial."""
    sparse = [f"sparse.block_size={block_size}", f"sparse.sink_blocks={sink}"]
    if "sparse=window" not in overrides:
        sparse.append(f"sparse.topk={topk + sink}")
    cfg = make_cfg([f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"data.vocab_size={VOCAB}",
                    *sparse, *overrides])
    torch.manual_seed(seed)
    net = instantiate(cfg.model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def snapshot(cache) -> list[torch.Tensor]:
    """Copies of every tensor of a cache (and its lengths)."""
    out = [cache.lengths.clone(), cache.host_lengths.clone()]
    for layer in cache.layers:
        out += [t.clone() for t in layer.tensors().values()]
    return out


def same_state(cache, saved: list[torch.Tensor]) -> bool:
    now = snapshot(cache)
    return len(now) == len(saved) and all(torch.equal(a, b) for a, b in zip(now, saved))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
