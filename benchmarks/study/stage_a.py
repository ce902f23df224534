"""Study stage A on one machine: train every arm x seed of ``experiment=study_a`` at once, evaluate them all, pack
the per-run JSON for ``scripts/collect_study.py``.

    python benchmarks/study/stage_a.py --steps 1500 --out $OUT                       # the GPU run (all GPUs)
    python benchmarks/study/stage_a.py --steps 1500 --out $OUT --set optim.lr=3e-3   # + overrides for every run
    python benchmarks/study/stage_a.py --tiny --device cpu --arms dense taylor2 --seeds 1 --out /tmp/dry

Each run is ``python train.py experiment=study_a +variant=<arm> seed=<seed> trainer.max_steps=<steps>`` (the
jobs of ``python train.py -m experiment=study_a``), one process each, spread round-robin over the visible GPUs;
then ``python eval.py`` per run at 1x, 2x, 4x and 8x the training length (RULER-style exact match on the trained
tasks, perplexity by position over 8x the training length, selection fidelity per layer at the training length).

Phases have deadlines (--train-s, --eval-s): a run still going then is stopped and reported; whatever finished is
collected. Outputs in --out (6 files): launcher.log, commands.sh, study_a_runs.tar.gz (runs/<job>.json: one record
per run, spla_lit.eval.study.run_record; logs/: clipped job logs), study_a.md / .json / .png (a first look at the
tables; scripts/collect_study.py makes the committed ones). Run directories (checkpoints) stay in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _launch import (
    CPU_TRAIN,
    TINY_TRAIN,
    TRAIN_PHASE,
    Job,
    add_device_args,
    assign_gpus,
    eval_job,
    has_checkpoint,
    log_setup,
    max_time,
    records_and_archive,
    run_jobs,
    start,
    thread_env,
    train_length,
    write_commands,
)

from spla_lit.eval.study import EVAL_TASKS, LENGTHS_X, PPL_X  # noqa: E402 (after _launch puts the root on the path)

ARMS = ("dense", "taylor2", "taylor1", "random", "no_rla", "joint", "window", "linear")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, required=True, help="trainer.max_steps of every run (from the calibration)")
    p.add_argument("--out", type=Path, required=True, help="output folder (the device's $OUT)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides for every run")
    p.add_argument("--train-s", type=float, default=420, help="deadline of the training phase (s)")
    p.add_argument("--startup-s", type=float, default=60,
                   help="part of --train-s kept for start-up and the final checkpoint: trainer.max_time = "
                        "train-s - startup-s (a safety net; runs are sized by --steps)")
    p.add_argument("--eval-s", type=float, default=110, help="deadline of the evaluation phase (s)")
    p.add_argument("--lengths-x", nargs="+", type=int, default=list(LENGTHS_X), help="eval lengths, x training length")
    p.add_argument("--tasks", nargs="+", default=list(EVAL_TASKS), help="eval tasks")
    p.add_argument("--num-samples", type=int, default=100, help="eval samples per task and length")
    p.add_argument("--ppl-x", type=int, default=PPL_X, help="perplexity-by-position length, x training length")
    p.add_argument("--fidelity-samples", type=int, default=8)
    add_device_args(p)
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU dry run")
    p.add_argument("--max-parallel", type=int, default=None, help="jobs at once (default: all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spla_study"), help="where run directories go")
    return p.parse_args(argv)


def train_jobs(args: argparse.Namespace, run_root: Path, threads: int, impl: str) -> list[tuple[Job, str, int]]:
    """(job, arm, seed) per run, in arm-major order (so round-robin GPUs get every arm)."""
    extra = (TINY_TRAIN + ["trainer.val_check_interval=2"] if args.tiny else []) + \
        (CPU_TRAIN if args.device == "cpu" else [])
    out = []
    for arm in args.arms:
        for seed in args.seeds:
            name = f"{len(out):02d}_{arm}_s{seed}"
            argv = [sys.executable, "train.py", "experiment=study_a", f"+variant={arm}", f"seed={seed}",
                    f"trainer.max_steps={args.steps}", f"trainer.max_time={max_time(args.train_s - args.startup_s)}",
                    f"impl={impl}", f"hydra.run.dir={run_root / name}", *extra, *args.set]
            out.append((Job(name, argv, run_root / name / "train.out", thread_env(threads)), arm, seed))
    return out


def eval_overrides(args: argparse.Namespace, arm: str, train_len: int) -> list[str]:
    """eval.py overrides of a run: the study's settings (spla_lit.eval.study.eval_settings) at its training length."""
    from spla_lit.eval.study import eval_settings

    lengths, extra = eval_settings(train_len, lengths_x=args.lengths_x, num_samples=args.num_samples,
                                   ppl_x=args.ppl_x, fidelity_samples=1 if args.tiny else args.fidelity_samples,
                                   batch_size=4 if args.tiny else 32)
    return [f"label={arm}", f"lengths=[{','.join(map(str, lengths))}]", f"tasks=[{','.join(args.tasks)}]", *extra]


def main(argv: list[str] | None = None) -> int:
    from spla_lit.eval.study import collect_study

    args = parse_args(argv)
    log, run_root, gpus, impl = start(args, "study_a")
    threads = max(1, (os.cpu_count() or 1) // (len(args.arms) * len(args.seeds)))
    runs = train_jobs(args, run_root, threads, impl)
    jobs = [j for j, _, _ in runs]
    assign_gpus(jobs, gpus)
    train_len = train_length(args.tiny, args.set)
    log(f"stage A: {len(jobs)} runs ({len(args.arms)} arms x seeds {args.seeds}), {args.steps} steps each, "
        f"GPUs [{','.join(gpus) or 'none'}], {threads} CPU thread(s) per job, runs in {run_root}; overrides for "
        f"every run: {args.set or 'none'}")
    log_setup(log, gpus)
    evals = {j.name: eval_job(j, args.device, impl, eval_overrides(args, arm, train_len)) for j, arm, _ in runs}
    write_commands(args.out / "commands.sh", [(TRAIN_PHASE, jobs), ("evaluation", list(evals.values()))])

    log(f"phase 1: training, deadline {args.train_s:.0f}s (trainer.max_time {max_time(args.train_s - args.startup_s)})")
    trained = run_jobs(jobs, args.train_s, log, max_parallel=args.max_parallel)
    ready = [evals[j.name] for j in jobs if has_checkpoint(j)]
    log(f"phase 1 done at {log.elapsed():.0f}s: {sum(o.ok for o in trained.values())}/{len(jobs)} ok, "
        f"{len(ready)} checkpoints")

    log(f"phase 2: evaluation of {len(ready)} runs, deadline {args.eval_s:.0f}s")
    evaluated = run_jobs(ready, args.eval_s, log, max_parallel=args.max_parallel)
    log(f"phase 2 done at {log.elapsed():.0f}s: {sum(o.ok for o in evaluated.values())}/{len(ready)} ok")

    log("phase 3: run records, archive, tables")
    records = records_and_archive(runs, trained, evaluated, args.out / "study_a_runs.tar.gz", log,
                                  concurrent_jobs=len(jobs), gpus=gpus)
    try:
        collect_study([r for r in records if "config" in r], args.out, name="study_a", write_runs=False)
        log(f"wrote {args.out / 'study_a.md'}")
    except Exception as e:
        log(f"tables failed ({type(e).__name__}: {e}); the archive has the records: scripts/collect_study.py")
    ok = sum(bool(r.get("eval")) for r in records)
    log(f"finished at {log.elapsed():.0f}s: {ok}/{len(records)} runs evaluated")
    print(json.dumps({"runs": len(records), "evaluated": ok, "wall_s": round(log.elapsed())}))
    return 0 if ok == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
