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
import time
from pathlib import Path

from _launch import (
    CPU_TRAIN,
    ROOT,
    TINY_TRAIN,
    Job,
    Log,
    assign_gpus,
    clip_log,
    command_line,
    gpu_count,
    max_time,
    pack,
    run_jobs,
    thread_env,
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
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--impl", default=None, help="attention ops (default: auto on cuda, reference on cpu)")
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU dry run")
    p.add_argument("--max-parallel", type=int, default=None, help="jobs at once (default: all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spla_study"), help="where run directories go")
    return p.parse_args(argv)


def train_jobs(args: argparse.Namespace, run_root: Path, threads: int) -> list[tuple[Job, str, int]]:
    """(job, arm, seed) per run, in arm-major order (so round-robin GPUs get every arm)."""
    impl = args.impl or ("auto" if args.device == "cuda" else "reference")
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


def eval_job(args: argparse.Namespace, job: Job, arm: str, train_len: int) -> Job:
    """The eval.py run of a training job (same GPU and thread caps), results in <run>/eval/."""
    from spla_lit.eval.study import eval_settings

    run_dir = job.log.parent
    impl = args.impl or ("auto" if args.device == "cuda" else "reference")
    lengths, extra = eval_settings(train_len, lengths_x=args.lengths_x, num_samples=args.num_samples,
                                   ppl_x=args.ppl_x, fidelity_samples=1 if args.tiny else args.fidelity_samples)
    argv = [sys.executable, "eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"output_dir={run_dir / 'eval'}", f"hydra.run.dir={run_dir / 'eval'}", f"label={arm}",
            f"lengths=[{','.join(map(str, lengths))}]", f"tasks=[{','.join(args.tasks)}]", f"device={args.device}",
            f"impl={impl}", *extra, *(["batch_size=4"] if args.tiny else [])]
    return Job(job.name, argv, run_dir / "eval.out", dict(job.env), job.gpu)


def train_length(args: argparse.Namespace) -> int:
    """The training length of the runs (study_a's, or the --set / --tiny override)."""
    from omegaconf import OmegaConf

    length = OmegaConf.load(ROOT / "conf" / "experiment" / "study_a.yaml").data.seq_len
    for o in (TINY_TRAIN if args.tiny else []) + args.set:
        if o.startswith("data.seq_len="):
            length = int(o.split("=", 1)[1])
    return int(length)


def main(argv: list[str] | None = None) -> int:
    from spla_lit.eval.report import write_json
    from spla_lit.eval.study import collect_study, run_record

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "launcher.log")
    run_root = (args.workdir / f"study_a_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    n_gpus = gpu_count(args.device)
    threads = max(1, (os.cpu_count() or 1) // (len(args.arms) * len(args.seeds)))
    runs = train_jobs(args, run_root, threads)
    jobs = [j for j, _, _ in runs]
    assign_gpus(jobs, n_gpus)
    train_len = train_length(args)
    log(f"stage A: {len(jobs)} runs ({len(args.arms)} arms x seeds {args.seeds}), {args.steps} steps each, "
        f"{n_gpus or 'no'} GPU(s), {threads} CPU thread(s) per job, runs in {run_root}")
    log(f"python {sys.version.split()[0]}; cwd {ROOT}; overrides for every run: {args.set or 'none'}")
    if n_gpus:
        import torch

        log(f"torch {torch.__version__}; " + "; ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}"
                                                       for i in range(n_gpus)))
    evals = {j.name: eval_job(args, j, arm, train_len) for j, arm, _ in runs}
    (args.out / "commands.sh").write_text("# training (one process per run, all at once)\n"
                                          + "\n".join(command_line(j) for j in jobs)
                                          + "\n# evaluation\n" + "\n".join(command_line(j) for j in evals.values())
                                          + "\n")

    log(f"phase 1: training, deadline {args.train_s:.0f}s (trainer.max_time {max_time(args.train_s - args.startup_s)})")
    trained = run_jobs(jobs, args.train_s, log, max_parallel=args.max_parallel)
    ready = [evals[j.name] for j in jobs if (j.log.parent / "checkpoints" / "last.ckpt").is_file()]
    log(f"phase 1 done at {log.elapsed():.0f}s: {sum(o.ok for o in trained.values())}/{len(jobs)} ok, "
        f"{len(ready)} checkpoints")

    log(f"phase 2: evaluation of {len(ready)} runs, deadline {args.eval_s:.0f}s")
    evaluated = run_jobs(ready, args.eval_s, log, max_parallel=args.max_parallel)
    log(f"phase 2 done at {log.elapsed():.0f}s: {sum(o.ok for o in evaluated.values())}/{len(ready)} ok")

    log("phase 3: run records, archive, tables")
    members, records = [], []
    for job, arm, seed in runs:
        run_dir = job.log.parent
        try:
            record = run_record(run_dir, arm=arm, seed=seed)
        except Exception as e:  # a broken run must not lose the others
            log(f"record of {job.name} failed: {type(e).__name__}: {e}")
            record = {"job": job.name, "arm": arm, "seed": seed, "train": {"status": f"record failed: {e}"},
                      "eval": None}
        record["launcher"] = {"gpu": job.gpu, "train": vars(trained[job.name]),
                              "eval": vars(evaluated[job.name]) if job.name in evaluated else None,
                              "concurrent_jobs": len(jobs), "gpus": n_gpus}
        records.append(record)
        path = run_dir / "run.json"
        write_json(record, path)
        members += [(path, f"runs/{job.name}.json"), (clip_log(job.log), f"logs/{job.name}.train.log"),
                    (clip_log(run_dir / "eval.out"), f"logs/{job.name}.eval.log")]
    pack(members, args.out / "study_a_runs.tar.gz")
    log(f"wrote {args.out / 'study_a_runs.tar.gz'} ({len(records)} records)")
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
