"""Helpers of the real-text tests: a tiny generated corpus of .txt, .jsonl and .parquet files, and the fixtures
built on it (a conftest imports them): ``corpus``, ``tokenizer_dir`` (a BPE tokenizer trained on it in the test
session) and ``prepared`` (the corpus in token shards)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "café", "naïve",
         "日本", "∑", "🙂", "def", "return", "if", "else", "for", "in", "while")
SHARD_TOKENS = 700  # several shards, documents crossing shard boundaries


def text(rng: random.Random, words: int) -> str:
    """Pseudo-English with punctuation, line breaks and non-ASCII characters."""
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS))
        if i % 11 == 10:
            out.append(rng.choice([".\n", ",", "\n\n    ", ":"]))
    return " ".join(out)


def make_corpus(root: Path, seed: int = 0) -> list[str]:
    """Write ``root/{a.txt, b.txt, c/d.txt, e.jsonl, f.parquet}`` (and files prepare must ignore); returns the
    documents in the order prepare reads them (sorted relative paths; lines; rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    (root / "c").mkdir(parents=True)
    docs: list[str] = []
    for name in ("a.txt", "b.txt", "c/d.txt"):
        docs.append(text(rng, rng.randint(40, 400)))
        (root / name).write_text(docs[-1], encoding="utf-8")
    (root / "c" / "ignored.md").write_text("not read: suffix not listed")
    lines = [text(rng, rng.randint(5, 120)) for _ in range(6)]
    with open(root / "e.jsonl", "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"text": line, "id": i}) + "\n")
            if i == 2:
                f.write(json.dumps({"text": ""}) + "\n\n")  # an empty document and a blank line: skipped
    docs += lines
    rows = [text(rng, rng.randint(5, 200)) for _ in range(5)]
    pq.write_table(pa.table({"text": rows + [None], "n": list(range(6))}), root / "f.parquet")
    docs += rows
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    pytest.importorskip("pyarrow", reason='the hf extra: pip install "spla[hf]"')
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    pytest.importorskip("tokenizers", reason='the hf extra: pip install "spla[hf]"')
    from spla_lit.data.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(str(corpus[0]), vocab_size=320, out=out, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    from spla_lit.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(str(corpus[0]), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    return out
