"""The RULER-style suite in text form, for models trained on real text with a tokenizer (``data=tokens``).

Each task is a text template, as in RULER's niah, variable tracking and word-extraction tasks, tokenized with the
run's tokenizer; the haystack is held-out text: the validation documents of the checkpoint's own token data
(``data.path``, ``data.val_fraction``, ``data.split_seed``), never trained on. Pieces are tokenized one by one and
concatenated (so every needle is exactly the tokens of its sentence) into exactly ``length + 1`` tokens: the
prompt, then the answer. Formats (``<filler>``: held-out tokens from a random offset)::

    niah_*             intro, <filler> with "One of the special magic numbers for {key} is: {value}." sentences,
                       question on 1 (single, multikey, multivalue) or 4 (multiquery) keys  ->  " v1, v2, ..."
    variable_tracking  intro, <filler> with "VAR {X} = {value}." / "VAR {Y} = VAR {X}." chains, question on a
                       value  ->  " X Y Z ..." (every name holding it, in chain order)
    common_words       intro, a list of random words, 5 of them 3x as frequent  ->  the 5 most common
    frequent_words     intro, a list of coded words with Zipf frequencies  ->  the 3 most frequent

(word lists: ranked by count, then first appearance). Scoring: ``decode=teacher_forced`` marks a sample right when
the argmax at every answer position is the answer token (equal to greedy decoding's exact match, since the
answer is the end of the sequence); ``decode=generate`` decodes greedily from the prompt with the KV cache
(:func:`greedy_generate`, i.e. ``DecoderLM.generate``) and compares the tokens. Samples of ``eval_seed`` come
from ``numpy.random.default_rng([ruler_seed(eval_seed), task, length, i])``.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError

TEXT_TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                               "variable_tracking", "common_words", "frequent_words")
DECODES: tuple[str, ...] = ("teacher_forced", "generate")
# (keys, values per key, keys asked) of each niah variant (RULER's defaults)
NIAH = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
        "niah_multiquery": (4, 1, 4)}
NUM_HOPS, NUM_CHAINS = 4, 2
NUM_COMMON, COMMON_RATIO, NUM_FREQUENT, ZIPF_ALPHA = 5, 3, 3, 2.0
# keys of niah: plain English words
KEY_WORDS = ("apple", "river", "candle", "garden", "window", "rocket", "violin", "island", "pencil", "forest",
             "mirror", "harbor", "ladder", "saddle", "tunnel", "basket", "anchor", "meadow", "lantern", "marble",
             "falcon", "copper", "velvet", "orchid", "glacier", "compass", "quarry", "thimble", "walnut", "blanket")


def _words(rng: np.random.Generator, n: int, letters: str, length: tuple[int, int]) -> list[str]:
    """``n`` distinct random words of ``letters``, ``length`` = (shortest, longest)."""
    out: dict[str, None] = {}
    while len(out) < n:
        size = int(rng.integers(length[0], length[1] + 1))
        out["".join(rng.choice(list(letters), size=size))] = None
    return list(out)


class TextTasks:
    """Builds the text samples of one tokenizer over one held-out token stream.

    ``encode(text) -> ids`` tokenizes (no special tokens); ``filler(rng, n)``: ``n`` held-out tokens from a random
    offset (wrapping around a stream shorter than ``n``). :meth:`sample` builds one (prompt, answer) pair.
    """

    def __init__(self, encode: Callable[[str], list[int]], filler_stream: Any) -> None:
        self.encode, self.stream = encode, filler_stream

    def filler(self, rng: np.random.Generator, n: int) -> list[int]:
        total = self.stream.num_tokens
        start = int(rng.integers(0, total))
        out: list[int] = []
        while len(out) < n:
            stop = min(total, start + n - len(out))
            out += self.stream.read(start, stop).tolist()
            start = 0
        return out

    def _with_inserts(self, rng: np.random.Generator, intro: str, inserts: list[list[int]], question: str,
                      budget: int, task: str, length: int) -> list[int]:
        """intro, filler with ``inserts`` (in order) at random points, question: ``budget`` tokens."""
        head, tail = self.encode(intro), self.encode(question)
        n_fill = budget - len(head) - len(tail) - sum(map(len, inserts))
        if n_fill < 0:
            raise ConfigError(f"lengths: {length} tokens are too few for task {task!r} (this sample needs "
                              f"{length - n_fill})")
        fill = self.filler(rng, n_fill)
        points = np.sort(rng.integers(0, n_fill + 1, size=len(inserts))).tolist()
        body, last = [], 0
        for point, ids in zip(points, inserts):
            body += fill[last:point] + ids
            last = point
        return head + body + fill[last:] + tail

    def niah(self, rng: np.random.Generator, task: str, length: int) -> tuple[list[int], list[int]]:
        num_keys, num_values, num_asked = NIAH[task]
        keys = [str(k) for k in rng.choice(KEY_WORDS, size=num_keys, replace=False)]
        values = [str(v) for v in rng.choice(9_000_000, size=num_keys * num_values, replace=False) + 1_000_000]
        needles = [(k, values[i * num_values + j]) for i, k in enumerate(keys) for j in range(num_values)]
        needles = [needles[i] for i in rng.permutation(len(needles))]
        asked = keys[:num_asked]
        answer = ", ".join(v for k in asked for key, v in needles if key == k)
        plural = num_values > 1 or num_asked > 1
        what = "the special magic numbers" if plural else "the special magic number"
        question = (f"\nWhat {'are all' if plural else 'is'} {what} for {' and '.join(asked)} mentioned in the text "
                    f"above? {what[0].upper() + what[1:]} for {' and '.join(asked)} mentioned in the text above "
                    f"{'are' if plural else 'is'}:")
        answer_ids = self.encode(" " + answer)
        inserts = [self.encode(f"\nOne of the special magic numbers for {k} is: {v}.\n") for k, v in needles]
        intro = ("Some special magic numbers are hidden in the text below. Remember them: you will be asked "
                 "about them afterwards.\n")
        return self._with_inserts(rng, intro, inserts, question, length + 1 - len(answer_ids), task,
                                  length), answer_ids

    def variable_tracking(self, rng: np.random.Generator, task: str, length: int) -> tuple[list[int], list[int]]:
        names = _words(rng, NUM_CHAINS * (NUM_HOPS + 1), string.ascii_uppercase, (5, 5))
        values = [str(v) for v in rng.choice(90_000, size=NUM_CHAINS, replace=False) + 10_000]
        chains = [names[c * (NUM_HOPS + 1):(c + 1) * (NUM_HOPS + 1)] for c in range(NUM_CHAINS)]
        statements = [[f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
                      for chain, value in zip(chains, values)]
        # interleave the chains, each in its own order
        order = rng.permutation([c for c in range(NUM_CHAINS) for _ in range(NUM_HOPS + 1)])
        position = [0] * NUM_CHAINS
        inserts = []
        for c in order.tolist():
            inserts.append(self.encode(f"\n{statements[c][position[c]]}\n"))
            position[c] += 1
        question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                    f"Answer: According to the chains of variable assignment in the text above, {NUM_HOPS + 1} "
                    f"variables are assigned the value {values[0]}, they are:")
        answer_ids = self.encode(" " + " ".join(chains[0]))
        intro = "Memorize and track the chains of variable assignment hidden in the text below.\n"
        return self._with_inserts(rng, intro, inserts, question, length + 1 - len(answer_ids), task,
                                  length), answer_ids

    def word_list(self, rng: np.random.Generator, task: str, length: int) -> tuple[list[int], list[int]]:
        """common_words: ``NUM_COMMON`` words ``COMMON_RATIO`` times each among words that appear once;
        frequent_words: coded words counted ``n / (2 r^2)`` by rank ``r`` (Zipf, alpha 2), then words that appear
        once. The list fills the length; the answer is the top words by count, then by first appearance."""
        common = task == "common_words"
        k = NUM_COMMON if common else NUM_FREQUENT
        intro = self.encode("Below is a list of words. Track how often each word appears in it.\n" if common else
                            "Below is a coded text. Track how often each coded word appears in it.\n")
        question = self.encode(f"\nQuestion: What are the {k} most common words in the list above? Answer: the "
                               f"{k} words that appear most often in the list are:" if common else
                               f"\nQuestion: What are the {k} most frequently appearing coded words in the text "
                               f"above? Answer: the {k} most frequent coded words are:")
        letters, sizes = string.ascii_lowercase, ((3, 7) if common else (4, 6))
        probe = [len(self.encode(" " + w)) for w in _words(rng, 32, letters, sizes)]
        longest = max(probe) + 2
        budget = length + 1 - len(intro) - len(question) - (1 + longest * k)  # the answer's room, at most
        n_items = max(0, budget) * len(probe) // sum(probe)

        def counts(n: int) -> list[int]:  # how often each top word appears among ``n`` items
            if common:
                return [COMMON_RATIO] * k
            return [n // (2 * r * r) for r in range(1, n + 1) if n // (2 * r * r) >= 2]

        head = counts(n_items)
        if n_items < sum(head) + 2 * k or len(head) < k:
            raise ConfigError(f"lengths: {length} tokens are too few for task {task!r}")
        words = _words(rng, len(head) + n_items, letters, sizes)
        ids = {w: self.encode(" " + w) for w in words[:len(head)]}

        def tokens(head: list[int]) -> int:
            return sum(count * len(ids[w]) for w, count in zip(words, head))

        used = tokens(head)
        # top words longer in tokens than the probe's average: the Zipf counts of fewer items (frequent_words;
        # the first word alone is half the items), so that the sample fits whatever its words
        n = n_items
        while used > budget and not common and len(head) >= k:
            n = min(n - 1, n * budget // used)
            head = counts(n)
            used = tokens(head)
        if used > budget or len(head) < k:
            raise ConfigError(f"lengths: {length} tokens are too few for task {task!r}")
        items = [w for w, count in zip(words, head) for _ in range(count)]
        for w in words[len(head):]:  # words that appear once, while they fit
            ids[w] = self.encode(" " + w)
            if used + len(ids[w]) > budget:
                break
            items.append(w)
            used += len(ids[w])
        items = [items[i] for i in rng.permutation(len(items))]
        counts = Counter(items)
        first = {w: i for i, w in reversed(list(enumerate(items)))}
        top = sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]
        answer_ids = self.encode(" " + " ".join(top))
        body = [t for w in items for t in ids[w]]
        slack = length + 1 - len(answer_ids) - len(intro) - len(question) - len(body)
        # the slack (what the answer's room did not take, plus less than a word) is held-out text before the intro
        return self.filler(rng, slack) + intro + body + question, answer_ids

    def sample(self, task: str, length: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of ``task``, ``length + 1`` tokens together."""
        if task in NIAH:
            prompt, answer = self.niah(rng, task, length)
        elif task == "variable_tracking":
            prompt, answer = self.variable_tracking(rng, task, length)
        elif task in ("common_words", "frequent_words"):
            prompt, answer = self.word_list(rng, task, length)
        else:
            raise ConfigError(f"tasks: unknown text task {task!r}; known: {', '.join(TEXT_TASKS)}")
        assert len(prompt) + len(answer) == length + 1, (task, len(prompt), len(answer), length)
        return prompt, answer


def sample_seed(seed: int, task: str, length: int, index: int) -> list[int]:
    """The ``default_rng`` seed of sample ``index`` of ``task`` at ``length`` in the eval seed stream ``seed``."""
    return [seed, TEXT_TASKS.index(task), length, int(index)]


class TextTaskDataset(Dataset):
    """``num_samples`` samples of one text task at model input length ``length``; item ``i`` drawn from
    ``default_rng(sample_seed(seed, task, length, i))``. Items as the synthetic suite's: ``input_ids`` /
    ``labels`` long [length], ``answer_mask`` bool [length]; and ``prompt_len``, the answer's first position."""

    def __init__(self, tasks: TextTasks, task: str, length: int, num_samples: int, seed: int) -> None:
        if task not in TEXT_TASKS:
            raise ConfigError(f"tasks: unknown text task {task!r}; known: {', '.join(TEXT_TASKS)}")
        self.tasks, self.task, self.seq_len, self.num_samples, self.seed = tasks, task, length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(sample_seed(self.seed, self.task, self.seq_len, index))
        prompt, answer = self.tasks.sample(self.task, self.seq_len, rng)
        tokens = torch.tensor(prompt + answer, dtype=torch.long)
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        mask[len(prompt):] = True
        return {"input_ids": tokens[:-1], "labels": tokens[1:], "answer_mask": mask[1:],
                "prompt_len": torch.tensor(len(prompt))}


def _fits(suite: TextTasks, task: str, length: int, seeds: Iterable[list[int]]) -> bool:
    """Whether the samples of ``seeds`` (``default_rng`` seeds) of ``task`` fit in ``length`` tokens."""
    try:
        for seed in seeds:
            suite.sample(task, length, np.random.default_rng(seed))
    except ConfigError as e:
        if not str(e).startswith("lengths:"):
            raise
        return False
    return True


def shortest_text_length(suite: TextTasks, task: str, probes: int = 4, longest: int = 1 << 20) -> int | None:
    """About the smallest length (tokens) that ``task``'s samples fit in: the smallest that ``probes`` fixed samples
    fit (doubling, then bisection; samples vary, so a length just above it may still fail for some); None when
    even ``longest`` does not."""
    seeds = [[TEXT_TASKS.index(task), i] for i in range(probes)]
    high = 16
    while not _fits(suite, task, high, seeds):
        if high >= longest:
            return None
        high *= 2
    low = high // 2  # fails (or is below the first try)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _fits(suite, task, mid, seeds) else (mid, high)
    return high


def text_task_misfits(suite: TextTasks, tasks: Iterable[str], lengths: Iterable[int], seed: int,
                      probes: int = 2) -> dict[str, tuple[list[int], int | None]]:
    """The tasks whose first ``probes`` samples (of eval seed stream ``seed``, exactly as :class:`TextTaskDataset`
    draws them) do not fit some of ``lengths``: ``{task: (the lengths too short, about the shortest that fits
    (:func:`shortest_text_length`))}``; empty when every (task, length) pair fits. Unknown tasks raise."""
    tasks, lengths = list(tasks), list(lengths)
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if unknown:
        raise ConfigError(f"tasks: {unknown} have no text form; text checkpoints run {', '.join(TEXT_TASKS)}")
    out = {}
    for task in tasks:
        short = [n for n in lengths
                 if not _fits(suite, task, n, [sample_seed(seed, task, n, i) for i in range(probes)])]
        if short:
            out[task] = (short, shortest_text_length(suite, task))
    return out


def misfit_message(misfits: dict[str, tuple[list[int], int | None]]) -> str:
    """One clause per task of :func:`text_task_misfits`' result."""
    return "; ".join(f"{', '.join(map(str, short))} tokens are too few for task {task!r} (it needs about "
                     f"{'more than 1M' if need is None else need})" for task, (short, need) in misfits.items())


def check_text_tasks(suite: TextTasks, tasks: Iterable[str], lengths: Iterable[int], seed: int,
                     probes: int = 2) -> None:
    """Fail fast, before anything is evaluated, naming ``lengths`` and ``tasks``, when a task's samples do not fit
    a length (:func:`text_task_misfits`)."""
    misfits = text_task_misfits(suite, tasks, lengths, seed, probes)
    if misfits:
        raise ConfigError(f"lengths: {misfit_message(misfits)}; raise lengths or drop the task from tasks")


def text_suite(data_cfg: Any, tokenizer: str | None) -> TextTasks:
    """The text suite of a run: its tokenizer folder and the held-out documents of its token data."""
    return TextTasks(load_tokenizer_encode(tokenizer), heldout_stream(data_cfg))


@torch.inference_mode()
def greedy_generate(net: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *,
                    prompt_lengths: list[int] | None = None) -> torch.Tensor:
    """Greedy continuation ``[B, max_new_tokens]`` of ``prompt`` [B, P], row b's prompt being its first
    ``prompt_lengths[b]`` tokens (None: all P): :func:`spla_lit.inference.generate` (``DecoderLM.generate``: ragged
    prefill, then one token per row through the KV cache). A module without a cache (``new_cache``: a test stub)
    gets the full-prefix loop instead, one row at a time (exact, quadratic)."""
    if hasattr(net, "new_cache"):
        from ..inference import generate

        return generate(net, prompt, max_new_tokens, prompt_lengths=prompt_lengths, temperature=0.0)
    rows = []
    for b, n in enumerate(prompt_lengths or [prompt.shape[1]] * prompt.shape[0]):
        ids = prompt[b:b + 1, :n]
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, net(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        rows.append(ids[0, n:])
    return torch.stack(rows)


@torch.inference_mode()
def text_exact_match(net: nn.Module, dataset: TextTaskDataset, *, batch_size: int, device: torch.device,
                     decode: str = "teacher_forced", autocast: Callable[[], Any] | None = None) -> tuple[int, int]:
    """(samples right, samples) of ``dataset`` by ``decode`` (see the module docstring)."""
    import contextlib

    if decode not in DECODES:
        raise ConfigError(f"decode: unknown value {decode!r}; expected one of {', '.join(DECODES)}")
    context = autocast or contextlib.nullcontext
    right = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        ids, labels, answer = (batch[k].to(device) for k in ("input_ids", "labels", "answer_mask"))
        if decode == "generate":  # ragged prompts (each row up to its answer) in one batch
            starts = batch["prompt_len"].tolist()
            sizes = answer.sum(-1).tolist()
            with context():
                out = greedy_generate(net, ids, max(sizes), prompt_lengths=starts)
            right += sum(int(torch.equal(out[b, :n], labels[b][answer[b]])) for b, n in enumerate(sizes))
            continue
        with context():
            logits = net(ids)
        right += int((((logits.argmax(-1) == labels) | ~answer).all(-1) & answer.any(-1)).sum())
    return right, len(dataset)


def load_tokenizer_encode(folder: str | None) -> Callable[[str], list[int]]:
    """``encode(text) -> ids`` of the run's tokenizer folder (``tokenizer`` in the checkpoint's config)."""
    file = Path(folder) / "tokenizer.json" if folder else None
    if file is None or not file.is_file():
        raise ConfigError(f"ckpt_path: the checkpoint's run names no readable tokenizer ({file}); the text suite "
                          "needs the run's tokenizer.json (train.py copies it into the run folder)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def heldout_stream(data_cfg: Any) -> Any:
    """The held-out documents of the checkpoint's token data as one stream (``read(start, stop)``,
    ``num_tokens``, ``shards``, ``documents``): the training run's own split (``data.path``, ``data.seq_len``,
    ``data.val_fraction``, ``data.split_seed``)."""
    from ..data.tokens import TokenDataModule

    module = TokenDataModule(data_cfg.path, seq_len=data_cfg.seq_len, batch_size=1,
                             val_fraction=data_cfg.val_fraction, split_seed=data_cfg.split_seed)
    return module.val_dataset


class HeldoutWindows(Dataset):
    """The first ``num_samples`` windows of ``seq_len`` tokens of the held-out text (perplexity, fidelity); items
    ``input_ids`` / ``labels`` long [seq_len]. ``seed`` is None (nothing random)."""

    def __init__(self, data_cfg: Any, seq_len: int, num_samples: int, key: str = "perplexity") -> None:
        from ..data.tokens import TokenWindowDataset

        stream = heldout_stream(data_cfg)
        windows = (stream.num_tokens - 1) // seq_len
        if num_samples > windows:
            raise ConfigError(f"{key}.num_samples: the held-out text of {data_cfg.path} holds {windows} windows of "
                              f"{seq_len} tokens, fewer than {num_samples} (lower it, or {key}.length)")
        self.windows = TokenWindowDataset(stream.shards, stream.documents, seq_len)
        self.seq_len, self.num_samples, self.seed = seq_len, num_samples, None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.windows[index]
        return {"input_ids": item["input_ids"], "labels": item["labels"]}


def run_text_suite(net: nn.Module, tasks: Iterable[str], lengths: Iterable[int], num_samples: int, seed: int, *,
                   data_cfg: Any, tokenizer: str | None, batch_size: int, max_batch_tokens: int | None,
                   device: torch.device, decode: str = "teacher_forced", autocast: Callable[[], Any] | None = None,
                   log: Any = None, suite: TextTasks | None = None) -> dict[str, Any]:
    """:func:`spla_lit.eval.ruler.run_suite` for text checkpoints: exact match per (length, task), the per-length
    mean over tasks, ``overall``; plus ``decode``. ``suite``: the run's :func:`text_suite` already checked by
    :func:`check_text_tasks` (None: built and checked here)."""
    tasks, lengths = list(tasks), list(lengths)
    if suite is None:  # a length too short for a task fails now, not after the others ran
        suite = text_suite(data_cfg, tokenizer)
        check_text_tasks(suite, tasks, lengths, seed)
    per_task: dict[str, dict[str, float]] = {}
    for length in lengths:
        rows = batch_size if not max_batch_tokens else max(1, min(batch_size, max_batch_tokens // length))
        scores = {}
        for task in tasks:
            dataset = TextTaskDataset(suite, task, length, num_samples, seed)
            right, total = text_exact_match(net, dataset, batch_size=rows, device=device, decode=decode,
                                            autocast=autocast)
            scores[task] = right / total
            if log is not None:
                log.info("length %6d  %-18s exact match %.3f (%d/%d, %s)", length, task, right / total, right,
                         total, decode)
        per_task[str(length)] = scores
    average = {length: sum(s.values()) / len(s) for length, s in per_task.items()}
    return {"per_task": per_task, "average": average, "overall": sum(average.values()) / len(average),
            "num_samples": num_samples, "seed": seed, "decode": decode, "form": "text"}
