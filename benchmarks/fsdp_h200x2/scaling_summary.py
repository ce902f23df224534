"""Table of the scaling arms of ``scaling.sh`` / ``compile.sh``: steady-state tokens/s, per device, MFU and peak
memory of every run folder, against a reference arm.

    python benchmarks/fsdp_h200x2/scaling_summary.py OUT [REF_ARM]

OUT holds Lightning CSVLogger runs (OUT/<arm>/metrics.csv); REF_ARM defaults to g1b2 (1 GPU, batch 2).
Steady state: the median of the logged 10-step windows from step 12 on (no Triton compilation).
"""

from __future__ import annotations

import sys
from pathlib import Path

from summary import read, steady


def main() -> None:
    out = Path(sys.argv[1])
    rows = {path.parent.name: read(path) for path in sorted(out.glob("*/metrics.csv"))}
    ref = sys.argv[2] if len(sys.argv) > 2 else "g1b2"
    base = steady(rows.get(ref, {}).get("train/tokens_per_s", {}))
    print(f"| arm | tokens/s | per device | vs {ref} | TFLOP/s/dev | MFU | peak GiB | steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, d in rows.items():
        tps = steady(d.get("train/tokens_per_s", {}))
        print(f"| {name} | {tps:,.0f} | {steady(d.get('train/tokens_per_s_per_device', {})):,.0f} | {tps / base:.2f}x "
              f"| {steady(d.get('train/tflops_per_device', {})):.1f} | {steady(d.get('train/mfu', {})):.3f} "
              f"| {max(d.get('train/peak_memory_gib', {0: float('nan')}).values()):.1f} "
              f"| {max(d.get('train/loss', {-1: 0})) + 1} |")


if __name__ == "__main__":
    main()
