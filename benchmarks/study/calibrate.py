"""Calibrate study stage A: a small grid of dense runs (lr x answer-loss weight x batch size, optionally x width x
mixture) trained at once on one GPU for a
fixed wall time, then evaluated at the training length; which configs reach >= 90% exact match on niah_single and
mqar, after how many steps and tokens, at what throughput. Optional SPLA probe runs measure the sparse arms'
throughput under the same load, to size stage A (benchmarks/study/stage_a.py --steps).

    python benchmarks/study/calibrate.py --out $OUT                                   # the GPU call (~5.5 min)
    python benchmarks/study/calibrate.py --out $OUT --widths 256 384                  # + the width axis
    python benchmarks/study/calibrate.py --tiny --device cpu --lrs 1e-3 --widths 32 --mixtures single \\
        --answer-loss-weights 1 --batch-sizes 2 --probe taylor2 --out /tmp/calib      # CPU dry run

Every run is ``python train.py experiment=study_a +variant=dense seed=1 <grid overrides>`` with a schedule of
--max-steps and ``trainer.max_time`` = --train-s - --startup-s; validation (val/acc/niah_single, val/acc/mqar,
128 samples) every --val-every steps gives the steps to 90%. Then ``python eval.py`` at the training length,
--num-samples per task. Outputs in --out (5 files): launcher.log, commands.sh, calibration.md, calibration.json
(rows, suggestion, run records), calib_runs.tar.gz (records and clipped logs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from _launch import (
    CPU_TRAIN,
    TINY_HEAD_DIM,
    TINY_TRAIN,
    TRAIN_PHASE,
    Job,
    Log,
    add_device_args,
    assign_gpus,
    default_impl,
    eval_job,
    has_checkpoint,
    log_setup,
    max_time,
    records_and_archive,
    run_jobs,
    thread_env,
    train_length,
    visible_gpus,
    width_overrides,
    write_commands,
)

# Mixture options (training and evaluation alike), as changes to study_a.yaml (niah_single + mqar with one-token
# keys; the `copy` curriculum task, a random span repeated later with every repeated token an answer, is off):
#   k1       study_a.yaml as it is
#   copy_k1  + copy as a third of the training samples (validated too, as val/acc/copy: did induction form?;
#            evaluated: the two study tasks only)
#   single   two-token keys (the tasks of calibrations 1 and 2)
#   copy     two-token keys + copy
#   allq     two-token keys, MQAR querying all 16 pairs (twice the answer tokens per sample)
#   easy     two-token keys, an easier MQAR (8 pairs, 4 queries)
#   niah     two-token keys, the NIAH variant mix + MQAR (harder)
_VAL_COPY = ["++data.val_mixture.copy=0.34"]
_COPY = ["data.mixture.copy=0.34", "data.mixture.niah_single=0.33", "data.mixture.mqar=0.33", *_VAL_COPY]
_K2 = ["data.task_kwargs.niah_single.key_len=2", "data.task_kwargs.mqar.key_len=2"]
MIXTURES = {"k1": [],
            "copy_k1": _COPY,
            "single": _K2,
            "copy": _K2 + _COPY,
            "allq": _K2 + ["+data.task_kwargs.mqar.num_queries=16"],
            "easy": _K2 + ["+data.task_kwargs.mqar.num_pairs=8", "+data.task_kwargs.mqar.num_queries=4"],
            "niah": _K2 + ["data.mixture.niah=0.5", "data.mixture.niah_single=0.0"]}
TARGET = 0.9
TASKS = ("niah_single", "mqar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (the device's $OUT)")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-3])
    p.add_argument("--widths", nargs="+", type=int, default=[256],
                   help="d_model (heads of 64, 16 with --tiny); e.g. 256 384 doubles the grid, halving each run's "
                        "share of the GPU")
    p.add_argument("--mixtures", nargs="+", default=["k1", "copy_k1"], choices=sorted(MIXTURES),
                   help="training mixtures; the first one reaching the target is preferred")
    p.add_argument("--answer-loss-weights", nargs="+", type=float, default=[1.0],
                   help="module.answer_loss_weight (0: the plain LM loss over every token; calibration 1 was the "
                        "weight-0 control)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16],
                   help="data.batch_size (sequences of 1024 tokens): fewer tokens per step, more steps")
    p.add_argument("--probe", nargs="*", default=["taylor2"],
                   help="SPLA arms run beside the grid (the first value of every axis) to measure their throughput")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides for every run")
    p.add_argument("--max-steps", type=int, default=5000, help="trainer.max_steps: the LR schedule's length")
    p.add_argument("--val-every", type=int, default=100, help="trainer.val_check_interval")
    p.add_argument("--train-s", type=float, default=280, help="deadline of the training phase (s)")
    p.add_argument("--startup-s", type=float, default=35,
                   help="part of --train-s kept for start-up and the final checkpoint (max_time = the rest)")
    p.add_argument("--eval-s", type=float, default=40, help="deadline of the evaluation phase (s)")
    p.add_argument("--num-samples", type=int, default=100, help="eval samples per task at the training length")
    p.add_argument("--stage-a-train-s", type=float, default=420, help="stage A's --train-s, for the step suggestion")
    p.add_argument("--stage-a-startup-s", type=float, default=60, help="stage A's --startup-s")
    p.add_argument("--stage-a-jobs-per-gpu", type=int, default=12, help="24 runs on 2 GPUs: 12")
    add_device_args(p, "(the calibration uses the first one only)")
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU dry run")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spla_study"), help="where run directories go")
    return p.parse_args(argv)


def knob_overrides(knobs: dict[str, Any], tiny: bool) -> list[str]:
    """train.py overrides of one grid point (``lr``, ``width``, ``mixture``, ``alw``, ``batch``)."""
    return [f"optim.lr={knobs['lr']}", *width_overrides(knobs["width"], TINY_HEAD_DIM if tiny else 64),
            *MIXTURES[knobs["mixture"]], f"module.answer_loss_weight={knobs['alw']}",
            f"data.batch_size={knobs['batch']}"]


def _name(knobs: dict[str, Any]) -> str:
    return f"lr{knobs['lr']:g}_d{knobs['width']}_{knobs['mixture']}_w{knobs['alw']:g}_b{knobs['batch']}"


def grid(args: argparse.Namespace) -> list[tuple[str, str, list[str], dict[str, Any]]]:
    """(name, arm, overrides, knobs) per run: the dense grid, then the probes (at the first value of every axis)."""
    axes = (args.lrs, args.widths, args.mixtures, args.answer_loss_weights, args.batch_sizes)
    points = [dict(zip(("lr", "width", "mixture", "alw", "batch"), p)) for p in itertools.product(*axes)]
    runs = [(f"dense_{_name(k)}", "dense", knob_overrides(k, args.tiny), k) for k in points]
    runs += [(f"probe_{arm}_{_name(points[0])}", arm, knob_overrides(points[0], args.tiny), points[0])
             for arm in args.probe]
    return runs


def steps_to_target(history: list[dict[str, float]]) -> int | None:
    """First validation step where every task of :data:`TASKS` has val accuracy >= :data:`TARGET`."""
    for row in history:
        if all(row.get(f"val/acc/{t}", -1.0) >= TARGET for t in TASKS):
            return int(row["step"])
    return None


def summarize(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One row per run and the stage A suggestion (see calibration.md for the rule)."""
    rows = []
    for r in records:
        t, e = r.get("train") or {}, r.get("eval") or {}
        per_task = ((e.get("ruler") or {}).get("per_task") or {})
        at_len = next(iter(per_task.values()), {})
        steps90 = steps_to_target(t.get("val_history") or [])
        step = t.get("global_step")
        wall = t.get("wall_s")
        rows.append({
            "job": r["job"], "arm": r["arm"], **r.get("knobs", {}), "status": t.get("status"), "steps": step,
            "tokens": t.get("tokens"), "wall_s": wall, "tokens_per_s": t.get("tokens_per_s"),
            "tokens_per_s_median": t.get("tokens_per_s_median"),
            "steps_per_s": step / wall if step and wall else None,
            "steps_to_90": steps90,
            "tokens_to_90": steps90 * t["tokens"] / step if steps90 and t.get("tokens") and step else None,
            "val": {k: (t.get("final") or {}).get(f"val/acc/{k}") for k in TASKS},
            "val_copy": (t.get("final") or {}).get("val/acc/copy"),  # the curriculum task (copy mixtures only)
            "val_answer_acc": (t.get("final") or {}).get("val/answer_acc"),  # per answer token: above chance?
            "eval": {k: at_len.get(k) for k in TASKS},
            "eval_ok": bool(at_len) and all((at_len.get(k) or 0) >= TARGET for k in TASKS),
            "val_loss": (t.get("final") or {}).get("val/loss"),
        })
    dense = [x for x in rows if x["arm"] == "dense"]
    # preferred: the first --mixtures entry (the study's tasks as they are), then the fewest steps to 90%
    reached = sorted((x for x in dense if x["eval_ok"]),
                     key=lambda x: (args.mixtures.index(x["mixture"]), x["steps_to_90"] or x["steps"] or 1 << 30,
                                    x["width"], x["lr"]))
    best = reached[0] if reached else max(dense, key=lambda x: min(v or 0 for v in x["eval"].values()), default=None)
    probes = [x for x in rows if x["arm"] != "dense" and x["steps_per_s"]]
    slow = min(probes, key=lambda x: x["steps_per_s"]) if probes else None
    basis = slow or (best if best and best["steps_per_s"] else None)
    budget = None
    if basis:
        rate = basis["steps_per_s"] * batch_rate_ratio(dense, basis, best)
        # GPU time-slicing: a job gets ~1/N of the GPU, so its rate scales with (jobs now) / (jobs in stage A).
        budget = int(0.85 * (args.stage_a_train_s - args.stage_a_startup_s) * rate
                     * len(records) / args.stage_a_jobs_per_gpu)
    need = None
    if best and reached:
        need = int(math.ceil(1.5 * (best["steps_to_90"] or best["steps"]) / 250) * 250)
    steps = min(v for v in (need, budget) if v) if (need or budget) else None
    suggestion = {
        "reached": [x["job"] for x in reached], "best": best["job"] if best else None,
        "steps_needed": need, "steps_budget": budget, "steps": steps,
        "budget_basis": basis["job"] if basis else None,
        "set": (best_overrides(best, args) if best else []),
        "binding": None if steps is None else ("budget" if budget is not None and steps == budget else "needed"),
    }
    return {"rows": rows, "suggestion": suggestion, "concurrent_jobs": len(records), "target": TARGET}


def batch_rate_ratio(dense: list[dict[str, Any]], basis: dict[str, Any], best: dict[str, Any] | None) -> float:
    """Steps/s at ``best``'s batch size over steps/s at ``basis``'s (the probe measured one batch size only): the
    ratio of the two dense runs that differ from ``basis`` only in the batch size; 1 when there are none."""
    if not best or best.get("batch") == basis.get("batch"):
        return 1.0
    same = ("lr", "width", "mixture", "alw")
    def twin(batch: int) -> dict[str, Any] | None:
        return next((x for x in dense if x.get("batch") == batch and x["steps_per_s"]
                     and all(x.get(k) == basis.get(k) for k in same)), None)
    at_best, at_basis = twin(best["batch"]), twin(basis["batch"])
    return at_best["steps_per_s"] / at_basis["steps_per_s"] if at_best and at_basis else 1.0


def best_overrides(best: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Stage A's ``--set`` for the chosen run: its knobs, less the calibration-only validation of copy."""
    knobs = knob_overrides({k: best[k] for k in ("lr", "width", "mixture", "alw", "batch")}, args.tiny)
    return [o for o in knobs if o not in _VAL_COPY]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _num(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None else f"{scale * x:.{digits}f}"


def markdown(summary: dict[str, Any], args: argparse.Namespace, n_gpus: int) -> str:
    from spla_lit.eval.report import table

    s = summary["suggestion"]
    rows = summary["rows"]
    out = ["# Study stage A: calibration", "",
           f"{summary['concurrent_jobs']} runs at once on {n_gpus or 'no'} GPU(s) ({args.device}), each with "
           f"trainer.max_time = {args.train_s - args.startup_s:.0f}s and an LR schedule of {args.max_steps} steps "
           f"(warmup + cosine; a run cut by max_time has not decayed). Validation every {args.val_every} steps "
           f"(128 samples of niah_single and mqar, + copy in the curriculum mixtures; answer-token accuracy at "
           f"chance: ~1%); eval: {args.num_samples} samples per task at the training length. "
           f"Target: >= {100 * TARGET:.0f}% exact match on both tasks.", "",
           table(["run", "lr", "width", "mixture", "answer loss w", "batch", "status", "steps", "tokens (M)",
                  "tok/s (K)", "median tok/s (K)", "steps to 90% (val)", "tokens to 90% (M)", "val niah / mqar",
                  "val copy", "val answer-token acc", "eval niah / mqar", ">= 90%"],
                 [[f"`{x['job']}`", x.get("lr"), x.get("width"), x.get("mixture"), x.get("alw"),
                   x.get("batch"), x["status"], x["steps"],
                   _num(x["tokens"], 1e-6, 1), _num(x["tokens_per_s"], 1e-3), _num(x["tokens_per_s_median"], 1e-3),
                   x["steps_to_90"] or "-", _num(x["tokens_to_90"], 1e-6, 1),
                   f"{_pct(x['val']['niah_single'])} / {_pct(x['val']['mqar'])}",
                   _pct(x["val_copy"]), _pct(x["val_answer_acc"]),
                   f"{_pct(x['eval']['niah_single'])} / {_pct(x['eval']['mqar'])}",
                   "**yes**" if x["eval_ok"] else "no"] for x in rows]), "",
           "## Suggestion for stage A", "",
           f"- configs reaching the target: {', '.join(s['reached']) or 'none'}; chosen: {s['best']} "
           + ("(the first --mixtures entry that reaches it, then the fewest steps to 90%)" if s["reached"] else
              "(**none reached the target**: the best by min(niah, mqar); stage A would run below it)"),
           f"- steps needed: 1.5 x the chosen run's steps to 90%, rounded up to 250: {s['steps_needed']}",
           f"- step budget: 0.85 x ({args.stage_a_train_s:.0f} - {args.stage_a_startup_s:.0f}) s x steps/s of "
           f"{s['budget_basis']} here (x the dense steps/s ratio of the chosen batch size to the probe's) x "
           f"{summary['concurrent_jobs']} jobs here / {args.stage_a_jobs_per_gpu} jobs "
           f"per GPU in stage A (assumes the GPU is time-sliced evenly between processes): {s['steps_budget']}",
           f"- suggested: `--steps {s['steps']}` ({s['binding']} binds) "
           f"`--set {' '.join(s['set'])}`" if s["steps"] else "- no suggestion: nothing was measured", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from spla_lit.eval.report import write_json, write_text

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "launcher.log")
    run_root = (args.workdir / f"calib_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    gpus = visible_gpus(args.device, args.gpus)[:1]  # one GPU: the calibration measures the load of one device
    impl = default_impl(args.impl, args.device)
    plan = grid(args)
    threads = max(1, (os.cpu_count() or 1) // len(plan))
    extra = (TINY_TRAIN if args.tiny else []) + (CPU_TRAIN if args.device == "cpu" else [])
    runs = []
    for i, (name, arm, overrides, _) in enumerate(plan):
        run_dir = run_root / f"{i:02d}_{name}"
        argv_ = [sys.executable, "train.py", "experiment=study_a", f"+variant={arm}", "seed=1",
                 f"trainer.max_steps={args.max_steps}", f"trainer.val_check_interval={args.val_every}",
                 f"trainer.max_time={max_time(args.train_s - args.startup_s)}", f"impl={impl}",
                 f"hydra.run.dir={run_dir}", *extra, *overrides, *args.set]
        runs.append((Job(run_dir.name, argv_, run_dir / "train.out", thread_env(threads)), arm, 1))
    jobs = [j for j, _, _ in runs]
    assign_gpus(jobs, gpus)
    where = f"GPU {gpus[0]}" if gpus else "the CPU"
    log(f"calibration: {len(jobs)} runs at once on {where}, {threads} CPU thread(s) "
        f"each, runs in {run_root}")
    log_setup(log, gpus)
    train_len = train_length(args.tiny, args.set)
    evals = {j.name: eval_job(j, args.device, impl, [
        f"lengths=[{train_len}]", f"tasks=[{','.join(TASKS)}]", f"num_samples={args.num_samples}",
        f"batch_size={4 if args.tiny else 32}", "perplexity.enabled=false", "fidelity.enabled=false", "plot=false"])
        for j in jobs}
    write_commands(args.out / "commands.sh", [(TRAIN_PHASE, jobs), ("evaluation", list(evals.values()))])

    log(f"phase 1: training, deadline {args.train_s:.0f}s")
    trained = run_jobs(jobs, args.train_s, log)
    ready = [evals[j.name] for j in jobs if has_checkpoint(j)]
    log(f"phase 2: evaluation of {len(ready)} runs, deadline {args.eval_s:.0f}s")
    evaluated = run_jobs(ready, args.eval_s, log)

    log("phase 3: summary")
    knobs = {j.name: {"knobs": k} for j, (_, _, _, k) in zip(jobs, plan)}
    records = records_and_archive(runs, trained, evaluated, args.out / "calib_runs.tar.gz", log, extra=knobs,
                                  concurrent_jobs=len(jobs))
    summary = summarize(records, args)
    write_json({**summary, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "records": records}, args.out / "calibration.json")
    write_text(markdown(summary, args, len(gpus)), args.out / "calibration.md")
    log(f"finished at {log.elapsed():.0f}s; suggestion: {json.dumps(summary['suggestion'])}")
    print((args.out / "calibration.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
