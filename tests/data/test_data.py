"""Tests of the embedded synthetic data: vocab, task generators, dataset, sampler and DataModule."""

from __future__ import annotations

import pickle
import time
from collections import Counter

import numpy as np
import pytest
import torch

from spla_lit.data import (
    DEFAULT_MIXTURE,
    NUM_SPECIAL,
    TASKS,
    VAL_SEED_OFFSET,
    OffsetSequentialSampler,
    SyntheticDataModule,
    SyntheticTaskDataset,
    Vocab,
    eval_dataloader,
    filler_language,
    make_task,
)

V = Vocab()
NIAH_VARIANTS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def answer_tokens(sample) -> list[int]:
    return [t for t, a in zip(sample.tokens, sample.answer) if a]


# ------------------------------------------------------------------------------------------ vocab


@pytest.mark.parametrize("size", [64, 512, 1000])
def test_vocab_ranges_partition_the_ids(size):
    v = Vocab(size)
    ranges = [range(NUM_SPECIAL), v.filler_ids, v.key_ids, v.value_ids, v.var_ids]
    assert [i for r in ranges for i in r] == list(range(size))  # disjoint, contiguous, complete
    assert min(len(r) for r in ranges[1:]) >= 9 and len(v.var_ids) >= 10


def test_vocab_rejects_small_size_and_decodes():
    for bad in (63, 0, "512"):
        with pytest.raises(ValueError, match="vocab_size"):
            Vocab(bad)
    ids = [V.BOS, V.KEY, V.key_ids[17], V.key_ids[3], V.VAL, V.value_ids[20], V.filler_ids[12], V.var_ids[5],
           V.EOS]
    assert V.decode(ids) == "<BOS> <KEY> k17 k3 <VAL> v20 w12 x5 <EOS>"
    assert V.decode(torch.tensor([V.QUERY, V.ANS, V.SEP, V.VAR, V.EQ, V.PAD])) == "<QUERY> <ANS> <SEP> <VAR> <EQ> <PAD>"


# ------------------------------------------------------------------------------------------ filler


def test_filler_language_is_a_fixed_sparse_chain():
    lang = filler_language(V, 0)
    off = V.filler_ids.start
    a, b = lang.sample(rng(1), 5000), lang.sample(rng(2), 5000)
    assert len(a) == 5000 and a != b
    for seq in (a, b):
        assert all(t in V.filler_ids for t in seq)
        for x, y in zip(seq, seq[1:]):
            assert y - off in lang.successors[x - off] and x != y
    # learnable like text: each word shows at most `branching` successors
    succ = {}
    for x, y in zip(a + b, (a + b)[1:]):
        succ.setdefault(x, set()).add(y)
    assert max(len(s) for s in succ.values()) <= lang.branching + 1  # +1: the a|b seam
    # fixed by the language seed only: the same object / table for every task, another seed differs
    assert filler_language(V, 0) is lang
    assert filler_language(V, 1).successors != lang.successors
    task = make_task("niah_single", V, language_seed=1)
    s = task.generate(rng(0), 2000)
    lang1 = filler_language(V, 1)
    pairs = [(x, y) for x, y in zip(s.tokens, s.tokens[1:]) if x in V.filler_ids and y in V.filler_ids]
    assert len(pairs) > 1000 and all(y - off in lang1.successors[x - off] for x, y in pairs)


# ------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_layout_at_several_lengths(name):
    task = make_task(name, V)
    for length in (task.min_length, 257, 1000, 4099):
        s = task.generate(rng(length), length)
        assert len(s.tokens) == len(s.answer) == length
        assert s.tokens[0] == V.BOS and s.tokens.count(V.BOS) == 1 and s.tokens[-1] == V.EOS
        assert all(0 <= t < V.vocab_size for t in s.tokens)
        ans = answer_tokens(s)
        assert ans and all(t >= NUM_SPECIAL for t in ans)
        assert s.task == name or (name == "niah" and s.task in NIAH_VARIANTS)
    with pytest.raises(ValueError, match="length"):
        task.generate(rng(0), task.min_length - 1)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_is_deterministic_in_the_rng(name):
    task = make_task(name, V)
    s1, s2, s3 = (task.generate(rng(seed), 300) for seed in (5, 5, 6))
    assert s1 == s2 and s1.tokens != s3.tokens


def parse_niah(tokens: list[int], kl: int, vl: int) -> tuple[dict, int]:
    """Needles (key -> values in text order) of the context and the position of the first QUERY."""
    q = tokens.index(V.QUERY)
    needles: dict[tuple, list[tuple]] = {}
    for i in range(q):
        if tokens[i] == V.KEY:
            assert tokens[i + 1 + kl] == V.VAL
            key = tuple(tokens[i + 1:i + 1 + kl])
            needles.setdefault(key, []).append(tuple(tokens[i + 2 + kl:i + 2 + kl + vl]))
    return needles, q


@pytest.mark.parametrize("name", NIAH_VARIANTS)
def test_niah_answers_are_the_needle_values(name):
    task = make_task(name, V)
    kl, vl = task.key_len, task.value_len
    for seed in range(6):
        s = task.generate(rng(seed), 600)
        tok = s.tokens
        needles, i = parse_niah(tok, kl, vl)
        assert len(needles) == task.num_keys and all(len(v) == task.num_values for v in needles.values())
        asked = []
        while tok[i] == V.QUERY:
            key = tuple(tok[i + 1:i + 1 + kl])
            assert tok[i + 1 + kl] == V.ANS
            i += 2 + kl
            got = []
            for j in range(task.num_values):
                if j:
                    assert tok[i] == V.SEP and not s.answer[i]
                    i += 1
                assert all(s.answer[i:i + vl])
                got.append(tuple(tok[i:i + vl]))
                i += vl
            assert got == needles[key]  # all values of the key, in order of appearance
            asked.append(key)
        assert i == len(tok) - 1 and tok[i] == V.EOS
        assert len(asked) == len(set(asked)) == task.num_queries
        assert sum(s.answer) == task.num_queries * task.num_values * vl


def test_niah_depth_and_mixture_variants():
    kl, vl = 2, 2
    first = make_task("niah_single", V, depth=0.0).generate(rng(0), 500)
    assert first.tokens[1] == V.KEY
    last = make_task("niah_single", V, depth=1.0).generate(rng(0), 500)
    q = last.tokens.index(V.QUERY)
    assert last.tokens[q - (2 + kl + vl)] == V.KEY
    mid = make_task("niah_single", V, depth=0.5).generate(rng(0), 500)
    assert abs(mid.tokens.index(V.KEY) - 250) < 10
    mix = make_task("niah", V)
    assert {mix.generate(rng(s), 300).task for s in range(40)} == set(NIAH_VARIANTS)


def test_mqar_queries_recall_the_pairs():
    task = make_task("mqar", V)
    kl, vl = task.key_len, task.value_len
    for seed in range(6):
        s = task.generate(rng(seed), 700)
        tok, groups, i = s.tokens, [], 0
        while i < len(tok):
            if tok[i] in V.key_ids:
                key, val = tuple(tok[i:i + kl]), tuple(tok[i + kl:i + kl + vl])
                assert all(t in V.key_ids for t in key) and all(t in V.value_ids for t in val)
                assert not any(s.answer[i:i + kl]) and len(set(s.answer[i + kl:i + kl + vl])) == 1
                groups.append((i, key, val, s.answer[i + kl]))
                i += kl + vl
            else:
                assert not s.answer[i]
                i += 1
        pairs = {k: v for _, k, v, q in groups if not q}
        queries = [(p, k, v) for p, k, v, q in groups if q]
        assert len(pairs) == task.num_pairs and len(queries) == task.num_queries
        assert len({k for _, k, _ in queries}) == task.num_queries
        assert all(pairs[k] == v for _, k, v in queries)  # every answer is recoverable from its pair
        assert max(p for p, _, _, q in groups if not q) < min(p for p, _, _ in queries)


def test_copy_repeats_the_span_and_marks_its_tail():
    task = make_task("copy", V, span_len=12)
    span_ids = set(V.key_ids) | set(V.value_ids)
    for seed, length in enumerate((task.min_length, 64, 300, 300, 300)):
        s = task.generate(rng(seed), length)
        body = s.tokens[1:-1]
        spans = [i for i, t in enumerate(body) if t in span_ids]  # span tokens only: filler ids are disjoint
        assert len(spans) == 24
        first, second = spans[:12], spans[12:]
        assert first == list(range(first[0], first[0] + 12)) and second == list(range(second[0], second[0] + 12))
        assert [body[i] for i in first] == [body[i] for i in second]
        ans = [i - 1 for i, a in enumerate(s.answer) if a]  # index into body
        assert ans == second[1:]  # the repeat minus its unpredictable first token
        assert all(t in V.filler_ids for i, t in enumerate(body) if i not in spans)
    # the filler is split at random into the three gaps
    starts = {next(i for i, t in enumerate(task.generate(rng(seed), 300).tokens) if t in span_ids)
              for seed in range(10)}
    assert len(starts) > 3


def test_variable_tracking_answer_follows_the_chains():
    for kwargs in ({}, {"num_chains": 3, "num_hops": 2, "value_len": 1}):
        task = make_task("variable_tracking", V, **kwargs)
        vl = task.value_len
        for seed in range(6):
            s = task.generate(rng(seed), 500)
            tok = s.tokens
            q = tok.index(V.QUERY)
            value_of, order, i = {}, [], 0
            while i < q:
                if tok[i] != V.VAR:
                    i += 1
                    continue
                name, rhs = tok[i + 1], tok[i + 3]
                assert name in V.var_ids and tok[i + 2] == V.EQ and name not in value_of
                if rhs in V.var_ids:
                    value_of[name] = value_of[rhs]  # the chain is assigned in text order
                    i += 4
                else:
                    value_of[name] = tuple(tok[i + 3:i + 3 + vl])
                    i += 3 + vl
                order.append(name)
            assert len(order) == task.num_chains * (task.num_hops + 1)
            assert tok[q + 1 + vl] == V.ANS
            queried = tuple(tok[q + 1:q + 1 + vl])
            expected = [n for n in order if value_of[n] == queried]
            assert answer_tokens(s) == expected and len(expected) == task.num_hops + 1


@pytest.mark.parametrize("name", ["common_words", "frequent_words"])
@pytest.mark.parametrize("size", [64, 512])
def test_word_tasks_answer_the_top_words(name, size):
    vocab = Vocab(size)
    task = make_task(name, vocab)
    k = task.num_answers
    for length in (task.min_length, 300, 3000):
        for seed in range(3):
            s = task.generate(rng(seed), length)
            q = s.tokens.index(V.QUERY)
            words = s.tokens[1:q]
            assert all(t in vocab.filler_ids for t in words) and s.tokens[q + 1] == V.ANS
            counts = Counter(words)
            assert answer_tokens(s) == sorted(counts, key=lambda w: (-counts[w], w))[:k]
            if name == "common_words":  # common words are much more frequent than all the others
                top = set(answer_tokens(s))
                others = [c for w, c in counts.items() if w not in top]
                assert min(counts[w] for w in top) >= 3 * max(others)


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_item_format_and_shift():
    ds = SyntheticTaskDataset(256, 50, DEFAULT_MIXTURE, seed=7)
    assert ds.task_names == sorted(DEFAULT_MIXTURE) and len(ds) == 50
    for i in range(6):
        item = ds[i]
        assert set(item) == {"input_ids", "labels", "answer_mask", "task_id"}
        assert item["input_ids"].shape == item["labels"].shape == item["answer_mask"].shape == (256,)
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["answer_mask"].dtype == torch.bool and item["task_id"].shape == ()
        assert torch.equal(item["input_ids"][1:], item["labels"][:-1]) and item["input_ids"][0] == V.BOS
        task_id, s = ds.sample(i)
        assert item["task_id"] == task_id and s.task.startswith(ds.task_names[task_id])
        assert item["labels"].tolist() == s.tokens[1:] and item["answer_mask"].tolist() == s.answer[1:]
        assert item["answer_mask"].any() and (item["labels"][item["answer_mask"]] >= NUM_SPECIAL).all()


def test_dataset_is_a_pure_function_of_seed_and_index():
    ds1 = SyntheticTaskDataset(128, 100, DEFAULT_MIXTURE, seed=3)
    ds2 = SyntheticTaskDataset(128, 20, DEFAULT_MIXTURE, seed=3)  # length does not matter
    other = SyntheticTaskDataset(128, 100, DEFAULT_MIXTURE, seed=4)
    first = {i: ds1[i] for i in (5, 0, 9)}
    for i in (9, 0, 5):
        assert all(torch.equal(first[i][k], ds2[i][k]) for k in first[i])
        assert not torch.equal(first[i]["input_ids"], other[i]["input_ids"])
    assert not torch.equal(ds1[0]["input_ids"], ds1[1]["input_ids"])
    restored = pickle.loads(pickle.dumps(ds1))  # what DataLoader workers receive
    assert torch.equal(restored[5]["input_ids"], first[5]["input_ids"])


def test_mixture_proportions():
    mixture = {"niah": 1.0, "mqar": 2.0, "common_words": 1.0, "frequent_words": 0.0}
    ds = SyntheticTaskDataset(128, 2000, mixture, seed=0)
    ids = [ds.sample(i)[0] for i in range(1200)]
    frac = np.bincount(ids, minlength=4) / len(ids)
    expected = np.array([0.25, 0.0, 0.5, 0.25])  # sorted: common_words, frequent_words, mqar, niah
    assert ds.task_names == ["common_words", "frequent_words", "mqar", "niah"]
    assert np.abs(frac - expected).max() < 0.05 and frac[1] == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mixture": {"niah": 1, "nope": 1}}, "mixture"),
    ({"mixture": {}}, "mixture"),
    ({"mixture": {"niah": -1.0, "mqar": 2.0}}, "mixture"),
    ({"mixture": {"niah": 0.0}}, "mixture"),
    ({"seq_len": 40}, "seq_len"),
    ({"seq_len": 0}, "seq_len"),
    ({"seed": -1}, "seed"),
    ({"num_samples": -1}, "num_samples"),
    ({"vocab_size": 32}, "vocab_size"),
    ({"task_kwargs": {"mqar": {"num_pairs": 0}}}, "num_pairs"),
    ({"task_kwargs": {"nope": {}}}, "task_kwargs"),
])
def test_dataset_rejects_bad_arguments(kwargs, match):
    args = {"seq_len": 256, "num_samples": 10, "mixture": DEFAULT_MIXTURE, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticTaskDataset(**args)


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("niah_single", {"num_keys": 0}, "num_keys"),
    ("niah_single", {"num_keys": 100, "key_len": 1}, "num_keys"),
    ("niah_multiquery", {"num_queries": 5}, "num_queries"),
    ("niah_multivalue", {"num_values": 0}, "num_values"),
    ("niah_single", {"key_len": 0}, "key_len"),
    ("niah_single", {"value_len": 1.5}, "value_len"),
    ("niah_single", {"depth": 1.5}, "depth"),
    ("niah", {"num_needles": 1}, "num_needles"),
    ("mqar", {"num_pairs": 0}, "num_pairs"),
    ("mqar", {"num_pairs": 4, "num_queries": 5}, "num_queries"),
    ("copy", {"span_len": 1}, "span_len"),
    ("copy", {"span_len": 2.0}, "span_len"),
    ("variable_tracking", {"num_hops": 0}, "num_hops"),
    ("variable_tracking", {"num_chains": 50}, "num_chains"),
    ("common_words", {"num_common": 0}, "num_common"),
    ("common_words", {"freq_ratio": 1}, "freq_ratio"),
    ("frequent_words", {"num_top": 0}, "num_top"),
    ("frequent_words", {"alpha": 0.0}, "alpha"),
    ("niah_single", {"language_seed": -1}, "language_seed"),
])
def test_tasks_reject_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, V, **kwargs)


def test_make_task_rejects_unknown_name():
    with pytest.raises(ValueError, match="name"):
        make_task("ruler", V)


# ------------------------------------------------------------------------------------------ loaders


def test_offset_sequential_sampler():
    assert list(OffsetSequentialSampler(5, 17)) == list(range(5, 17)) and len(OffsetSequentialSampler(5, 17)) == 12
    assert list(OffsetSequentialSampler(20, 17)) == []
    for end in (17, 18, 19):  # sharded: equal counts per rank, together a prefix of [start, end)
        shards = [list(OffsetSequentialSampler(5, end, 3, r)) for r in range(3)]
        assert all(len(s) == 4 for s in shards)
        assert sorted(sum(shards, [])) == list(range(5, 17))
    with pytest.raises(ValueError, match="rank"):
        OffsetSequentialSampler(0, 10, 2, 2)
    with pytest.raises(ValueError, match="start"):
        OffsetSequentialSampler(-1, 10)


def test_datamodule_resume_yields_exactly_the_remaining_indices():
    kw = {"seq_len": 64, "batch_size": 4, "train_samples": 100, "mixture": {"niah_single": 1.0}}
    dm = SyntheticDataModule(**kw)
    assert dm.start_index == 0 and list(dm.train_dataloader().sampler) == list(range(100))
    full = list(dm.train_dataloader())
    assert len(full) == 25

    resumed = SyntheticDataModule(**kw)
    resumed.set_start_step(3, accumulate_grad_batches=2)
    assert resumed.start_index == 3 * 4 * 2
    loader = resumed.train_dataloader()
    assert list(loader.sampler) == list(range(24, 100)) and len(loader) == 19 and loader.drop_last
    for a, b in zip(full[6:], loader):  # resuming equals continuing the original run
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed.set_start_step(3, 2, world_size=2)
    assert resumed.start_index == 48
    with pytest.raises(ValueError, match="global_step"):
        resumed.set_start_step(-1)


def test_datamodule_batches_and_disjoint_validation_stream():
    from omegaconf import OmegaConf  # Hydra passes DictConfigs

    dm = SyntheticDataModule(seq_len=128, batch_size=4, val_samples=6,
                             mixture=OmegaConf.create(dict(DEFAULT_MIXTURE)))
    assert len(dm.train_dataset) == 10**9 and dm.val_dataset.seed == dm.seed + VAL_SEED_OFFSET
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == train["labels"].shape == train["answer_mask"].shape == (4, 128)
    assert train["task_id"].shape == (4,) and train["answer_mask"].any(dim=1).all()
    val = list(dm.val_dataloader())
    assert [len(b["input_ids"]) for b in val] == [4, 2]  # no drop_last for validation
    for i in range(4):
        assert not torch.equal(train["input_ids"][i], val[0]["input_ids"][i])
    assert dm.val_dataset.task_names == dm.train_dataset.task_names
    dm2 = SyntheticDataModule(seq_len=128, val_mixture={"common_words": 1.0})
    assert dm2.val_dataset.task_names == ["common_words"]
    with pytest.raises(ValueError, match="mixture"):
        SyntheticDataModule(seq_len=128, mixture={"bogus": 1.0})
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticDataModule(batch_size=0)


def test_eval_dataloader_one_task_one_length():
    loader = eval_dataloader("niah_single", 200, 6, seed=3, batch_size=4, task_kwargs={"depth": 0.0})
    batches = list(loader)
    assert [b["input_ids"].shape for b in batches] == [(4, 200), (2, 200)]
    for b in batches:
        assert (b["task_id"] == 0).all() and (b["input_ids"][:, 1] == V.KEY).all()
        assert (b["answer_mask"].sum(dim=1) == 2).all()
    with pytest.raises(ValueError, match="task"):
        eval_dataloader("ruler", 200, 6, seed=0)


def test_generation_speed():
    ds = SyntheticTaskDataset(512, 1000, DEFAULT_MIXTURE, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    it = iter(loader)
    next(it)  # warm-up
    t0 = time.perf_counter()
    batch = next(it)
    assert batch["input_ids"].shape == (8, 512)
    assert time.perf_counter() - t0 < 0.25  # ~3 ms here; loose bound against noisy machines
    t0 = time.perf_counter()
    s = make_task("niah_multikey", V).generate(rng(0), 65536)
    assert len(s.tokens) == 65536 and time.perf_counter() - t0 < 1.0
