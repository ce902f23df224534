"""Evaluate every job of a training sweep and write one results table (Markdown + JSON) and one plot.

    python train.py -m experiment=ablation                      # the sweep (see conf/experiment/ablation.yaml)
    python scripts/collect_results.py logs/ablation/multiruns/<date>_<time> \
        --lengths 1024 2048 4096 8192 16384 --num-samples 20 --out results --name ablation

Each job is evaluated with eval.py's config into <job>/eval/ (existing results that cover the request are
reused; --force re-evaluates); extra eval.py overrides go after --eval, e.g. --eval device=cuda impl=reference.
Writes <out>/<name>.json, <out>/<name>.md and <out>/<name>.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spla_lit.config import ConfigError  # noqa: E402
from spla_lit.eval.sweep import collect  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a multirun directory (one folder per job)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--num-samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--tasks", nargs="+", default=None, help="default: eval.yaml's tasks")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep directory)")
    p.add_argument("--name", default="ablation", help="output file stem")
    p.add_argument("--force", action="store_true", help="re-evaluate even when results exist")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--eval", nargs="*", default=[], metavar="KEY=VALUE", help="extra eval.py overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    try:
        summary = collect(args.sweep_dir, args.out or args.sweep_dir, name=args.name, lengths=args.lengths,
                          num_samples=args.num_samples, tasks=args.tasks, extra=args.eval, force=args.force,
                          plot=not args.no_plot)
    except (ConfigError, FileNotFoundError) as e:
        logging.getLogger("collect_results").error("%s", e)
        return 2
    for row in summary["models"]:
        print(f"{row['label']:>12}  " + "  ".join(f"{n}: {100 * v:5.1f}" for n, v in row["average"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
