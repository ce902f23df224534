"""Bandwidth of the collectives FSDP uses (all-gather, reduce-scatter) and DDP uses (all-reduce), GPU.

    torchrun --nproc-per-node 2 benchmarks/collectives.py --mib 22 44 88 710

Sizes are the full (gathered) tensor per rank in MiB; 22/44 MiB are one block of the ~355M check model in
bf16/fp32, 710 MiB the whole model in bf16. Prints, on rank 0, the median time of ``--iters`` calls (CUDA
events) and the bus bandwidth in NCCL-tests' convention: ``size x (n-1)/n / time`` for all-gather and
reduce-scatter, ``2 x size x (n-1)/n / time`` for all-reduce.
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial

import torch
import torch.distributed as dist
from timing import event_ms


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        times.append(event_ms(fn) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[22, 44, 88, 710])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        print(f"{n} ranks, {torch.cuda.get_device_name()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        print("| collective | size MiB | median ms | bus GB/s |\n| --- | --- | --- | --- |")
    for mib in args.mib:
        numel = int(mib * 2**20) // 4 // n * n
        full = torch.empty(numel, dtype=torch.float32, device="cuda")
        shard = torch.empty(numel // n, dtype=torch.float32, device="cuda")
        cases = {
            "all_gather": (partial(dist.all_gather_into_tensor, full, shard), 1),
            "reduce_scatter": (partial(dist.reduce_scatter_tensor, shard, full), 1),
            "all_reduce": (partial(dist.all_reduce, full), 2),
        }
        for name, (fn, factor) in cases.items():
            seconds = timed(fn, args.iters)
            bus = factor * full.numel() * 4 * (n - 1) / n / seconds / 1e9
            if rank == 0:
                print(f"| {name} | {mib:g} | {seconds * 1e3:.3f} | {bus:.1f} |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
