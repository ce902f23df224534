"""The study's tables: one record per training run, mean and 95% interval over seeds per arm, Markdown and a figure.

A *run record* (:func:`run_record`) is the JSON-able summary of one training job of a sweep: its arm and seed,
the knobs that size it, its training (steps, tokens, wall time, tokens/s, validation history from TensorBoard)
and its ``eval.py`` results (``<job>/eval/results.json``: RULER-style exact match per task and length, perplexity
by position, selection fidelity per layer). :func:`aggregate` groups records by arm and reduces every number over
the seeds to a mean and a two-sided 95% Student-t interval (:func:`t_interval`); :func:`study_markdown` and
:func:`plot_study` turn that into the tables and the accuracy-vs-length figure of RESULTS.md
(``scripts/collect_study.py`` is the command line).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..ops.utils import cdiv
from .report import plot_accuracy, table, write_json, write_text
from .sweep import read_scalars

log = logging.getLogger(__name__)

# Arms in the order of the issue (the order of the tables); other labels follow, sorted.
ARM_ORDER = ("dense", "taylor2", "taylor1", "random", "no_rla", "joint", "window", "linear")
ARM_TITLES = {"dense": "dense", "taylor2": "SPLA taylor2", "taylor1": "SPLA taylor1", "random": "SPLA random",
              "no_rla": "taylor2, no residual", "joint": "SPLA taylor2, combine=joint",
              "window": "window + linear", "linear": "linear", "base": "base (dense, before CPT)"}
# Knobs copied from the job's config into its record (dotted keys of the run config).
CONFIG_KEYS = ("seed", "impl", "data.seq_len", "data.batch_size", "data.vocab_size", "data.mixture",
               "data.val_mixture", "data.task_kwargs", "model.d_model", "model.n_layers", "model.n_heads",
               "model.n_kv_heads", "model.head_dim", "sparse.block_size", "sparse.topk", "optim.lr",
               "optim.warmup_steps", "trainer.max_steps", "trainer.precision")


# The evaluation of every run (benchmarks/study/stage_a.py and scripts/collect_study.py): RULER-style exact match at
# these multiples of the training length, perplexity by position over PPL_X times it, fidelity at the training length.
LENGTHS_X = (1, 2, 4, 8)
EVAL_TASKS = ("niah_single", "mqar")
PPL_X = 8


def eval_settings(train_len: int, *, lengths_x: Sequence[int] = LENGTHS_X, num_samples: int = 100,
                  ppl_x: int = PPL_X, ppl_buckets: int = 8, ppl_samples: int = 16, fidelity_samples: int = 8,
                  batch_size: int = 32) -> tuple[list[int], list[str]]:
    """(eval lengths, the other ``eval.py`` overrides) of the study's evaluation of a run trained at ``train_len``
    tokens; the tasks and the checkpoint are given separately. Batches hold ``batch_size`` rows, at most 64K tokens."""
    lengths = [train_len * x for x in lengths_x]
    extra = [f"num_samples={num_samples}", f"perplexity.length={train_len * ppl_x}",
             f"perplexity.num_buckets={ppl_buckets}", f"perplexity.num_samples={ppl_samples}",
             f"fidelity.num_samples={fidelity_samples}", f"batch_size={batch_size}", "max_batch_tokens=65536",
             "plot=false"]
    return lengths, extra


# ------------------------------------------------------------------------------------------ statistics


def _t_cdf_upper_half(x: float, df: int, n: int = 2000) -> float:
    """``P(0 <= T <= x)`` for ``x >= 0``: Simpson's rule on ``n`` (even) intervals of Student's t density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    e = -(df + 1) / 2
    h = x / n
    f = [c * (1 + (i * h) ** 2 / df) ** e for i in range(n + 1)]
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t distribution with ``df >= 1`` degrees of freedom
    (bisection on the numerically integrated CDF; ``t_quantile(0.975, 2) = 4.303``)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_upper_half(hi, df) < p:  # bracket
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_cdf_upper_half(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its two-sided ``level`` Student-t interval,
    ``t_{(1 + level) / 2, n - 1} * s / sqrt(n)`` (``s``: sample standard deviation); ``half`` is None for n < 2."""

    mean: float | None
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half is None else self.mean + self.half


def t_interval(values: Iterable[float | None], level: float = 0.95) -> Interval:
    """Mean and ``level`` t-interval half-width of the finite values (None and NaN are skipped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Interval(None, None, 0)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(mean, None, len(xs))
    half = t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(mean, half, len(xs))


# ------------------------------------------------------------------------------------------ run records


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [m.group(1) for m in re.finditer(r"^- (.+)$", path.read_text(), re.M)]


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    for o in overrides:
        name, _, value = o.lstrip("+~").partition("=")
        if name == key:
            return value.strip("'\"")
    return None


def job_config(job_dir: Path) -> dict[str, Any]:
    """The :data:`CONFIG_KEYS` of the job's ``.hydra/config.yaml`` (plain values; missing keys left out)."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    out: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        try:
            value = OmegaConf.select(cfg, key, default=None)
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception as e:  # an interpolation that only resolves inside a Hydra run
            log.debug("%s: %s not resolved (%s)", job_dir, key, e)
    out.update(_init_from_sizes(OmegaConf.select(cfg, "init_from", default=None)))
    return {k: v for k, v in out.items() if v is not None}


def _init_from_sizes(init_from: str | None) -> dict[str, Any]:
    """The :data:`CONFIG_KEYS` ``model.*`` sizes of an ``init_from`` folder, read as ``init_from`` reads it (a run
    started from a Hugging Face folder has those sizes, not the default ``model.*`` values its Hydra config still
    shows); empty when the folder is gone (another machine) or not a model ``init_from`` accepts."""
    if not init_from:
        return {}
    from ..config import ConfigError
    from ..hf.spec import read_hf_config, spec_from_hf_config

    try:
        sizes = spec_from_hf_config(read_hf_config(str(init_from))).model_kwargs()
    except ConfigError:
        return {}
    return {"init_from": str(init_from),
            **{f"model.{k}": v for k, v in sizes.items() if f"model.{k}" in CONFIG_KEYS}}


def _train_summary(scalars: Mapping[str, list[tuple[int, float, float]]], config: Mapping[str, Any],
                   global_step: int | None) -> dict[str, Any]:
    """Steps, tokens, wall time, throughput, final metrics and the validation history of one run."""
    if not scalars:
        return {"status": "no training logs"}
    steps = [s for events in scalars.values() for s, _, _ in events]
    times = [t for events in scalars.values() for _, t, _ in events]
    step = global_step if global_step is not None else max(steps)
    tokens = step * int(config.get("data.batch_size", 0)) * int(config.get("data.seq_len", 0)) or None
    wall = max(times) - min(times)
    logged = [v for _, _, v in scalars.get("train/tokens_per_s", [])]
    # validation metrics and the layer means of the fidelity callback (not its per-layer tags)
    kept = {tag: events for tag, events in scalars.items()
            if events and (tag.startswith("val/") or (tag.startswith("fidelity/") and tag.count("/") == 1))}
    final = {tag: events[-1][2] for tag, events in kept.items()}
    if scalars.get("train/loss"):
        final["train/loss"] = scalars["train/loss"][-1][2]
    # Lightning logs a validation inside training at step global_step - 1 (its counter of stepped batches is
    # advanced after the batch's hooks, validation included): the history is keyed by optimizer steps.
    history: dict[int, dict[str, float]] = {}
    for tag, events in kept.items():
        for s, _, v in events:
            history.setdefault(s + 1, {})[tag] = v
    max_steps = config.get("trainer.max_steps")
    return {"status": "ok" if max_steps is None or step >= max_steps else "cut",
            "global_step": step, "max_steps": max_steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if tokens and wall > 0 else None,
            "tokens_per_s_median": statistics.median(logged) if logged else None,
            "final": final, "val_history": [{"step": s, **history[s]} for s in sorted(history)]}


def _results(job_dir: Path, name: str) -> dict[str, Any] | None:
    path = job_dir / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_record(job_dir: str | Path, arm: str | None = None, seed: int | None = None,
               extra_evals: Sequence[str] = ()) -> dict[str, Any]:
    """The record of one training job (see the module doc): JSON-able, self-contained.

    ``arm`` defaults to the job's ``+variant=`` override and ``seed`` to its config's ``seed``. ``extra_evals``:
    further ``eval.py`` outputs of the job, ``<job>/<name>/results.json``, kept under ``record[name]`` (None when
    missing), e.g. stage B's ``eval_short`` (perplexity at the pretraining length).
    """
    job_dir = Path(job_dir)
    overrides = _overrides(job_dir)
    config = job_config(job_dir)
    results = _results(job_dir, "eval")
    arm = arm or _override_value(overrides, "variant") or (results or {}).get("model", {}).get("label") or job_dir.name
    seed = seed if seed is not None else config.get("seed")
    # the training summary is at the run's final step (last.ckpt's); the evaluated checkpoint may be an earlier
    # one (stage B evaluates the best-validation checkpoint): its step is in record["eval"]["model"]
    ckpt = job_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        import torch

        global_step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    else:
        global_step = (results or {}).get("model", {}).get("global_step")
    return {"job": job_dir.name, "arm": arm, "seed": seed, "overrides": overrides, "config": config,
            "train": _train_summary(read_scalars(job_dir), config, global_step), "eval": results,
            **{name: _results(job_dir, name) for name in extra_evals}}


def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Run records from JSON files, folders of them (searched recursively for ``*.json`` with an ``arm``) or
    ``.tar.gz`` archives (the launcher's ``study_a_runs.tar.gz``)."""
    import tarfile

    records = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
            found = [json.loads(f.read_text()) for f in files]
        elif path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                found = [json.load(tar.extractfile(m)) for m in sorted(tar.getmembers(), key=lambda m: m.name)
                         if m.isfile() and m.name.endswith(".json")]
        elif path.is_file():
            found = [json.loads(path.read_text())]
        else:
            raise FileNotFoundError(f"no run records at {str(path)!r}")
        records += [r for r in found if isinstance(r, dict) and "arm" in r and "train" in r]
    return records


# ------------------------------------------------------------------------------------------ aggregation


def _arm_key(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm), arm) if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def _stat(values: Iterable[float | None]) -> dict[str, Any]:
    return asdict(t_interval(values))


def _suite_stats(suites: Sequence[Mapping[str, Any]], lengths: Sequence[int], tasks: Sequence[str]) -> dict[str, Any]:
    """``{"average": {length: stat}, "per_task": {length: {task: stat}}}`` over the runs' suite results."""
    return {"average": {str(n): _stat(s["average"].get(str(n)) for s in suites) for n in lengths},
            "per_task": {str(n): {t: _stat(s["per_task"].get(str(n), {}).get(t) for s in suites) for t in tasks}
                         for n in lengths}}


def val_curve(history: Sequence[Mapping[str, Any]], key: str = "val/loss") -> dict[str, Any] | None:
    """Whether a validation curve (``train.val_history``) flattened: its best and final ``key``, and the drop over
    its last quarter of validations, ``(value a quarter from the end - final) / that value`` (> 0: still falling,
    < 0: rising again). None with fewer than 2 points."""
    points = [(int(h["step"]), float(h[key])) for h in history if h.get(key) is not None]
    if len(points) < 2:
        return None
    best_step, best = min(points, key=lambda p: p[1])
    ref = points[max(0, len(points) - 1 - max(1, len(points) // 4))][1]
    final = points[-1][1]
    return {"key": key, "points": len(points), "best_step": best_step, "best": best, "final_step": points[-1][0],
            "final": final, "last_quarter_drop": (ref - final) / ref if ref else None}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per arm: mean and 95% t-interval over its runs (seeds) of every table's numbers.

    Returns ``{"lengths": [...], "tasks": [...], "arms": {arm: {"seeds", "runs", "average": {length: stat},
    "per_task": {length: {task: stat}}, "fidelity": {layer: {metric: stat}}, "fidelity_mean": {metric: stat},
    "perplexity": {"buckets": [{"start", "end", "ppl": stat, "loss": stat}], "length", "ppl": stat},
    "train": {key: stat}}}, "paired": paired_differences(records)}`` where a stat is ``{"mean", "half", "n"}``
    (accuracies as fractions). With ``decode=generate`` results an arm also has ``"generate": {"average",
    "per_task"}`` (exact match of the greedy continuation), with ``eval_short`` results (stage B) ``"short_ppl":
    {"length", "ppl": stat, "loss": stat}``.
    """
    by_arm: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_arm.setdefault(str(r["arm"]), []).append(r)
    evals = [r["eval"] for r in records if r.get("eval")]
    lengths = sorted({int(n) for e in evals for n in e["ruler"]["average"]})
    tasks = sorted({t for e in evals for per in e["ruler"]["per_task"].values() for t in per})
    arms: dict[str, Any] = {}
    for arm in sorted(by_arm, key=_arm_key):
        runs = sorted(by_arm[arm], key=lambda r: (r.get("seed") is None, r.get("seed")))
        ev = [r["eval"] for r in runs if r.get("eval")]
        out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs], "runs": [r["job"] for r in runs],
                               "evaluated": len(ev)}
        out.update(_suite_stats([e["ruler"] for e in ev], lengths, tasks))
        generated = [e["ruler_generate"] for e in ev if e.get("ruler_generate")]
        if generated:  # decode=generate: exact match of the greedy continuation (stage B's headline)
            out["generate"] = _suite_stats(generated, lengths, tasks)
        short = [p for p in ((r.get("eval_short") or {}).get("perplexity") for r in runs) if p]
        if short:  # stage B: perplexity at the pretraining length (the general-quality proxy)
            out["short_ppl"] = {"length": short[0]["length"], "ppl": _stat(p["ppl"] for p in short),
                                "loss": _stat(p["loss"] for p in short)}
        fids = [e["fidelity"] for e in ev if (e.get("fidelity") or {}).get("layers")]
        if fids:
            layers = sorted({int(k) for f in fids for k in f["layers"]})
            metrics = sorted({m for f in fids for layer in f["layers"].values() for m in layer})
            out["fidelity"] = {str(i): {m: _stat(f["layers"].get(str(i), {}).get(m) for f in fids) for m in metrics}
                               for i in layers}
            out["fidelity_mean"] = {m: _stat(f["mean"].get(m) for f in fids) for m in metrics}
        ppls = [e["perplexity"] for e in ev if e.get("perplexity")]
        if ppls:
            edges = [(b["start"], b["end"]) for b in ppls[0]["buckets"]]
            same = [p for p in ppls if [(b["start"], b["end"]) for b in p["buckets"]] == edges]
            out["perplexity"] = {"length": ppls[0]["length"], "ppl": _stat(p["ppl"] for p in same),
                                 "buckets": [{"start": s, "end": e, "ppl": _stat(p["buckets"][i]["ppl"] for p in same),
                                              "loss": _stat(p["buckets"][i]["loss"] for p in same)}
                                             for i, (s, e) in enumerate(edges)]}
        trains = [r["train"] for r in runs]
        out["train"] = {k: _stat(t.get(k) for t in trains)
                        for k in ("global_step", "tokens", "wall_s", "tokens_per_s", "tokens_per_s_median")}
        for k in ("val/loss", "val/ppl", "val/exact_match", "val/acc/niah_single", "val/acc/mqar"):
            out["train"][k] = _stat((t.get("final") or {}).get(k) for t in trains)
        curves = [val_curve(t.get("val_history") or []) for t in trains]
        out["train"]["val/loss_best"] = _stat(c and c["best"] for c in curves)
        out["train"]["val/loss_best_step"] = _stat(c and c["best_step"] for c in curves)
        out["train"]["cut"] = sum(t.get("status") == "cut" for t in trains)
        out["train"]["failed"] = sum(t.get("status") not in ("ok", "cut") for t in trains) + len(runs) - len(ev)
        arms[arm] = out
    return {"lengths": lengths, "tasks": tasks, "arms": arms, "num_runs": len(records),
            "paired": paired_differences(records)}


# Paired comparisons (arm A minus arm B over the seeds both ran; the same seed is the same data order): the pairs
# that speak to the paper's claims, and the metrics of a run record they compare (lower is better for losses).
PAIRS = (("taylor2", "dense"), ("taylor1", "dense"), ("random", "dense"), ("no_rla", "dense"),
         ("taylor2", "taylor1"), ("taylor2", "random"), ("taylor2", "no_rla"))


def _suite_at_train_len(record: Mapping[str, Any]) -> float | None:
    ev, n = record.get("eval") or {}, (record.get("config") or {}).get("data.seq_len")
    suite = ev.get("ruler_generate") or ev.get("ruler") or {}
    value = (suite.get("average") or {}).get(str(n))
    return None if value is None else 100 * value


def _ppl_loss(perplexity: Mapping[str, Any] | None) -> float | None:
    ppl = (perplexity or {}).get("ppl")
    return math.log(ppl) if ppl else None


PAIRED_METRICS: dict[str, Any] = {
    "best val loss": lambda r: (val_curve(r["train"].get("val_history") or []) or {}).get("best"),
    "final val loss": lambda r: (r["train"].get("final") or {}).get("val/loss"),
    "short-context loss": lambda r: _ppl_loss((r.get("eval_short") or {}).get("perplexity")),
    "long-context loss": lambda r: _ppl_loss((r.get("eval") or {}).get("perplexity")),
    "exact match at the training length (%)": _suite_at_train_len,
}


def paired_differences(records: Sequence[Mapping[str, Any]],
                       pairs: Sequence[tuple[str, str]] = PAIRS) -> list[dict[str, Any]]:
    """For each ``(a, b)`` pair of arms and each of :data:`PAIRED_METRICS` both arms have: the per-seed
    differences ``a - b`` over the seeds both ran, their mean and 95% t-interval (``stat``) and how many are
    negative / positive. Rows ``{"a", "b", "metric", "seeds", "diffs", "stat", "below", "above"}``."""
    by = {(str(r["arm"]), r.get("seed")): r for r in records if r.get("seed") is not None}
    rows = []
    for a, b in pairs:
        seeds = sorted({s for arm, s in by if arm == a} & {s for arm, s in by if arm == b})
        for metric, read in PAIRED_METRICS.items():
            both = [(s, read(by[a, s]), read(by[b, s])) for s in seeds]
            both = [(s, x, y) for s, x, y in both if x is not None and y is not None]
            if not both:
                continue
            diffs = [x - y for _, x, y in both]
            rows.append({"a": a, "b": b, "metric": metric, "seeds": [s for s, _, _ in both], "diffs": diffs,
                         "stat": _stat(diffs), "below": sum(d < 0 for d in diffs),
                         "above": sum(d > 0 for d in diffs)})
    return rows


# ------------------------------------------------------------------------------------------ Markdown


def fmt_stat(stat: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± half`` for a table cell (``mean`` alone for one run, ``-`` for none)."""
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{scale * stat['mean']:.{digits}f}"
    return mean if stat.get("half") is None else f"{mean} ± {scale * stat['half']:.{digits}f}"


def _length_label(n: int, train_len: int | None) -> str:
    k = f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{k} ({n // train_len}x)" if train_len and n % train_len == 0 else k


def study_markdown(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], title: str = "Study") -> str:
    """The study's Markdown tables from :func:`aggregate`'s ``summary`` and the run records."""
    arms, lengths, tasks = summary["arms"], summary["lengths"], summary["tasks"]
    first = next((r for r in records if r.get("eval")), records[0] if records else {})
    cfg, ev = first.get("config", {}), (first.get("eval") or {})
    train_len = cfg.get("data.seq_len")
    heads = [_length_label(n, train_len) for n in lengths]
    names = {a: ARM_TITLES.get(a, a) for a in arms}
    seeds = sorted({s for a in arms.values() for s in a["seeds"] if s is not None})
    ruler, meta = ev.get("ruler") or {}, ev.get("eval") or {}
    mixture = {k: v for k, v in (cfg.get("data.mixture") or {}).items() if v}  # weight-0 tasks are off
    if cfg.get("data.task_kwargs"):
        mixture["task_kwargs"] = cfg["data.task_kwargs"]
    out = [f"# {title}", "",
           f"{summary['num_runs']} runs: {len(arms)} arms x seeds {seeds}. Training length {train_len}, batch "
           f"{cfg.get('data.batch_size')}, d_model {cfg.get('model.d_model')}, {cfg.get('model.n_layers')} layers, "
           f"lr {cfg.get('optim.lr')}, mixture {mixture}; block {cfg.get('sparse.block_size')}, "
           f"topk {cfg.get('sparse.topk')}. " + (
               f"Evaluation: {ruler.get('num_samples')} samples per task and length (sample seed {ruler.get('seed')}, "
               f"the same for every run), {meta.get('device')}, {meta.get('precision')}, impl {meta.get('impl')}."
               if ruler else "**No run has evaluation results.**"), "",
           "Cells: mean over seeds ± the half-width of the two-sided 95% Student-t interval, "
           "t(0.975, n-1) * s / sqrt(n) (s: sample standard deviation over the n seeds); no ± for a single run.", ""]
    out += ["## Exact match (%), mean over tasks", "",
            table(["arm", "runs"] + heads,
                  [[names[a], v["evaluated"]] + [fmt_stat(v["average"].get(str(n)), 100) for n in lengths]
                   for a, v in arms.items()]), ""]
    for task in tasks:
        out += [f"### {task} (%)", "",
                table(["arm"] + heads, [[names[a]] + [fmt_stat(v["per_task"][str(n)].get(task), 100) for n in lengths]
                                        for a, v in arms.items()]), ""]
    gen_arms = {a: v["generate"] for a, v in arms.items() if "generate" in v}
    if gen_arms:
        out += ["## Exact match by greedy generation (%), mean over tasks", "",
                "The answer decoded greedily from the prompt with the KV cache (eval.py decode=generate); the tables "
                "above score the same samples teacher-forced.", "",
                table(["arm"] + heads, [[names[a]] + [fmt_stat(g["average"].get(str(n)), 100) for n in lengths]
                                        for a, g in gen_arms.items()]), ""]
        for task in tasks:
            out += [f"### {task}, generated (%)", "",
                    table(["arm"] + heads, [[names[a]] + [fmt_stat(g["per_task"][str(n)].get(task), 100)
                                                          for n in lengths] for a, g in gen_arms.items()]), ""]
    short_arms = {a: v["short_ppl"] for a, v in arms.items() if "short_ppl" in v}
    if short_arms:
        length = next(iter(short_arms.values()))["length"]
        out += [f"## Perplexity at the pretraining length ({length} tokens of held-out text)", "",
                "The general-quality proxy: what continual pretraining at the long context cost at the short one.", "",
                table(["arm", "ppl", "loss"], [[names[a], fmt_stat(v["ppl"], 1, 2), fmt_stat(v["loss"], 1, 3)]
                                               for a, v in short_arms.items()]), ""]
    fid_arms = {a: v for a, v in arms.items() if "fidelity" in v}
    if fid_arms:
        fid = next(iter(fid_arms.values()))
        flen = next((r["eval"]["fidelity"].get("length") for r in records
                     if r.get("eval") and (r["eval"].get("fidelity") or {}).get("layers")), None)
        layers = list(fid["fidelity"])
        out += [f"## Selection fidelity per layer ({flen} tokens; spla_lit/eval/fidelity.py)", "",
                "recall: share of the oracle's free top-k blocks the scorer picked; mass share: exact softmax mass "
                "in the selected blocks (oracle: the best this topk can reach); residual err < 1: the residual "
                "moves the output toward dense attention.", ""]
        for metric, digits in (("recall", 3), ("mass_share", 3), ("oracle_mass_share", 3), ("residual_err", 2)):
            out += [f"### {metric}", "",
                    table(["arm"] + [f"layer {i}" for i in layers] + ["mean"],
                          [[names[a]] + [fmt_stat(v["fidelity"].get(i, {}).get(metric), 1, digits) for i in layers]
                           + [fmt_stat(v["fidelity_mean"].get(metric), 1, digits)] for a, v in fid_arms.items()]), ""]
    ppl_arms = {a: v for a, v in arms.items() if "perplexity" in v}
    if ppl_arms:
        p0 = next(iter(ppl_arms.values()))["perplexity"]
        out += [f"## Perplexity by position ({p0['length']} held-out tokens of the training mixture)", "",
                table(["arm", "all"] + [f"{b['start']}-{b['end'] - 1}" for b in p0["buckets"]],
                      [[names[a], fmt_stat(v["perplexity"]["ppl"], 1, 2)]
                       + [fmt_stat(b["ppl"], 1, 2) for b in v["perplexity"]["buckets"]] for a, v in ppl_arms.items()]),
                ""]
    out += ["## Training", "",
            "tokens/s: training tokens over the run's wall time (validation included) with the other runs of the "
            "launch sharing the GPU; median logged: the Throughput callback's 10-step window, validation excluded.",
            "",
            table(["arm", "steps", "tokens (M)", "tokens/s (K)", "median logged (K)", "wall s", "val loss",
                   "best val loss", "at step", "val exact match (%)", "cut / failed"],
                  [[names[a], fmt_stat(v["train"]["global_step"], 1, 0), fmt_stat(v["train"]["tokens"], 1e-6, 1),
                    fmt_stat(v["train"]["tokens_per_s"], 1e-3, 0), fmt_stat(v["train"]["tokens_per_s_median"], 1e-3, 0),
                    fmt_stat(v["train"]["wall_s"], 1, 0), fmt_stat(v["train"]["val/loss"], 1, 3),
                    fmt_stat(v["train"]["val/loss_best"], 1, 3), fmt_stat(v["train"]["val/loss_best_step"], 1, 0),
                    fmt_stat(v["train"]["val/exact_match"], 100), f"{v['train']['cut']} / {v['train']['failed']}"]
                   for a, v in arms.items()]), ""]
    paired = summary.get("paired") or []
    if paired:
        out += ["## Paired by seed", "",
                "Arm A minus arm B per seed (the same seed: the same data order and, in stage B, the same base), "
                "mean ± 95% t-interval over the seeds both ran; A < B / A > B: how many seeds. Losses in nats "
                "(long/short-context: ln of the evaluation's perplexity); lower is better, except exact match.", "",
                table(["A - B", "metric", "n", "difference", "A < B", "A > B"],
                      [[f"{names.get(p['a'], p['a'])} - {names.get(p['b'], p['b'])}", p["metric"], p["stat"]["n"],
                        fmt_stat(p["stat"], 1, 1 if p["metric"].startswith("exact") else 4), p["below"], p["above"]]
                       for p in paired]), ""]
    for r in records:
        curve = val_curve(r["train"].get("val_history") or []) if r.get("role") == "base" else None
        if curve is None:
            continue
        hist = [h for h in r["train"]["val_history"] if h.get("val/loss") is not None]
        shown = hist[::max(1, cdiv(len(hist), 16))]  # at most 16 rows, and the last
        shown += [] if shown[-1] is hist[-1] else [hist[-1]]
        drop = curve["last_quarter_drop"]
        out += [f"## Base model `{r['job']}`: pretraining validation curve", "",
                f"Best val/loss {curve['best']:.4f} at step {curve['best_step']}, final {curve['final']:.4f} at step "
                f"{curve['final_step']}; over the last quarter of its {curve['points']} validations the loss "
                + ("-" if drop is None else f"fell {100 * drop:.2f}%" if drop >= 0 else f"rose {-100 * drop:.2f}%")
                + (f"; exported: step {r['exported_step']}" if r.get("exported_step") is not None else "") + ".", "",
                table(["step", "val/loss", "val/ppl"],
                      [[h["step"], f"{h['val/loss']:.4f}", f"{h['val/ppl']:.2f}" if h.get("val/ppl") else "-"]
                       for h in shown]), ""]
    out += ["## Runs", "",
            table(["job", "arm", "seed", "status", "steps", "eval"],
                  [[f"`{r['job']}`", r["arm"], r.get("seed"), r["train"].get("status"), r["train"].get("global_step"),
                    "yes" if r.get("eval") else "**missing**"] for r in records]), ""]
    return "\n".join(out)


def plot_study(summary: Mapping[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Exact match (mean over tasks, %) vs context length per arm, with the 95% interval as a band.
    None (and a logged message) without matplotlib."""
    series: dict[str, dict[str, float]] = {}
    bands: dict[str, dict[str, tuple[float, float]]] = {}
    for arm, v in summary["arms"].items():
        name = ARM_TITLES.get(arm, arm)
        stats = {n: s for n, s in v["average"].items() if s.get("mean") is not None}
        if stats:
            series[name] = {n: s["mean"] for n, s in stats.items()}
            bands[name] = {n: (s["mean"] - s["half"], s["mean"] + s["half"]) for n, s in stats.items()
                           if s.get("half") is not None}
    if not series:
        log.warning("no run has evaluation results: no figure")
        return None
    return plot_accuracy(series, path, title=title, bands=bands)


def plot_val_curves(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Validation loss vs training step per arm (mean over seeds at the steps every seed logged, the 95% interval
    as a band). None without matplotlib or without validation histories."""
    from .report import pyplot, save_figure

    by_arm: dict[str, list[dict[int, float]]] = {}
    for r in sorted(records, key=lambda r: _arm_key(str(r["arm"]))):
        hist = {int(h["step"]): float(h["val/loss"]) for h in (r.get("train") or {}).get("val_history") or []
                if h.get("val/loss") is not None}
        if hist:
            by_arm.setdefault(str(r["arm"]), []).append(hist)
    plt = pyplot() if by_arm else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for arm, hists in by_arm.items():
        steps = sorted(set.intersection(*(set(h) for h in hists)))
        stats = [t_interval(h[s] for h in hists) for s in steps]
        line, = ax.plot(steps, [st.mean for st in stats], label=ARM_TITLES.get(arm, arm), lw=1.2)
        if len(hists) > 1:
            ax.fill_between(steps, [st.low for st in stats], [st.high for st in stats], color=line.get_color(),
                            alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def record_name(record: Mapping[str, Any]) -> str:
    """File stem of a run record: ``<arm>_s<seed>`` (the job name when the seed is unknown)."""
    seed = record.get("seed")
    return f"{record['arm']}_s{seed}" if seed is not None else str(record["job"])


def collect_study(records: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "study_a",
                  title: str | None = None, plot: bool = True, write_runs: bool = True) -> dict[str, Any]:
    """Write ``<out>/<name>.md`` (tables), ``<name>.json`` (the aggregate), ``<name>.png`` and ``<name>_val.png``
    (figures, with matplotlib) and, with ``write_runs``, every record as ``<out>/runs/<arm>_s<seed>.json``."""
    if not records:
        raise ValueError("records: no run records to collect")
    out = Path(out_dir)
    records = sorted(records, key=lambda r: (_arm_key(str(r["arm"])), r.get("seed") is None, r.get("seed"), r["job"]))
    if write_runs:
        stems = [record_name(r) for r in records]
        if len(set(stems)) != len(stems):
            stems = [f"{s}_{r['job']}" for s, r in zip(stems, records)]
        for stem, r in zip(stems, records):
            write_json(r, out / "runs" / f"{stem}.json")
    summary = aggregate(records)
    write_json(summary, out / f"{name}.json")
    write_text(study_markdown(summary, records, title or f"Study: {name}"), out / f"{name}.md")
    if plot:
        plot_study(summary, out / f"{name}.png", title=f"{name}: exact match vs length (95% t-interval over seeds)")
        plot_val_curves(records, out / f"{name}_val.png", title=f"{name}: validation loss (95% t-interval over seeds)")
    log.info("wrote %s", out / f"{name}.md")
    return summary


__all__ = ["Interval", "aggregate", "collect_study", "eval_settings", "load_records", "paired_differences",
           "plot_study", "plot_val_curves", "run_record", "study_markdown", "t_interval", "t_quantile", "val_curve"]
