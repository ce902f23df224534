"""Same weights, other selection: evaluate trained study checkpoints with every scorer (and without the residual).

Stage A compares arms trained apart, so a better score may come from a better-trained model rather than a better
scorer. Here each checkpoint is evaluated again with ``eval.py``'s model-side overrides, so the scorers are compared
on the same weights:

- an SPLA checkpoint: ``override.scorer.method`` = taylor2, taylor1, random, oracle; and, if it has a residual,
  ``override.rla.mode=none`` (its own selection, residual dropped);
- a dense checkpoint: as trained, then read as block-sparse attention (``override.model.attention=spla``, no residual,
  the run's block size and topk) with each scorer;
- linear and window checkpoints are skipped (no top-k selection).

    python benchmarks/study/swap_eval.py /tmp/spla_study/study_a_<date> --out $OUT/swaps            # GPUs, all at once
    python benchmarks/study/swap_eval.py ck/01_dense_s2.ckpt ck/02_dense_s3.ckpt --device cpu --out /tmp/swaps
    python benchmarks/study/swap_eval.py --collect results/study_a/swaps/evals --out results/study_a/swaps

Each evaluation is one ``eval.py`` process (RULER-style exact match on the trained tasks at ``--lengths``, 100
samples per task and length, the same sample seed as stage A; selection fidelity at the first length), named
``<run>__<overrides>`` (``05_taylor2_s3__scorer_method_taylor1``; ``<run>__trained`` without overrides) with
``results.json`` in ``<out>/evals/<name>/``. Then ``swaps.md`` / ``swaps.json``: exact match per checkpoint and
selection, and, over the checkpoints that learned (as-trained exact match >= ``--learned`` on a task at the first
length), the paired difference between two selections, mean and 95% Student-t interval over checkpoints; the
fidelity (mass share, oracle-block recall) and the held-out loss at the first length (``--perplexity-samples``
sequences, the same for every selection) paired over every checkpoint: the comparison that still separates the
selections where no model retrieves (stage B's text models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _launch import Job, Log, add_device_args, assign_gpus, default_impl, pack, run_jobs, thread_env, visible_gpus

SCORERS = ("taylor2", "taylor1", "random", "oracle")
DENSE = "dense"  # a dense checkpoint as trained
NO_RESIDUAL = "no residual"
WITH_RESIDUAL = "own scorer"  # an SPLA checkpoint's own scorer, residual kept (paired with NO_RESIDUAL)
COLUMNS = (DENSE, *SCORERS, NO_RESIDUAL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path,
                   help="checkpoints (.ckpt), run folders (checkpoints/last.ckpt) or a folder of run folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--collect", type=Path, default=None,
                   help="only tabulate the evaluations already in this folder (<name>/results.json)")
    p.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--tasks", nargs="+", default=["niah_single", "mqar"])
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--perplexity-samples", type=int, default=4,
                   help="held-out sequences of the first length for the loss (the same ones for every selection)")
    p.add_argument("--learned", type=float, default=0.5,
                   help="a checkpoint counts as having learned a task when its exact match with oracle selection at "
                        "the first length is at least this (independent of the scorers compared)")
    add_device_args(p, "the evaluations are spread over")
    p.add_argument("--max-parallel", type=int, default=None, help="evaluations at once (default: 24 on cuda, 1 on cpu)")
    p.add_argument("--deadline-s", type=float, default=900)
    args = p.parse_args(argv)
    if not args.inputs and args.collect is None:
        p.error("give checkpoints / run folders, or --collect <folder>")
    if any(n < 1 for n in args.lengths) or args.num_samples < 1 or args.perplexity_samples < 1:
        p.error("--lengths, --num-samples and --perplexity-samples must be >= 1")
    return args


def find_checkpoints(inputs: Sequence[Path]) -> dict[str, Path]:
    """``{run name: checkpoint}``: a .ckpt file is named by its run folder when it lies in ``<run>/checkpoints/``
    (a study's best-validation checkpoint), else by its stem; a run folder by its name (its last.ckpt); a folder
    without ``checkpoints/`` contributes every run folder in it."""
    found: dict[str, Path] = {}
    for path in inputs:
        if path.is_file():
            found[path.parent.parent.name if path.parent.name == "checkpoints" else path.stem] = path
        elif (path / "checkpoints" / "last.ckpt").is_file():
            found[path.name] = path / "checkpoints" / "last.ckpt"
        elif path.is_dir():
            found.update((d.name, d / "checkpoints" / "last.ckpt") for d in sorted(path.iterdir())
                         if (d / "checkpoints" / "last.ckpt").is_file())
        else:
            raise SystemExit(f"inputs: {path} is neither a checkpoint nor a folder")
    if not found:
        raise SystemExit(f"inputs: no checkpoint found in {', '.join(map(str, inputs))}")
    return found


def plan(ckpt: Path, scorers: Sequence[str]) -> list[list[str]]:
    """The override lists to evaluate ``ckpt`` with ([] = as trained), from its stored model config."""
    from omegaconf import OmegaConf

    from spla_lit.eval.loading import attention_kind, load_checkpoint

    cfg = OmegaConf.create(load_checkpoint(ckpt)["spla_config"])
    kind = attention_kind(cfg)
    if kind == "DenseAttention":
        return [[]] + [["model.attention=spla", f"scorer.method={m}"] for m in scorers]
    if kind != "SPLAAttention" or cfg.model.attention.sparse.mode != "topk":
        return []
    out = [[f"scorer.method={m}"] for m in scorers]
    if cfg.model.attention.rla is not None:
        out.append(["rla.mode=none"])
    return out


def tag(overrides: Sequence[str]) -> str:
    """``["scorer.method=taylor1"]`` -> ``scorer_method_taylor1`` (``trained`` for none)."""
    return "+".join(o.replace(".", "_").replace("=", "_") for o in overrides) or "trained"


def column(name_tag: str) -> str:
    """The table column of an evaluation tag: ``dense`` (a dense checkpoint as trained), a scorer, ``no residual``."""
    if name_tag == "trained":
        return DENSE
    if name_tag == "rla_mode_none":
        return NO_RESIDUAL
    return name_tag.rsplit("scorer_method_", 1)[-1]


def eval_argv(ckpt: Path, out: Path, overrides: Sequence[str], args: argparse.Namespace, impl: str) -> list[str]:
    lengths, tasks = ",".join(map(str, args.lengths)), ",".join(args.tasks)
    return [sys.executable, "eval.py", f"ckpt_path={ckpt}", f"output_dir={out}", f"hydra.run.dir={out}",
            f"device={args.device}", f"impl={impl}", f"label={out.name}", f"lengths=[{lengths}]", f"tasks=[{tasks}]",
            f"num_samples={args.num_samples}", f"perplexity.length={args.lengths[0]}", "perplexity.num_buckets=2",
            f"perplexity.num_samples={args.perplexity_samples}", "fidelity.num_samples=8", "batch_size=32",
            "max_batch_tokens=65536", "plot=false", "progress=false", *(f"override.{o}" for o in overrides)]


# ----------------------------------------------------------------------------------------------------- tables


def load_evals(folder: Path) -> dict[str, dict[str, Any]]:
    """``{run: {tag: results.json}}`` from ``<folder>/<run>__<tag>/results.json``."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*__*/results.json")):
        run, name_tag = f.parent.name.split("__", 1)
        out.setdefault(run, {})[name_tag] = json.loads(f.read_text())
    return out


def table(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per run: exact match per (column, length, task), fidelity means, held-out loss (nats, first length), and the
    scorer it was trained with (known from its no-residual evaluation, which keeps the trained scorer; None
    otherwise)."""
    runs: dict[str, Any] = {}
    for run, by_tag in evals.items():
        cells = {}
        for name_tag, res in by_tag.items():
            fid = res.get("fidelity") or {}
            cells[column(name_tag)] = {"exact_match": res["ruler"]["per_task"],
                                       "fidelity": fid.get("mean") if isinstance(fid, Mapping) else None,
                                       "loss": (res.get("perplexity") or {}).get("loss"),
                                       "overrides": res["eval"].get("overrides", {})}
        own = by_tag.get("rla_mode_none", {}).get("model", {}).get("attention_config", {}).get("scorer", {})
        runs[run] = {"dense": "trained" in by_tag, "trained_scorer": own.get("method"), "cells": cells}
    return runs


def _lengths(runs: Mapping[str, Any]) -> list[str]:
    """Every evaluated length of the table, ascending (the JSON's string keys)."""
    return sorted({n for r in runs.values() for c in r["cells"].values() for n in c["exact_match"]}, key=int)


def _cell(r: Mapping[str, Any], col: str) -> Mapping[str, Any] | None:
    """A run's cell of column ``col``; :data:`WITH_RESIDUAL` is the column of the scorer it was trained with
    (None when unknown or not evaluated)."""
    if col == WITH_RESIDUAL:
        col = r["trained_scorer"]
    return r["cells"].get(col) if col else None


def _score(r: Mapping[str, Any], col: str, length: str, task: str) -> float | None:
    cell = _cell(r, col)
    return None if cell is None else cell["exact_match"][length][task]


def paired(runs: Mapping[str, Any], a: str, b: str, length: str, task: str, first: str,
           learned: float) -> dict[str, Any]:
    """Exact match under ``a`` minus under ``b`` at ``length``, mean and 95% t-interval over the runs that learned
    ``task`` (oracle selection at the ``first`` length >= ``learned``)."""
    from spla_lit.eval.study import t_interval

    diffs, names = [], []
    for run, r in runs.items():
        oracle, sa, sb = _score(r, "oracle", first, task), _score(r, a, length, task), _score(r, b, length, task)
        if oracle is not None and oracle >= learned and sa is not None and sb is not None:
            diffs.append(sa - sb)
            names.append(run)
    iv = t_interval(diffs)
    return {"a": a, "b": b, "length": length, "task": task, "runs": names, "diffs": diffs, **asdict(iv)}


def paired_fidelity(runs: Mapping[str, Any], a: str, b: str, key: str = "mass_share") -> dict[str, Any]:
    """Fidelity ``key`` under ``a`` minus under ``b``, mean and 95% t-interval over every run that has both."""
    from spla_lit.eval.study import t_interval

    diffs = [(r["cells"][a]["fidelity"] or {}).get(key, float("nan")) - (r["cells"][b]["fidelity"] or {}).get(
        key, float("nan")) for r in runs.values() if a in r["cells"] and b in r["cells"]]
    iv = t_interval(diffs)
    return {"a": a, "b": b, "key": key, "diffs": diffs, **asdict(iv), "a_higher": sum(d > 0 for d in diffs)}


def paired_loss(runs: Mapping[str, Any], a: str, b: str) -> dict[str, Any]:
    """Held-out loss under ``a`` minus under ``b`` (nats; < 0: ``a`` better), mean and 95% t-interval over every
    run that has both."""
    from spla_lit.eval.study import t_interval

    def loss(r: Mapping[str, Any], col: str) -> float | None:
        return (_cell(r, col) or {}).get("loss")

    diffs = [la - lb for r in runs.values()
             if (la := loss(r, a)) is not None and (lb := loss(r, b)) is not None]
    iv = t_interval(diffs)
    return {"a": a, "b": b, "diffs": diffs, **asdict(iv), "a_lower": sum(d < 0 for d in diffs)}


def _signed(stat: Mapping[str, Any], scale: float, digits: int) -> str:
    """A difference's ``mean ± half`` cell (:func:`~spla_lit.eval.study.fmt_stat`) with its sign always shown."""
    from spla_lit.eval.study import fmt_stat

    return ("+" if stat["mean"] >= 0 else "") + fmt_stat(stat, scale, digits)


def markdown(runs: Mapping[str, Any], pairs: Sequence[Mapping[str, Any]], fidelity: Sequence[Mapping[str, Any]],
             learned: float, losses: Sequence[Mapping[str, Any]] = ()) -> str:
    lengths = _lengths(runs)
    lines = ["# Same weights, other selection", "",
             "Exact match (%) per task, `niah_single / mqar`, of each checkpoint evaluated with each selection. "
             "`dense`: a dense checkpoint as trained; a dense checkpoint's scorer columns read it as block-sparse "
             "attention without a residual; `no residual`: an SPLA checkpoint with its own scorer and the residual "
             "dropped. Mass share: the selection's share of the exact attention mass, mean over layers, first length.",
             ""]
    for n in lengths:
        lines += [f"## {n} tokens", "", "| run | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
        for run, r in runs.items():
            row = []
            for c in COLUMNS:
                em = r["cells"][c]["exact_match"].get(n) if c in r["cells"] else None
                row.append(" / ".join(f"{100 * em[t]:.0f}" for t in sorted(em, key=lambda t: t != "niah_single"))
                           if em else "")
            lines.append(f"| {run} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Mass share", "", "| run | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for run, r in runs.items():
        fids = [r["cells"].get(c, {}).get("fidelity") or {} for c in COLUMNS]
        lines.append(f"| {run} | " + " | ".join(f"{f['mass_share']:.3f}" if "mass_share" in f else "" for f in fids)
                     + " |")
    lines += ["", "Paired over every checkpoint with both selections (same weights, same sequences):", "",
              "| a − b | fidelity | n | a higher in | mean ± 95% t |", "| --- | --- | --- | --- | --- |"]
    for p in fidelity:
        if p["n"]:
            lines.append(f"| {p['a']} − {p['b']} | {p['key']} | {p['n']} | {p['a_higher']} of {p['n']} | "
                         f"{_signed(p, 1, 3)} |")
    if any(p["n"] for p in losses):
        lines += ["", "## Held-out loss", "", "Next-token loss (nats) on held-out sequences of the first length, the "
                  "same sequences for every selection.", "",
                  "| run | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
        for run, r in runs.items():
            cells = [(r["cells"].get(c) or {}).get("loss") for c in COLUMNS]
            lines.append(f"| {run} | " + " | ".join("" if x is None else f"{x:.4f}" for x in cells) + " |")
        lines += ["", "Paired over every checkpoint with both selections (a − b < 0: a better):", "",
                  "| a − b | n | a lower in | mean ± 95% t (nats) |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['a']} − {p['b']} | {p['n']} | {p['a_lower']} of {p['n']} | {_signed(p, 1, 4)} |"
                  for p in losses if p["n"]]
    lines += ["", f"## Paired differences over the checkpoints that learned the task (oracle selection >= "
                  f"{100 * learned:.0f}% at the first length)", "",
              "| a − b | length | task | n | runs | mean ± 95% t (points) |", "| --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        if p["n"]:
            lines.append(f"| {p['a']} − {p['b']} | {p['length']} | {p['task']} | {p['n']} | {', '.join(p['runs'])} "
                         f"| {_signed(p, 100, 1)} |")
    return "\n".join(lines) + "\n"


def collect(folder: Path, out: Path, learned: float) -> dict[str, Any]:
    from spla_lit.eval.report import write_json, write_text

    runs = table(load_evals(folder))
    if not runs:
        raise SystemExit(f"--collect: no <run>__<tag>/results.json in {folder}")
    lengths = _lengths(runs)
    tasks = sorted({t for r in runs.values() for c in r["cells"].values() for t in c["exact_match"][lengths[0]]})
    pairs = [paired(runs, a, b, n, t, lengths[0], learned) for t in tasks for n in lengths
             for a, b in (("taylor2", "taylor1"), ("taylor2", "random"), ("oracle", "taylor2"),
                          (WITH_RESIDUAL, NO_RESIDUAL))]
    fidelity = [paired_fidelity(runs, a, b, key) for key in ("mass_share", "recall")
                for a, b in (("taylor2", "taylor1"), ("taylor2", "random"), ("oracle", "taylor2"))]
    losses = [paired_loss(runs, a, b) for a, b in (("taylor2", "taylor1"), ("taylor2", "random"),
                                                   ("oracle", "taylor2"), (WITH_RESIDUAL, NO_RESIDUAL))]
    summary = {"runs": runs, "paired": pairs, "paired_fidelity": fidelity, "paired_loss": losses,
               "learned_threshold": learned}
    write_json(summary, out / "swaps.json")
    write_text(markdown(runs, pairs, fidelity, learned, losses), out / "swaps.md")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.collect is not None:
        collect(args.collect, args.out, args.learned)
        print(f"wrote {args.out / 'swaps.md'}")
        return 0
    log = Log(args.out / "launcher.log")
    gpus = visible_gpus(args.device, args.gpus)
    impl = default_impl(args.impl, args.device)
    parallel = args.max_parallel or (24 if args.device == "cuda" else 1)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    jobs = []
    for run, ckpt in find_checkpoints(args.inputs).items():
        overrides = plan(ckpt, args.scorers)
        if not overrides:
            log(f"skip {run}: no top-k selection to swap (linear or window attention)")
        for o in overrides:
            name = f"{run}__{tag(o)}"
            out = args.out / "evals" / name
            jobs.append(Job(name, eval_argv(ckpt, out, o, args, impl), out.with_suffix(".log"), thread_env(threads)))
    assign_gpus(jobs, gpus)
    log(f"{len(jobs)} evaluations, {parallel} at once, device {args.device} [{','.join(gpus) or 'cpu'}], impl {impl}")
    t0 = time.monotonic()
    outcomes = run_jobs(jobs, args.deadline_s, log, max_parallel=parallel)
    log(f"evaluations done in {time.monotonic() - t0:.0f}s: {sum(o.ok for o in outcomes.values())}/{len(jobs)} ok")
    collect(args.out / "evals", args.out, args.learned)
    pack([(f, f"{f.parent.name}/results.json") for f in (args.out / "evals").glob("*/results.json")]
         + [(args.out / n, n) for n in ("swaps.md", "swaps.json", "launcher.log")], args.out / "swaps.tar.gz")
    log(f"wrote {args.out / 'swaps.md'} and swaps.tar.gz")
    return 0 if all(o.ok for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
