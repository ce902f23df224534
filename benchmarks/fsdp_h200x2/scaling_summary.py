"""Table of the scaling arms (``python scaling_summary.py OUT [REF_ARM]``): steady-state tokens/s (median of the logged 10-step windows that start after
step 1, so no Triton compilation), per device, MFU, peak memory, against the 1-GPU batch-2 run."""
import csv
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for path in sorted(out.glob("*/metrics.csv")):
    data = {}
    for r in csv.DictReader(open(path)):
        for k, v in r.items():
            if v and k != "step":
                data.setdefault(k, {})[int(r["step"])] = float(v)
    rows[path.parent.name] = data


def steady(d, key, first=12):
    vals = [v for s, v in d.get(key, {}).items() if s >= first]
    return statistics.median(vals) if vals else float("nan")


ref = sys.argv[2] if len(sys.argv) > 2 else "g1b2"
base = steady(rows.get(ref, {}), "train/tokens_per_s")
print(f"| arm | tokens/s | per device | vs {ref} | TFLOP/s/dev | MFU | peak GiB | steps |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, d in rows.items():
    tps = steady(d, "train/tokens_per_s")
    print(f"| {name} | {tps:,.0f} | {steady(d, 'train/tokens_per_s_per_device'):,.0f} | {tps / base:.2f}x "
          f"| {steady(d, 'train/tflops_per_device'):.1f} | {steady(d, 'train/mfu'):.3f} "
          f"| {max(d.get('train/peak_memory_gib', {0: float('nan')}).values()):.1f} "
          f"| {max(d.get('train/loss', {-1: 0}))+1} |")
