"""Per-stage times of the SPLA decode step (one layer, ``benchmarks/decode.py``'s shapes) and a torch.profiler table
of its kernels: the selection alone, the sparse attention alone, the whole step and dense SDPA, as CUDA-graph
replays (medians of CUDA-event timings). Prints the tables; writes the times as JSON.

    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/decode_profile.py $OUT/prof.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import FULL, Timer, dense_step, graphed, layer_cache, spla_step  # noqa: E402

from spla_lit import ops  # noqa: E402
from spla_lit.options import Selection  # noqa: E402

CASES = [(8192, 1), (131072, 1), (131072, 8), (524288, 8)]  # (context, batch)


def stage_times(x: dict, sel: Selection, device: torch.device, timer: Timer) -> dict:
    """ms of each stage on the cache ``x`` (``decode.layer_cache``)."""
    idx = ops.decode_select(x["q"], x["mean"], x["var"], x["positions"], sel, impl="auto")

    def select():
        return ops.decode_select(x["q"], x["mean"], x["var"], x["positions"], sel, impl="auto")

    def sparse():
        return ops.decode_sparse_attention(x["q"], x["k"], x["v"], idx, x["positions"], block_size=sel.block_size,
                                           phi_q=x["phi_q"], with_normalizer=True, impl="auto")

    def run(fn):
        return timer(graphed(fn, device), iters=50)

    return dict(select_ms=run(select), sparse_ms=run(sparse), full_ms=run(lambda: spla_step(x, sel, "auto")),
                dense_ms=run(lambda: dense_step(x)))


def main(out: str) -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    sel = Selection(block_size=FULL["block"], topk=FULL["topk"])
    timer, results = Timer(device, 50), {}
    for ctx, batch in CASES:
        x = layer_cache(batch, ctx, FULL, device, dtype)
        with torch.inference_mode():
            times = stage_times(x, sel, device, timer)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    spla_step(x, sel, "auto")
                torch.cuda.synchronize()
        key = f"ctx{ctx}_B{batch}"
        results[key] = times
        print(key, times)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
