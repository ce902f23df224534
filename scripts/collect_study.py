"""Turn a study's runs into RESULTS.md tables: mean and 95% Student-t interval over seeds per arm and length, per
task, selection fidelity per layer, perplexity by position, training throughput; and one figure.

    # the launcher's archive (benchmarks/study/stage_a.py), or folders / files of run records
    python scripts/collect_study.py /path/to/study_a_runs.tar.gz --out results/study_a
    # a sweep of `python train.py -m experiment=study_a`: evaluates every job without eval results first
    python scripts/collect_study.py logs/study_a/multiruns/<date>_<time> --out results/study_a --eval device=cuda

Writes <out>/runs/<arm>_s<seed>.json (the raw per-run records: commit them), <out>/<name>.md (the tables),
<out>/<name>.json (the aggregate) and <out>/<name>.png (needs matplotlib; skipped with a message without it).
The interval is the two-sided 95% Student-t interval of the mean over seeds: mean +- t(0.975, n-1) s / sqrt(n).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spla_lit.config import ConfigError  # noqa: E402
from spla_lit.eval.study import (  # noqa: E402
    EVAL_TASKS,
    LENGTHS_X,
    collect_study,
    eval_settings,
    job_config,
    load_records,
    run_record,
)
from spla_lit.eval.sweep import evaluate_job, find_jobs  # noqa: E402

log = logging.getLogger("collect_study")


def is_sweep(path: Path) -> bool:
    """A multirun folder: job folders with ``.hydra/overrides.yaml``."""
    return path.is_dir() and any((d / ".hydra" / "overrides.yaml").is_file() for d in path.iterdir() if d.is_dir())


def sweep_records(sweep_dir: Path, args: argparse.Namespace) -> list[dict]:
    """Evaluate the sweep's jobs that have no study evaluation yet (eval.py, in this process), then their records."""
    records = []
    for job in find_jobs(sweep_dir):
        train_len = int(job_config(job.path).get("data.seq_len", 0))
        if job.ckpt is not None and train_len:
            lengths, extra = eval_settings(train_len, lengths_x=args.lengths_x, num_samples=args.num_samples)
            extra = [o for o in extra if not o.startswith("num_samples=")]  # evaluate_job sets it
            evaluate_job(job, lengths, args.num_samples, args.tasks, extra + list(args.eval), force=args.force)
        records.append(run_record(job.path))
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path,
                   help="run records (.json, folders of them, .tar.gz) or multirun folders of experiment=study_a")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. results/study_a")
    p.add_argument("--name", default="study_a", help="file stem of the tables and the figure")
    p.add_argument("--title", default=None)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--lengths-x", nargs="+", type=int, default=list(LENGTHS_X), help="sweeps: eval lengths, x train")
    p.add_argument("--tasks", nargs="+", default=list(EVAL_TASKS), help="sweeps: eval tasks")
    p.add_argument("--num-samples", type=int, default=100, help="sweeps: samples per task and length")
    p.add_argument("--force", action="store_true", help="sweeps: re-evaluate even when results exist")
    p.add_argument("--eval", nargs="*", default=[], metavar="KEY=VALUE", help="sweeps: extra eval.py overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    try:
        records = []
        for path in args.inputs:
            records += sweep_records(path, args) if is_sweep(path) else load_records([path])
        summary = collect_study(records, args.out, name=args.name, title=args.title, plot=not args.no_plot)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    for arm, v in summary["arms"].items():
        cells = [f"{n}: {100 * s['mean']:5.1f}" if s["mean"] is not None else f"{n}: -"
                 for n, s in v["average"].items()]
        print(f"{arm:>10} ({v['evaluated']} runs)  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
