"""Training-step throughput of the decoder LM with SPLA vs dense attention (GPU).

    python scripts/bench_train_step.py --n 16384 32768 --models spla,sparse,dense [--out table.md]

One optimizer step = forward + backward + AdamW on a bf16-autocast model (B=1, Hq=32, Hkv=2, head dim 128,
blocks of 64, top-16); tokens/s from CUDA-event timings of ``--steps`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from spla_lit.layers import BlockScorer, BlockSparseAttention, DenseAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.models import DecoderLM


def build(model: str, *, d_model: int, n_layers: int, impl: str) -> DecoderLM:
    sparse = partial(BlockSparseAttention, block_size=64, topk=16, impl=impl)
    scorer = partial(BlockScorer, method="taylor2", impl=impl)
    if model == "dense":
        attention = partial(DenseAttention)
    else:
        rla = partial(ResidualLinearAttention, impl=impl) if model == "spla" else None
        attention = partial(SPLAAttention, scorer=scorer, sparse=sparse, rla=rla)
    return DecoderLM(512, attention, d_model=d_model, n_layers=n_layers, n_heads=32, n_kv_heads=2, head_dim=128)


def bench(model: str, n: int, args) -> dict:
    torch.manual_seed(0)
    net = build(model, d_model=args.d_model, n_layers=args.layers, impl=args.impl).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 512, (1, n + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": model, "n": n, "ms": ms, "tok_s": n / ms * 1e3, "peak_gib": peak,
            "loss": float(loss), "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--models", default="spla,sparse,dense")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--impl", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="-")
    args = p.parse_args()
    rows = []
    for n in args.n:
        for model in args.models.split(","):
            t0 = time.time()
            try:
                r = bench(model, n, args)
            except Exception as e:  # report and go on: one failing row must not lose the table
                print(f"{model} N={n}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()
            rows.append(r)
            print(f"{model:6s} N={n:6d} {r['ms']:8.1f} ms/step {r['tok_s']:9.0f} tok/s peak {r['peak_gib']:.1f} GiB "
                  f"({time.time() - t0:.0f} s)", flush=True)
    dev = torch.cuda.get_device_name()
    lines = [f"Training step, {dev}, torch {torch.__version__}, d_model {args.d_model}, {args.layers} layers, "
             "Hq=32, Hkv=2, head dim 128, bf16 autocast, B=1", "",
             "| model | N | ms/step | tokens/s | vs dense | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        dense = next((d for d in rows if d["model"] == "dense" and d["n"] == r["n"]), None)
        ratio = f"{r['tok_s'] / dense['tok_s']:.2f}x" if dense else "-"
        lines.append(f"| {r['model']} | {r['n']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {ratio} | {r['peak_gib']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
