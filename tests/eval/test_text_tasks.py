"""The RULER-style suite in text form (checkpoints trained on text): samples of exactly the asked length whose
answers follow from their text, held-out haystack, teacher-forced and generated scoring in agreement, and eval.py
on a text checkpoint (perplexity by position on held-out text)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from hydra_utils import TINY, make_cfg
from omegaconf import OmegaConf
from torch import nn

from spla_lit.config import ConfigError
from spla_lit.eval.text_tasks import (
    TEXT_TASKS,
    HeldoutWindows,
    TextTaskDataset,
    TextTasks,
    greedy_generate,
    heldout_stream,
    load_tokenizer_encode,
    run_text_suite,
    shortest_text_length,
    text_exact_match,
    text_task_misfits,
)

tokenizers = pytest.importorskip("tokenizers", reason='the hf extra: pip install "spla[hf]"')
LENGTH = 900  # the test tokenizer has 320 ids (many tokens per word): every task fits


@pytest.fixture(scope="module")
def data_cfg(prepared):
    return OmegaConf.create({"path": str(prepared), "seq_len": 64, "val_fraction": 0.01, "split_seed": 0})


@pytest.fixture(scope="module")
def suite(tokenizer_dir, data_cfg):
    return TextTasks(load_tokenizer_encode(str(tokenizer_dir)), heldout_stream(data_cfg))


@pytest.fixture(scope="module")
def decode(tokenizer_dir):
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return lambda ids: tok.decode(list(ids))


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_samples_have_the_length_and_answers_that_follow_from_the_text(suite, decode, task):
    for i in range(3):
        prompt, answer = suite.sample(task, LENGTH, np.random.default_rng([7, i]))
        again = suite.sample(task, LENGTH, np.random.default_rng([7, i]))
        assert len(prompt) + len(answer) == LENGTH + 1 and (prompt, answer) == again  # exact, deterministic
        text, said = decode(prompt), decode(answer).strip()
        if task.startswith("niah"):
            asked = re.search(r"for (.*) mentioned in the text above\? ", text).group(1).split(" and ")
            needles = re.findall(r"One of the special magic numbers for (\w+) is: (\d+)\.", text)
            assert said == ", ".join(v for key in asked for k, v in needles if k == key)
            assert len(needles) == {"niah_single": 1, "niah_multivalue": 4}.get(task, 4)
        elif task == "variable_tracking":
            value = re.search(r"assigned the value (\d+) in the text", text).group(1)
            holders = {re.search(rf"VAR (\w+) = {value}\.", text).group(1)}
            for a, b in [(a, b) for b, a in re.findall(r"VAR (\w+) = VAR (\w+)\.", text)]:
                if a in holders:
                    holders.add(b)
            assert set(said.split()) == holders and len(holders) == 5
        else:
            body = text.split("appears in it.\n", 1)[1].split("\nQuestion:", 1)[0].split()
            counts = Counter(body)
            k = 5 if task == "common_words" else 3
            top = sorted(counts, key=lambda w: (-counts[w], body.index(w)))[:k]
            assert said.split() == top and counts[top[-1]] > 1


def test_too_short_a_length_is_named(suite):
    with pytest.raises(ConfigError, match=r"^lengths: 40 tokens are too few for task 'niah_multikey'"):
        suite.sample("niah_multikey", 40, np.random.default_rng(0))


class _Stream:
    """A held-out stream of ``num_tokens`` zeros."""

    num_tokens = 10_000

    def read(self, start, stop):
        return np.zeros(stop - start, dtype=np.int64)


def _uneven_encode(text):
    """A word of a to m (and its leading space) is one token, one of n to z four, any other character one: the top
    words of a list may be much longer in tokens than the list's average."""
    return [1] * sum(4 if piece.strip() >= "n" else 1 for piece in re.findall(r" ?[a-z]+|.", text, re.S))


@pytest.mark.parametrize("task", ["common_words", "frequent_words"])
def test_word_lists_fit_whatever_their_words(task):
    # frequent_words' first word is half the items: one longer in tokens than the average failed the sample
    # ("too few tokens") at any length, 32K included
    suite = TextTasks(_uneven_encode, _Stream())
    for length in (1000, 4096):
        for i in range(12):
            prompt, answer = suite.sample(task, length, np.random.default_rng([11, i]))
            assert len(prompt) + len(answer) == length + 1


def test_every_task_and_length_is_checked_before_anything_is_evaluated(suite, data_cfg, tokenizer_dir):
    need = {t: shortest_text_length(suite, t) for t in TEXT_TASKS}
    assert all(n is not None and 16 < n < LENGTH for n in need.values())
    short = need["variable_tracking"] - 1  # niah_single fits, variable_tracking does not
    assert need["niah_single"] <= short
    assert text_task_misfits(suite, TEXT_TASKS, [LENGTH], seed=5) == {}
    misfits = text_task_misfits(suite, ["niah_single", "variable_tracking"], [LENGTH, short], seed=5)
    assert list(misfits) == ["variable_tracking"] and misfits["variable_tracking"][0] == [short]
    calls = []

    class Net(nn.Module):
        def forward(self, ids):
            calls.append(ids.shape)
            raise AssertionError("evaluated before the check")

    with pytest.raises(ConfigError, match=rf"^lengths: {short} tokens are too few for task 'variable_tracking' "
                                          r"\(it needs about \d+\).*tasks$"):
        run_text_suite(Net(), ["niah_single", "variable_tracking"], [LENGTH, short], 2, seed=5, data_cfg=data_cfg,
                       tokenizer=str(tokenizer_dir), batch_size=2, max_batch_tokens=None,
                       device=torch.device("cpu"))
    assert calls == []


def test_haystack_and_perplexity_windows_are_held_out_text(suite, data_cfg, prepared):
    from spla_lit.data import TokenDataModule

    module = TokenDataModule(str(prepared), seq_len=64, batch_size=1, val_fraction=0.01, split_seed=0)
    held = set(module.val_dataset.documents.tolist())
    assert held and held.isdisjoint(module.train_dataset.documents.tolist())
    assert suite.stream.documents.tolist() == sorted(held)
    windows = HeldoutWindows(data_cfg, 32, 2)
    first = module.val_dataset.read(0, 33)
    assert windows[0]["input_ids"].tolist() == first[:32].tolist()
    assert windows[0]["labels"].tolist() == first[1:].tolist()
    with pytest.raises(ConfigError, match=r"^perplexity.num_samples: the held-out text .* fewer than 100000"):
        HeldoutWindows(data_cfg, 32, 100_000)


class Oracle(nn.Module):
    """Logits that predict the continuation of the known sequence a row is a prefix of, except at the positions
    ``wrong[j]`` of sequence ``j`` (there, the next id)."""

    def __init__(self, sequences: list[torch.Tensor], vocab: int, wrong: dict[int, set[int]] | None = None) -> None:
        super().__init__()
        self.sequences, self.vocab, self.wrong = sequences, vocab, wrong or {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids):
            j = next((j for j, s in enumerate(self.sequences) if torch.equal(s[:len(row)], row)), None)
            if j is None:  # a continuation off every known sequence (after a wrong token): predict 0
                continue
            seq, wrong = self.sequences[j], self.wrong.get(j, set())
            for i in range(len(row)):
                target = int(seq[i + 1]) if i + 1 < len(seq) else 0
                out[b, i, (target + (i + 1 in wrong)) % self.vocab] = 1.0
        return out


def test_teacher_forced_and_generated_scores_agree(suite):
    dataset = TextTaskDataset(suite, "niah_multivalue", LENGTH, 3, seed=11)
    items = [dataset[i] for i in range(3)]
    sequences = [torch.cat([it["input_ids"], it["labels"][-1:]]) for it in items]
    starts = [int(it["prompt_len"]) for it in items]
    # right everywhere; wrong on an answer token of sample 1; wrong on a prompt token of sample 0 (not scored)
    for wrong, expected in [({}, 3), ({1: {starts[1] + 2}}, 2), ({0: {starts[0] - 3}}, 3)]:
        net = Oracle(sequences, 320, wrong)
        scores = [text_exact_match(net, dataset, batch_size=2, device=torch.device("cpu"), decode=d)
                  for d in ("teacher_forced", "generate")]
        assert scores == [(expected, 3)] * 2, (wrong, scores)
    with pytest.raises(ConfigError, match="^decode: unknown value 'beam'"):
        text_exact_match(net, dataset, batch_size=2, device=torch.device("cpu"), decode="beam")


def test_greedy_generate_continues_with_the_argmax():
    net = Oracle([torch.arange(10)], 16)
    assert greedy_generate(net, torch.arange(4)[None], 5).tolist() == [[4, 5, 6, 7, 8]]


@pytest.mark.slow
def test_eval_on_a_text_checkpoint_runs_the_text_suite(tmp_path, prepared):
    from spla_lit.eval.runner import evaluate
    from spla_lit.eval.sweep import eval_config
    from spla_lit.training.run import train

    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("data.")]
    train(make_cfg([*tiny, "data=tokens", f"data.path={prepared}", "data.seq_len=64", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "sparse.block_size=16", "sparse.topk=2"], run, tiny=False))
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the run keeps its tokenizer
    common = [f"ckpt_path={run}", "lengths=[900]", "num_samples=2", "device=cpu", "plot=false"]
    r = evaluate(eval_config([*common, f"output_dir={tmp_path / 'tf'}", "tasks=[niah_single,frequent_words]",
                              "perplexity.num_samples=2", "perplexity.length=32", "perplexity.num_buckets=4",
                              "fidelity.num_samples=1", "fidelity.length=64"]))
    assert r["ruler"]["form"] == "text" and set(r["ruler"]["per_task"]["900"]) == {"niah_single", "frequent_words"}
    assert [(b["start"], b["end"]) for b in r["perplexity"]["buckets"]] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert set(map(str, r["fidelity"]["layers"])) == {"0", "1"}
    generated = evaluate(eval_config([*common, f"output_dir={tmp_path / 'gen'}", "tasks=[niah_single]",
                                      "decode=generate", "perplexity.enabled=false", "fidelity.enabled=false"]))
    assert generated["ruler"]["decode"] == "teacher_forced" and generated["ruler_generate"]["decode"] == "generate"
    assert generated["ruler_generate"]["per_task"]["900"]["niah_single"] == r["ruler"]["per_task"]["900"]["niah_single"]
    with pytest.raises(ConfigError, match="^tasks: \\['mqar'\\] have no text form"):
        evaluate(eval_config([*common, f"output_dir={tmp_path / 'x'}", "tasks=[mqar]"]))
