"""Collect a training sweep's evaluation results into one table and one plot (``scripts/collect_results.py``).

A sweep directory is what ``python train.py -m ...`` writes: one folder per job with
``checkpoints/last.ckpt`` and ``.hydra/overrides.yaml``. Each job is evaluated with ``eval.py``'s
config (results in ``<job>/eval/``), or its existing ``<job>/eval/results.json`` is read when it already
covers the requested lengths, tasks and sample count.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .report import fmt, pct, plot_accuracy, table, write_json

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Job:
    """One job of a sweep: its directory, checkpoint (None if absent) and label (its ``variant``, else None)."""

    path: Path
    ckpt: Path | None
    variant: str | None

    @property
    def results_path(self) -> Path:
        return self.path / "eval" / "results.json"


def _variant(job_dir: Path) -> str | None:
    """The ``variant=`` (or ``+variant=``) override of a job, from ``.hydra/overrides.yaml``."""
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    match = re.search(r"^- \+?variant=(\S+)$", overrides.read_text(), re.M)
    return match.group(1) if match else None


def _job_order(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (1 << 30, path.name)


def find_jobs(sweep_dir: str | Path) -> list[Job]:
    """The sweep's jobs (folders with a checkpoint or eval results), in job-number order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist")
    jobs = []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_job_order):
        ckpt = d / "checkpoints" / "last.ckpt"
        job = Job(d, ckpt if ckpt.is_file() else None, _variant(d))
        if job.ckpt is not None or job.results_path.is_file():
            jobs.append(job)
    return jobs


def eval_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/eval.yaml`` composed with command-line style overrides (outside a Hydra run)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def _covers(results: dict[str, Any], lengths: Sequence[int], tasks: Sequence[str] | None, num_samples: int) -> bool:
    per_task = results.get("ruler", {}).get("per_task", {})
    have = set(lengths) <= {int(n) for n in per_task}
    same_tasks = tasks is None or all(set(tasks) <= set(per_task[str(n)]) for n in lengths if str(n) in per_task)
    return have and same_tasks and results["ruler"].get("num_samples", 0) >= num_samples


def evaluate_job(job: Job, lengths: Sequence[int], num_samples: int, tasks: Sequence[str] | None = None,
                 extra: Sequence[str] = (), force: bool = False) -> dict[str, Any]:
    """The job's eval results: read when they cover the request (and not ``force``), else computed."""
    import json

    from .runner import evaluate

    if job.results_path.is_file() and not force:
        results = json.loads(job.results_path.read_text())
        if _covers(results, lengths, tasks, num_samples) or job.ckpt is None:
            log.info("%s: reusing %s", job.path.name, job.results_path)
            return results
    if job.ckpt is None:
        raise FileNotFoundError(f"{job.path}: no checkpoint and no eval results")
    overrides = [f"ckpt_path={job.ckpt}", f"output_dir={job.path / 'eval'}",
                 f"lengths=[{','.join(str(n) for n in lengths)}]", f"num_samples={num_samples}"]
    if tasks:
        overrides.append(f"tasks=[{','.join(tasks)}]")
    if job.variant:
        overrides.append(f"label={job.variant}")
    log.info("%s: evaluating %s", job.path.name, job.ckpt)
    return evaluate(eval_config(overrides + list(extra)))


TRAIN_KEYS = ("val/loss", "val/exact_match", "train/tokens_per_s", "fidelity/recall", "fidelity/mass_share",
              "fidelity/residual_err")


def read_scalars(job_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every TensorBoard scalar of the job (``<job>/tensorboard/events.out.tfevents.*``) as ``tag -> [(step,
    wall_time, value), ...]`` in logged order. Empty without logs or the ``tensorboard`` package."""
    files = sorted((job_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    out: dict[str, list[tuple[int, float, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    return out


def train_metrics(job_dir: Path) -> dict[str, float]:
    """Last logged value of the job's TensorBoard scalars (``val/*``, ``fidelity/*``, throughput...), plus
    ``wall_s``, the time from its first to its last event. Empty without logs or the ``tensorboard`` package."""
    scalars = read_scalars(job_dir)
    out = {tag: events[-1][2] for tag, events in scalars.items() if events}
    times = [t for events in scalars.values() for _, t, _ in events]
    if times:
        out["wall_s"] = max(times) - min(times)
    return out


def summarize(job: Job, results: dict[str, Any], lengths: Sequence[int]) -> dict[str, Any]:
    """One row of the sweep table."""
    ruler = results["ruler"]
    average = {str(n): ruler["average"][str(n)] for n in lengths if str(n) in ruler["average"]}
    fid = results.get("fidelity") or {}
    ppl = results.get("perplexity") or {}
    model = results["model"]
    return {
        "job": job.path.name, "label": job.variant or model["label"], "model": model.get("name", model["label"]),
        "global_step": model.get("global_step"), "attention": model.get("attention"), "average": average,
        "mean": sum(average.values()) / len(average) if average else None,
        "per_task": {str(n): ruler["per_task"][str(n)] for n in lengths if str(n) in ruler["per_task"]},
        "ppl": ppl.get("ppl"), "ppl_length": ppl.get("length"),
        "ppl_last_bucket": ppl["buckets"][-1]["ppl"] if ppl.get("buckets") else None,
        "fidelity": fid.get("mean"), "num_samples": ruler.get("num_samples"), "sample_seed": ruler.get("seed"),
        "eval": results.get("eval"), "train": train_metrics(job.path),
    }


def sweep_markdown(rows: list[dict[str, Any]], lengths: Sequence[int], title: str) -> str:
    """The sweep table (mean exact match per length, perplexity, fidelity means) and per-task tables."""
    ls = [str(n) for n in lengths]
    headers = ["model", "job", "step"] + ls + ["mean", "ppl", "ppl (last bucket)", "recall", "mass share",
                                               "residual err"]
    body = []
    for r in rows:
        f = r["fidelity"] or {}
        body.append([f"**{r['label']}**", f"`{r['job']}`", r["global_step"]] + [pct(r["average"].get(n)) for n in ls]
                    + [pct(r["mean"]), fmt(r["ppl"], 2), fmt(r["ppl_last_bucket"], 2), fmt(f.get("recall")),
                       fmt(f.get("mass_share")), fmt(f.get("residual_err"))])
    first = rows[0] if rows else {}
    out = [f"# {title}", "",
           f"RULER-style exact match (%), mean over tasks, per context length; {first.get('num_samples')} samples "
           f"per task and length (sample seed {first.get('sample_seed')}). ppl: held-out training-mixture "
           "perplexity at the training length (overall, and over the last position bucket). Fidelity: "
           "mean over layers (spla_lit/eval/fidelity.py).", "", table(headers, body), ""]
    if any(r["train"] for r in rows):
        out += ["### Training-time validation (last logged values)", "",
                table(["model", "steps", "train wall s"] + list(TRAIN_KEYS),
                      [[r["label"], r["global_step"], fmt(r["train"].get("wall_s"), 0)]
                       + [fmt(r["train"].get(k)) for k in TRAIN_KEYS] for r in rows]), ""]
    tasks = sorted({t for r in rows for n in ls for t in r["per_task"].get(n, {})})
    for n in ls:
        if not any(n in r["per_task"] for r in rows):
            continue
        out += [f"### Per task at {n} tokens (%)", "",
                table(["model"] + tasks, [[r["label"]] + [pct(r["per_task"].get(n, {}).get(t)) for t in tasks]
                                          for r in rows]), ""]
    return "\n".join(out)


def collect(sweep_dir: str | Path, out_dir: str | Path, name: str = "ablation", lengths: Sequence[int] = (1024,),
            num_samples: int = 20, tasks: Sequence[str] | None = None, extra: Sequence[str] = (),
            force: bool = False, plot: bool = True) -> dict[str, Any]:
    """Evaluate (or read) every job of the sweep and write ``<name>.json``, ``<name>.md``, ``<name>.png``."""
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job with checkpoints/last.ckpt or eval/results.json under {sweep_dir}")
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for job in jobs:  # the outputs are rewritten after each job: a run cut short still leaves a table
        rows.append(summarize(job, evaluate_job(job, lengths, num_samples, tasks, extra, force), lengths))
        summary = {"sweep_dir": str(sweep_dir), "lengths": list(lengths), "models": rows}
        write_json(summary, out_dir / f"{name}.json")
        (out_dir / f"{name}.md").write_text(sweep_markdown(rows, lengths, f"Sweep results: {name}"))
    if plot:
        plot_accuracy({r["label"]: r["average"] for r in rows}, out_dir / f"{name}.png",
                      title=f"{name}: RULER-style exact match vs context length")
    log.info("wrote %s", ", ".join(str(out_dir / f"{name}.{ext}") for ext in ("json", "md", "png")))
    return summary
