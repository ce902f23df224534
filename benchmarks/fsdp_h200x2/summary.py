"""Summarise the GPU check: per-step global-batch loss of both runs, their difference, tokens/s and MFU."""
import csv, statistics, sys
from collections import defaultdict
from pathlib import Path

def read(path):
    loss, tps, mfu, tfl = defaultdict(list), {}, {}, {}
    for row in csv.DictReader(open(path)):
        s = int(row["step"])
        if row.get("train/loss"):
            loss[s].append(float(row["train/loss"]))  # accumulation: one row per micro-batch
        for key, d in (("train/tokens_per_s", tps), ("train/mfu", mfu), ("train/tflops_per_device", tfl)):
            if row.get(key):
                d[s] = float(row[key])
    return {s: sum(v) / len(v) for s, v in loss.items()}, tps, mfu, tfl

out = Path(sys.argv[1])
a, b = read(out / "gpu1" / "metrics.csv"), read(out / "fsdp2" / "metrics.csv")
steps = sorted(set(a[0]) & set(b[0]))
print("step  loss_1gpu  loss_2gpu  diff")
for s in steps:
    print(f"{s:4d}  {a[0][s]:.4f}    {b[0][s]:.4f}    {b[0][s] - a[0][s]:+.4f}")
diffs = [abs(b[0][s] - a[0][s]) for s in steps]
print(f"max |diff| {max(diffs):.4f}, mean |diff| {statistics.mean(diffs):.4f} over {len(steps)} steps")
def late(d):  # steady state: the second half of the run
    ks = sorted(d)[len(d) // 2:]
    return statistics.median(d[k] for k in ks) if ks else float("nan")
t1, t2 = late(a[1]), late(b[1])
print(f"tokens/s: 1 GPU {t1:.0f}, 2 GPUs {t2:.0f}, scaling {t2 / t1:.2f}x")
print(f"TFLOP/s per device: {late(a[3]):.1f} vs {late(b[3]):.1f}; MFU: {late(a[2]):.3f} vs {late(b[2]):.3f}")
