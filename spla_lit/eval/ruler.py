"""The RULER-style synthetic suite: exact match per task and context length, and the evaluation seeds.

Samples come from ``spla_lit.data`` (generated locally, no download). Two ways to score a sample
(``eval.py decode=...``), both exact match over every answer token:

* ``teacher_forced``: the argmax at each answer position, the reference answer tokens before it given.
* ``generate``: real greedy generation with the KV cache (``spla_lit.inference.fill_greedy``): the prompt
  up to the first answer token is prefilled, then every answer token is decoded from the model's own earlier
  answer tokens (multi-token answers, no teacher forcing); the non-answer tokens of the query section
  (markers, separators, further queries) are given, since they are inputs, not answers.

As RULER does, the score of a length is the mean over tasks of the per-task exact-match rate.

Seed streams. Training draws sample ``i`` from ``numpy.random.default_rng([seed, i])`` and validation
from ``[seed + 1_000_003, i]``. Evaluation uses ``[EVAL_SEED_BASE + 2 * eval_seed, i]`` for the RULER
suite and ``[EVAL_SEED_BASE + 2 * eval_seed + 1, i]`` for perplexity and fidelity, where ``eval_seed``
is ``eval.yaml``'s ``seed`` (default 0). The eval streams do not depend on the checkpoint, so every model
of a sweep sees the same samples; :func:`check_disjoint` refuses a training seed that would collide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..data import RULER_TASKS, TASKS, VAL_SEED_OFFSET, eval_dataloader, make_task
from ..data.vocab import Vocab
from ..inference import fill_greedy
from .progress import EvalProgress
from .text_tasks import DECODES

EVAL_SEED_BASE = 2_000_000_011
# The suite of the issue / RULER (MQAR can be added: tasks=[...,mqar]).
DEFAULT_TASKS: tuple[str, ...] = tuple(t for t in RULER_TASKS if t != "mqar")


def ruler_seed(eval_seed: int) -> int:
    """Sample seed of the RULER suite for ``eval_seed``."""
    return EVAL_SEED_BASE + 2 * int(eval_seed)


def heldout_seed(eval_seed: int) -> int:
    """Sample seed of the held-out training-mixture data (perplexity, fidelity) for ``eval_seed``."""
    return EVAL_SEED_BASE + 2 * int(eval_seed) + 1


def check_disjoint(eval_seed: int, train_seed: int) -> None:
    """Raise :class:`ConfigError` if an eval stream is the checkpoint's training or validation stream."""
    used = {int(train_seed): "training", int(train_seed) + VAL_SEED_OFFSET: "validation"}
    for stream in (ruler_seed(eval_seed), heldout_seed(eval_seed)):
        if stream in used:
            raise ConfigError(f"seed: eval seed {eval_seed} gives sample seed {stream}, the checkpoint's "
                              f"{used[stream]} stream; pick another seed")


def check_tasks(tasks: Iterable[str], lengths: Iterable[int], vocab_size: int,
                task_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Fail fast (naming ``tasks`` or ``lengths``) on an unknown task or a length a task does not fit in."""
    tasks, lengths = list(tasks), list(lengths)
    if not tasks:
        raise ConfigError("tasks: empty; give e.g. tasks=[niah_single,variable_tracking]")
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"tasks: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if not lengths:
        raise ConfigError("lengths: empty; give e.g. lengths=[1024,2048]")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"lengths: every length must be an integer >= 1, got {length!r}")
    vocab = Vocab(vocab_size)
    for task in tasks:
        need = make_task(task, vocab, **dict((task_kwargs or {}).get(task) or {})).min_length - 1
        if min(lengths) < need:
            raise ConfigError(f"lengths: {min(lengths)} is too short for task {task!r} (needs >= {need})")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision='bf16'``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def task_exact_match(net: nn.Module, task: str, length: int, num_samples: int, seed: int, *,
                     batch_size: int, device: torch.device, precision: str = "fp32", vocab_size: int = 512,
                     language_seed: int = 0, task_kwargs: Mapping[str, Any] | None = None,
                     decode: str = "teacher_forced", progress: Callable[[int], None] | None = None
                     ) -> tuple[int, int]:
    """(samples right, samples) of ``num_samples`` samples of ``task`` at model input length ``length``,
    scored by ``decode`` (``teacher_forced`` | ``generate``, see the module docstring); ``progress(tokens)`` is
    called after each batch."""
    if decode not in DECODES:
        raise ConfigError(f"decode: unknown value {decode!r}; expected one of {', '.join(DECODES)}")
    loader = eval_dataloader(task, length, num_samples, seed, batch_size=batch_size, vocab_size=vocab_size,
                             language_seed=language_seed, task_kwargs=task_kwargs)
    right = total = 0
    for batch in loader:
        ids, labels, answer = (batch[k].to(device) for k in ("input_ids", "labels", "answer_mask"))
        if decode == "generate":
            tokens = torch.cat([ids, labels[:, -1:]], 1)  # the whole sample: tokens[i + 1] == labels[i]
            fill = torch.cat([torch.zeros_like(answer[:, :1]), answer], 1)
            with autocast(device, precision):
                out = fill_greedy(net, tokens, fill)
            ok = ((out == tokens) | ~fill).all(-1) & fill.any(-1)
        else:
            with autocast(device, precision):
                logits = net(ids)
            ok = ((logits.argmax(-1) == labels) | ~answer).all(-1) & answer.any(-1)
        right += int(ok.sum())
        total += ids.shape[0]
        if progress is not None:
            progress(ids.numel())
    return right, total


def run_suite(net: nn.Module, tasks: Iterable[str], lengths: Iterable[int], num_samples: int, eval_seed: int, *,
              batch_size: int, max_batch_tokens: int | None, device: torch.device, precision: str,
              vocab_size: int, language_seed: int, task_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
              log: Any = None, progress: EvalProgress | None = None, decode: str = "teacher_forced"
              ) -> dict[str, Any]:
    """Exact match per (length, task) and the per-length average over tasks (RULER's score), scored by
    ``decode`` (``teacher_forced`` | ``generate``); ``progress`` shows the (task, length) being run and counts
    its tokens.

    Returns ``{"per_task": {length: {task: accuracy}}, "average": {length: accuracy}, "overall": mean of
    the averages, "num_samples": ..., "seed": sample seed, "decode": decode}`` with lengths as strings (JSON keys).
    """
    seed = ruler_seed(eval_seed)
    per_task: dict[str, dict[str, float]] = {}
    for length in lengths:
        rows = batch_size if not max_batch_tokens else max(1, min(batch_size, max_batch_tokens // length))
        scores = {}
        for task in tasks:
            kwargs = dict((task_kwargs or {}).get(task) or {})
            if progress is not None:
                progress.stage(f"{task} @ {length}")
            right, total = task_exact_match(net, task, length, num_samples, seed, batch_size=rows, device=device,
                                            precision=precision, vocab_size=vocab_size,
                                            language_seed=language_seed, task_kwargs=kwargs, decode=decode,
                                            progress=None if progress is None else progress.advance)
            scores[task] = right / total
            if log is not None:
                log.info("length %6d  %-18s %s exact match %.3f (%d/%d)", length, task, decode, right / total, right,
                         total)
        per_task[str(length)] = scores
    average = {length: sum(s.values()) / len(s) for length, s in per_task.items()}
    return {"per_task": per_task, "average": average, "overall": sum(average.values()) / len(average),
            "num_samples": num_samples, "seed": seed, "decode": decode}
