"""Write evaluation results: JSON, Markdown tables and an accuracy-vs-length plot (matplotlib, optional)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIDELITY_HEADERS = {"recall": "recall", "mass_share": "mass share", "oracle_mass_share": "oracle mass share",
                    "sparse_err": "sparse err", "layer_err": "SPLA err", "residual_err": "residual err"}


def _clean(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """``obj`` as strict JSON (NaN / inf as null), written atomically."""
    return write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n", path)


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table cell ('-' for missing / NaN)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ruler_table(ruler: Mapping[str, Any]) -> str:
    """Tasks x lengths exact match (%), with RULER's per-length average as the last row."""
    lengths = list(ruler["per_task"])
    tasks = list(next(iter(ruler["per_task"].values())))
    rows = [[t] + [pct(ruler["per_task"][n][t]) for n in lengths] for t in tasks]
    rows.append(["**average**"] + [f"**{pct(ruler['average'][n])}**" for n in lengths])
    return table(["task"] + lengths, rows)


def perplexity_table(ppl: Mapping[str, Any]) -> str:
    buckets = ppl["buckets"]
    headers = ["positions"] + [f"{b['start']}-{b['end'] - 1}" for b in buckets]
    return table(headers, [["loss"] + [fmt(b["loss"]) for b in buckets],
                           ["ppl"] + [fmt(b["ppl"], 2) for b in buckets]])


def fidelity_table(fid: Mapping[str, Any]) -> str:
    keys = list(FIDELITY_HEADERS)
    rows = [[layer] + [fmt(m.get(k)) for k in keys] for layer, m in fid["layers"].items()]
    rows.append(["**mean**"] + [fmt(fid["mean"].get(k)) for k in keys])
    return table(["layer"] + [FIDELITY_HEADERS[k] for k in keys], rows)


def eval_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of one ``eval.py`` run."""
    m, e = results["model"], results["eval"]
    out = [f"# Evaluation: {m['label']}", "",
           f"- checkpoint: `{m['ckpt_path']}` (step {m['global_step']}, {m['attention']}, "
           f"trained at {m['train_seq_len']} tokens)",
           f"- overrides: {', '.join(f'{k}={v}' for k, v in e['overrides'].items()) or 'none'}",
           f"- device: {e['device']}, precision: {e['precision']}, impl: {e['impl']}, eval seed: {e['seed']}", "",
           f"## RULER-style exact match (%), {results['ruler']['num_samples']} samples per task and length "
           f"(sample seed {results['ruler']['seed']}), teacher-forced", "", ruler_table(results["ruler"]), ""]
    gen = results.get("ruler_generate")
    if gen:
        out += [f"## RULER-style exact match (%), generated: every answer decoded greedily with the KV cache "
                f"(no teacher forcing), {gen['num_samples']} samples per task and length", "", ruler_table(gen), ""]
    ppl = results.get("perplexity")
    if ppl:
        out += [f"## Next-token loss and perplexity by position ({ppl['num_samples']} held-out sequences of "
                f"{ppl['length']} tokens, sample seed {ppl['seed']}; overall ppl {fmt(ppl['ppl'], 2)})", "",
                perplexity_table(ppl), ""]
    fid = results.get("fidelity")
    if fid and fid.get("layers"):
        out += [f"## Selection fidelity per SPLA layer ({fid['num_samples']} held-out sequences of "
                f"{fid['length']} tokens)", "",
                "recall: of the oracle's free top-k picks; mass share: exact attention mass in the selected "
                "blocks; errors relative to dense attention with the same q, k, v; residual err = "
                "||o_spla - o_dense|| / ||o_sparse - o_dense|| (< 1: the residual moves the output toward dense). "
                "See spla_lit/eval/fidelity.py.", "", fidelity_table(fid), ""]
    elif fid:
        out += ["## Selection fidelity", "", f"skipped: {fid.get('skipped')}", ""]
    return "\n".join(out)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a logged message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the plot (pip install -e '.[plot]')")
        return None
    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt  # loaded already: the figure came from it

    plt.close(fig)
    return path


def plot_accuracy(series: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "",
                  bands: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> Path | None:
    """Accuracy (%) vs context length, one line per model: ``series[label][length] = accuracy in [0, 1]``;
    ``bands[label][length] = (low, high)`` shades an interval around a line (where every point has one).

    Returns the PNG path, or None (with a logged message) when matplotlib is not installed.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in series.items():
        xs = sorted(int(n) for n in points)
        line, = ax.plot(xs, [100 * points[str(n)] for n in xs], marker="o", label=label)
        band = (bands or {}).get(label) or {}
        if xs and all(str(n) in band for n in xs):
            ax.fill_between(xs, [100 * band[str(n)][0] for n in xs], [100 * band[str(n)][1] for n in xs],
                            color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    all_x = sorted({int(n) for points in series.values() for n in points})
    ax.set_xticks(all_x, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in all_x])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact match, mean over tasks (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
