"""Summarise a 2-GPU check: per-step global-batch losses against the 1-GPU reference, the run-to-run noise of
that reference, and steady-state tokens/s.

    python summary.py RUNS_DIR REF NOISE [OTHER ...]

REF and NOISE are two identical 1-GPU runs (their difference is the noise band); each OTHER is compared with
REF the same way. Run folders hold Lightning CSVLogger output (RUNS_DIR/<name>/metrics.csv).
"""
from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> dict[str, dict[int, float]]:
    """Every logged metric of a Lightning CSVLogger ``metrics.csv``: name -> step -> value (mean of the rows of
    a step)."""
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch"):
                    series[key][int(row["step"])].append(float(value))
    return {k: {s: sum(v) / len(v) for s, v in d.items()} for k, d in series.items()}


def steady(d: dict[int, float], first: int = 12) -> float:
    """Median of a metric's values from step ``first`` on (past the Triton compilation), NaN if none."""
    vals = [v for s, v in d.items() if s >= first]
    return statistics.median(vals) if vals else float("nan")


def main() -> None:
    root, ref_name, noise_name, *others = sys.argv[1:]
    runs = {name: read(root_path / "metrics.csv") for name in [ref_name, noise_name, *others]
            if (root_path := Path(root) / name).joinpath("metrics.csv").exists()}
    ref = runs[ref_name]["train/loss"]
    names = list(runs)
    print("Loss of the global batch every 10 steps (and the last step):")
    print("| step | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    steps = sorted(ref)
    for s in [s for s in steps if s % 10 == 0] + ([steps[-1]] if steps[-1] % 10 else []):
        cells = [f"{runs[n]['train/loss'].get(s, float('nan')):.4f}" for n in names]
        print(f"| {s} | " + " | ".join(cells) + " |")

    windows = [(0, 50), (50, 100), (100, 150), (150, 200), (200, 10**9)]
    print(f"\n|loss - {ref_name}| per step: mean / max over each window of steps")
    print("| run | " + " | ".join(f"{a}-{min(b, steps[-1] + 1) - 1}" for a, b in windows if a <= steps[-1])
          + " | last-50 mean loss |")
    print("| --- |" + " --- |" * (sum(a <= steps[-1] for a, _ in windows) + 1))
    for name in names:
        loss = runs[name]["train/loss"]
        cells = []
        for a, b in windows:
            if a > steps[-1]:
                continue
            diffs = [abs(loss[s] - ref[s]) for s in steps if a <= s < b and s in loss]
            cells.append(f"{statistics.mean(diffs):.4f} / {max(diffs):.4f}" if diffs else "-")
        last = [loss[s] for s in sorted(loss)[-50:]]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(last):.4f} |")

    print("\nThroughput (median of the logged 10-step windows after step 12):")
    print("| run | tokens/s | per device | vs " + ref_name + " | MFU | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = steady(runs[ref_name].get("train/tokens_per_s", {}))
    for name in names:
        d = runs[name]
        tps = steady(d.get("train/tokens_per_s", {}))
        peak = max(d.get("train/peak_memory_gib", {0: float("nan")}).values())
        print(f"| {name} | {tps:,.0f} | {steady(d.get('train/tokens_per_s_per_device', {})):,.0f} | {tps / base:.2f}x "
              f"| {steady(d.get('train/mfu', {})):.3f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
