"""Evaluate a checkpoint as configured by ``conf/eval.yaml`` (``eval.py`` is a thin wrapper).

:func:`evaluate` rebuilds the model from the checkpoint, runs the RULER-style suite, the perplexity by
position and the selection fidelity, and writes ``results.json``, ``results.md`` and ``accuracy.png``.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import ConfigError, uses_spla
from ..data import SyntheticTaskDataset
from ..options import IMPLS
from .capture import capture_spla, spla_layers
from .fidelity import SelectionFidelityMetrics
from .loading import LoadedModel, attention_kind, load_model
from .perplexity import PositionBucketLoss, token_losses
from .progress import EvalProgress
from .report import eval_markdown, plot_accuracy, write_json
from .ruler import autocast, check_disjoint, check_tasks, heldout_seed, ruler_seed, run_suite
from .text_tasks import DECODES, HeldoutWindows, check_text_tasks, run_text_suite, text_suite

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA request without CUDA is a :class:`ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device {device!r}; expected auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} was requested but no CUDA device is available; use device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: unsupported device {device!r}; expected auto, cpu or cuda")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision: unknown value {precision!r}; expected auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def model_label(cfg: DictConfig) -> str:
    """Short model name from a run config: ``dense``, ``linear``, ``spla-taylor2-k8``, ``spla-random-k8-norla``,
    ``spla-window-w4``."""
    if not uses_spla(cfg):
        return attention_kind(cfg).removesuffix("Attention").lower() or "model"
    a = cfg.model.attention
    if a.sparse.mode == "window":
        name = f"spla-window-w{a.sparse.local_blocks + a.sparse.sink_blocks}"
    else:
        name = f"spla-{a.scorer.method}-k{a.sparse.topk}"
    return name if a.rla is not None else f"{name}-norla"


def _positive(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be an integer >= 1, got {value!r}")
    return value


def check_eval_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on values that do not depend on the checkpoint."""
    if cfg.impl not in IMPLS:
        raise ConfigError(f"impl: unknown value {cfg.impl!r}; expected one of {', '.join(IMPLS)}")
    for key in ("batch_size", "perplexity.num_samples", "perplexity.num_buckets", "fidelity.num_samples"):
        _positive(cfg, key)
    if cfg.num_samples is not None:
        _positive(cfg, "num_samples")
    for device in ("cpu", "cuda"):
        _positive(cfg, f"sizes.{device}.num_samples")
    if cfg.max_batch_tokens is not None:
        _positive(cfg, "max_batch_tokens")
    if cfg.get("decode", "teacher_forced") not in DECODES:
        raise ConfigError(f"decode: unknown value {cfg.decode!r}; expected one of {', '.join(DECODES)}")
    for key in ("perplexity.length", "fidelity.length"):
        if OmegaConf.select(cfg, key) is not None:
            _positive(cfg, key)


def _plain(node: Any) -> Any:
    """A DictConfig / ListConfig as plain containers; None as an empty dict."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def is_text_run(cfg: DictConfig) -> bool:
    """Whether the checkpoint's run trained on tokenized text (``data=tokens``): the suite is then the text one."""
    return OmegaConf.select(cfg, "data._target_") == "spla_lit.data.TokenDataModule"


def heldout_dataset(loaded: LoadedModel, length: int, num_samples: int, eval_seed: int,
                    key: str = "perplexity") -> SyntheticTaskDataset | HeldoutWindows:
    """Held-out sequences of the checkpoint's training data at ``length``: the mixture's (eval seed stream), or
    for a text run the first windows of its held-out documents."""
    data = loaded.cfg.data
    if is_text_run(loaded.cfg):
        return HeldoutWindows(data, length, num_samples, key)
    return SyntheticTaskDataset(length, num_samples, _plain(data.mixture), heldout_seed(eval_seed),
                                data.vocab_size, data.get("language_seed", 0), _plain(data.get("task_kwargs")))


def suite_sizes(cfg: DictConfig, device: torch.device) -> tuple[list[int], int]:
    """(lengths, num_samples) of the RULER suite: as given, or (null) ``sizes.<cuda|cpu>``'s for the device,
    so that a plain ``python eval.py ckpt_path=...`` takes minutes on a CPU, not an hour."""
    sizes = cfg.sizes["cuda" if device.type == "cuda" else "cpu"]
    lengths = cfg.lengths if cfg.lengths is not None else sizes.lengths
    num_samples = cfg.num_samples if cfg.num_samples is not None else sizes.num_samples
    return list(lengths), num_samples


@torch.inference_mode()
def position_perplexity(net: nn.Module, dataset: SyntheticTaskDataset, num_buckets: int, batch_size: int,
                        device: torch.device, precision: str, progress: EvalProgress | None = None) -> dict[str, Any]:
    """Next-token loss and perplexity per position bucket over ``dataset``."""
    metric = PositionBucketLoss(dataset.seq_len, num_buckets).to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast(device, precision):
            logits = net(ids)
        metric.update(token_losses(logits, labels), labels != -100)
        if progress is not None:
            progress.advance(ids.numel())
    loss = float(metric.loss_sum.sum() / metric.count.sum())
    return {"length": dataset.seq_len, "num_samples": len(dataset), "seed": dataset.seed, "loss": loss,
            "ppl": float(torch.tensor(loss).exp()), "buckets": metric.table()}


@torch.inference_mode()
def selection_fidelity(net: nn.Module, dataset: SyntheticTaskDataset, device: torch.device,
                       precision: str, progress: EvalProgress | None = None) -> dict[str, Any]:
    """Per-layer selection fidelity (:mod:`.fidelity`) over ``dataset``, one sequence at a time."""
    if not spla_layers(net):
        return {"skipped": "the model has no SPLA attention layer"}
    metrics = SelectionFidelityMetrics()
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"][None].to(device)
        with capture_spla(net) as captures, autocast(device, precision):
            net(ids)
        metrics.update(captures)
        if progress is not None:
            progress.advance(ids.numel())
    return {"length": dataset.seq_len, "num_samples": len(dataset), "seed": dataset.seed, **metrics.compute()}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured evaluation and write its outputs to ``cfg.output_dir``; returns the results."""
    check_eval_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"impl: triton needs device=cuda (got {device}), or TRITON_INTERPRET=1 on the CPU")
    precision = resolve_precision(cfg.precision, device)
    loaded = load_model(cfg.ckpt_path, _plain(cfg.get("override")),
                        impl=cfg.impl, device=device)
    tcfg = loaded.cfg
    check_disjoint(cfg.seed, tcfg.seed)
    (lengths, num_samples), tasks = suite_sizes(cfg, device), list(cfg.tasks)
    task_kwargs: dict[str, Any] = _plain(tcfg.data.get("task_kwargs"))
    for task, kwargs in _plain(cfg.task_kwargs).items():
        task_kwargs[task] = {**task_kwargs.get(task, {}), **(kwargs or {})}
    text = is_text_run(tcfg)
    if text:  # every (task, length) pair, before anything is evaluated
        suite = text_suite(tcfg.data, tcfg.get("tokenizer"))
        check_text_tasks(suite, tasks, lengths, ruler_seed(cfg.seed))
    else:
        check_tasks(tasks, lengths, tcfg.data.vocab_size, task_kwargs)
    label = cfg.label or model_label(tcfg)
    n_params = loaded.net.num_parameters() if hasattr(loaded.net, "num_parameters") else None
    log.info("evaluating %s (step %d, %s non-embedding parameters) on %s, %s", label, loaded.global_step,
             n_params, device, precision)
    results: dict[str, Any] = {
        "model": {"label": label, "name": model_label(tcfg), "ckpt_path": loaded.ckpt_path,
                  "global_step": loaded.global_step,
                  "attention": attention_kind(tcfg), "train_seq_len": tcfg.data.seq_len, "train_seed": tcfg.seed,
                  "non_embedding_params": n_params,
                  "attention_config": _plain(tcfg.model.attention)},
        "eval": {"lengths": lengths, "tasks": tasks, "seed": cfg.seed, "device": str(device),
                 "decode": cfg.get("decode", "teacher_forced"),
                 "precision": precision, "impl": cfg.impl, "overrides": loaded.overrides,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    timing: dict[str, float] = {}
    ppl_len, fid_len = cfg.perplexity.length or tcfg.data.seq_len, cfg.fidelity.length or tcfg.data.seq_len
    decodes = 2 if cfg.get("decode", "teacher_forced") == "generate" else 1
    total = (sum(lengths) * len(tasks) * num_samples * decodes
             + (ppl_len * cfg.perplexity.num_samples if cfg.perplexity.enabled else 0)
             + (fid_len * cfg.fidelity.num_samples if cfg.fidelity.enabled and spla_layers(loaded.net) else 0))
    with EvalProgress(total, enabled=cfg.progress).live() as progress:
        # teacher forcing always (results["ruler"]); decode=generate also generates every answer greedily with
        # the KV cache (results["ruler_generate"]), so both are reported
        for key, decode in [("ruler", "teacher_forced"), ("ruler_generate", "generate")][:decodes]:
            t0 = time.perf_counter()
            if text:  # the suite's text form, with the run's tokenizer and held-out text
                results[key] = run_text_suite(
                    loaded.net, tasks, lengths, num_samples, ruler_seed(cfg.seed), data_cfg=tcfg.data,
                    tokenizer=tcfg.get("tokenizer"), batch_size=cfg.batch_size,
                    max_batch_tokens=cfg.max_batch_tokens, device=device, decode=decode,
                    autocast=lambda: autocast(device, precision), log=log, suite=suite)
            else:
                results[key] = run_suite(
                    loaded.net, tasks, lengths, num_samples, cfg.seed, batch_size=cfg.batch_size,
                    max_batch_tokens=cfg.max_batch_tokens, device=device, precision=precision,
                    vocab_size=tcfg.data.vocab_size, language_seed=tcfg.data.get("language_seed", 0),
                    task_kwargs=task_kwargs, log=log, progress=progress, decode=decode)
            timing[key] = time.perf_counter() - t0
        if cfg.perplexity.enabled:
            t0 = time.perf_counter()
            progress.stage(f"perplexity @ {ppl_len}")
            data = heldout_dataset(loaded, ppl_len, cfg.perplexity.num_samples, cfg.seed)
            rows = cfg.batch_size if not cfg.max_batch_tokens else max(1, min(cfg.batch_size,
                                                                             cfg.max_batch_tokens // data.seq_len))
            results["perplexity"] = position_perplexity(loaded.net, data, cfg.perplexity.num_buckets, rows, device,
                                                        precision, progress)
            timing["perplexity"] = time.perf_counter() - t0
        if cfg.fidelity.enabled:
            t0 = time.perf_counter()
            progress.stage(f"fidelity @ {fid_len}")
            data = heldout_dataset(loaded, fid_len, cfg.fidelity.num_samples, cfg.seed, "fidelity")
            results["fidelity"] = selection_fidelity(loaded.net, data, device, precision, progress)
            timing["fidelity"] = time.perf_counter() - t0
    results["timing_s"] = timing
    log.info("evaluated in %.0f s (%s)", sum(timing.values()), ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()))
    write_outputs(results, cfg.output_dir, plot=cfg.plot)
    return results


def write_outputs(results: Mapping[str, Any], output_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (with matplotlib) ``accuracy.png`` in ``output_dir``."""
    out = Path(output_dir)
    paths = {"json": write_json(results, out / "results.json")}
    paths["markdown"] = out / "results.md"
    paths["markdown"].write_text(eval_markdown(results))
    if plot:
        label = results["model"]["label"]
        png = plot_accuracy({label: results["ruler"]["average"]}, out / "accuracy.png",
                            title=f"RULER-style exact match: {label}")
        if png is not None:
            paths["plot"] = png
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    return paths
