"""Cost of the per-tensor checkpoint checksums (spla_lit.training.checkpoint_io) on a model's state.

Builds the state of a DecoderLM (the ~355M model of BENCHMARKS.md section 5 by default: d 1024, 32 layers,
8/2 heads) with random values, optionally with AdamW's two moments, and times computing and verifying the
SHA-256 of every tensor (the threads used on save and load, and one thread), against torch.save of the same.

    python benchmarks/checkpoint_checksums.py                       # 355M, weights + AdamW moments
    python benchmarks/checkpoint_checksums.py --d-model 64 --layers 2 --no-optimizer   # a tiny check
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

import torch

from spla_lit.layers import DenseAttention
from spla_lit.models import DecoderLM
from spla_lit.training import checkpoint_io
from spla_lit.training.checkpoint_io import add_checksums, tensor_checksums, verify_checksums


def random_state(d_model: int, layers: int, heads: int, kv_heads: int, vocab: int, optimizer: bool) -> dict:
    with torch.device("meta"):
        net = DecoderLM(vocab, partial(DenseAttention), d_model=d_model, n_layers=layers, n_heads=heads,
                        n_kv_heads=kv_heads)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {"state_dict": {k: torch.randn(s, generator=g) for k, s in shapes.items()}}
    if optimizer:
        moments = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(s, generator=g),
                       "exp_avg_sq": torch.rand(s, generator=g)} for i, s in enumerate(shapes.values())}
        state["optimizer_states"] = [{"state": moments, "param_groups": []}]
    return state


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--no-optimizer", action="store_true", help="weights only")
    parser.add_argument("--no-save", action="store_true", help="skip the torch.save reference")
    args = parser.parse_args()
    state = random_state(args.d_model, args.layers, args.heads, args.kv_heads, args.vocab, not args.no_optimizer)
    params = sum(t.numel() for t in state["state_dict"].values())
    nbytes = sum(t.numel() * t.element_size() for _, t in checkpoint_io._tensors(state))
    print(f"{params / 1e6:.0f}M parameters; {nbytes / 2**30:.2f} GiB of tensors "
          f"({'weights' if args.no_optimizer else 'weights + AdamW moments'}); {os.cpu_count()} CPUs")
    threads = checkpoint_io._workers()
    t_hash = timed(lambda: tensor_checksums(state))
    with_sums = add_checksums(state)
    t_verify = timed(lambda: verify_checksums(with_sums, "bench"))
    checkpoint_io._workers = lambda: 1
    t_one = timed(lambda: tensor_checksums(state), repeats=1)
    print(f"checksums on save: {t_hash:.2f} s ({nbytes / t_hash / 1e9:.2f} GB/s, {threads} threads); "
          f"verify on load: {t_verify:.2f} s; one thread: {t_one:.2f} s ({nbytes / t_one / 1e9:.2f} GB/s)")
    if not args.no_save:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.pt")
            t_save = timed(lambda: torch.save(with_sums, path), repeats=1)
            t_load = timed(lambda: torch.load(path, weights_only=True), repeats=1)
        print(f"for reference, torch.save: {t_save:.2f} s, torch.load: {t_load:.2f} s (to {tempfile.gettempdir()})")


if __name__ == "__main__":
    main()
