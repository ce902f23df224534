"""Training-step throughput of the decoder LM with SPLA vs dense attention (GPU).

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/train_step.py --n 16384 32768 --models spla,sparse,dense \
        [--out table.md]
    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/train_step.py --n 16384 --models spla --layers 32 --heads 8 \
        --batch 1 2 --host

One optimizer step = forward + backward + AdamW on a bf16-autocast model (Hq=32, Hkv=2, head dim 128,
blocks of 64, top-16 by default); tokens/s from CUDA-event timings of ``--steps`` steps after ``--warmup``.

``--host`` adds where the step waits on the CPU: ``host ms`` is the Python time to queue one step (the
CPU returns before the GPU finishes unless something synchronizes); when it is close to the step time the
GPU starves (launch-bound, or a host sync in the step). It also lists the host syncs of one step
(``torch.cuda.set_sync_debug_mode``) by source line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
import warnings
from collections import Counter
from functools import partial

import torch

from spla_lit.layers import BlockScorer, BlockSparseAttention, DenseAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.models import DecoderLM


def build(model: str, *, d_model: int, n_layers: int, impl: str, heads: int = 32, kv_heads: int = 2) -> DecoderLM:
    sparse = partial(BlockSparseAttention, block_size=64, topk=16)
    scorer = partial(BlockScorer, method="taylor2")
    if model == "dense":
        attention = partial(DenseAttention)
    else:
        rla = partial(ResidualLinearAttention) if model == "spla" else None
        attention = partial(SPLAAttention, scorer=scorer, sparse=sparse, rla=rla, impl=impl)
    return DecoderLM(512, attention, d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads,
                     head_dim=128)


def host_syncs(step) -> Counter:
    """Source lines (file:line) of the host syncs of one ``step()``, with counts."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def kernel_table(step, top: int) -> str:
    """GPU time of one ``step()`` by kernel (torch.profiler), and how much of the step the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time / 1e3)
    busy = sum(sum(v) for v in by_name.values())
    lines = [f"GPU busy {busy:.1f} ms of {wall:.1f} ms wall (profiled step); {len(kernels)} kernels",
             "| ms | calls | kernel |", "| --- | --- | --- |"]
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {sum(times):.2f} | {len(times)} | {name} |")
    return "\n".join(lines)


def bench(model: str, n: int, batch: int, args) -> dict:
    torch.manual_seed(0)
    net = build(model, d_model=args.d_model, n_layers=args.layers, impl=args.impl, heads=args.heads,
                kv_heads=args.kv_heads).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 512, (batch, n + 1), device="cuda")

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
    out = {"model": model, "n": n, "batch": batch, "ms": ms, "tok_s": batch * n / ms * 1e3, "peak_gib": peak,
           "loss": float(loss), "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    if args.host:
        queued = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            queued.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        out["host_ms"] = statistics.median(queued)
        out["syncs"] = host_syncs(step)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.runcall(step)
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.host_top)
        out["cprofile"] = text.getvalue()
    if args.kernels:
        out["kernels"] = kernel_table(step, args.kernels)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--models", default="spla,sparse,dense")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--host", action="store_true", help="also the CPU queueing time and the host syncs")
    p.add_argument("--host-top", type=int, default=25, help="functions of the step's CPU profile to print")
    p.add_argument("--kernels", type=int, default=0, help="print the step's N most costly GPU kernels")
    p.add_argument("--impl", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="-")
    args = p.parse_args()
    rows = []
    for n, batch, model in ((n, b, m) for n in args.n for b in args.batch for m in args.models.split(",")):
        t0 = time.time()
        try:
            r = bench(model, n, batch, args)
        except Exception as e:  # report and go on: one failing row must not lose the table
            print(f"{model} N={n} B={batch}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        finally:
            torch.cuda.empty_cache()
        rows.append(r)
        print(f"{model:6s} N={n:6d} B={batch} {r['ms']:8.1f} ms/step {r['tok_s']:9.0f} tok/s "
              f"peak {r['peak_gib']:.1f} GiB ({time.time() - t0:.0f} s)", flush=True)
        if "syncs" in r:
            print(f"  host {r['host_ms']:.1f} ms to queue a step; {sum(r['syncs'].values())} host syncs: "
                  + ", ".join(f"{k} x{v}" for k, v in r["syncs"].most_common()), flush=True)
            print(r["cprofile"], flush=True)
        if "kernels" in r:
            print(r["kernels"], flush=True)
    dev = torch.cuda.get_device_name()
    lines = [f"Training step, {dev}, torch {torch.__version__}, d_model {args.d_model}, {args.layers} layers, "
             f"Hq={args.heads}, Hkv={args.kv_heads}, head dim 128, bf16 autocast", "",
             "| model | N | B | ms/step | tokens/s | vs dense | peak GiB | host ms | host syncs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        dense = next((d for d in rows if d["model"] == "dense" and d["n"] == r["n"] and d["batch"] == r["batch"]),
                     None)
        ratio = f"{r['tok_s'] / dense['tok_s']:.2f}x" if dense else "-"
        host = f"{r['host_ms']:.1f} | {sum(r['syncs'].values())}" if "syncs" in r else "- | -"
        lines.append(f"| {r['model']} | {r['n']} | {r['batch']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {ratio} "
                     f"| {r['peak_gib']:.1f} | {host} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out != "-":
        tmp = args.out + ".tmp"  # never a half-written table
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
