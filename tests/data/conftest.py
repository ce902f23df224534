"""Fixtures of the real-text tests: a tiny generated corpus (textdata.py), a BPE tokenizer trained on it in
the test session, and that corpus prepared into token shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from textdata import SHARD_TOKENS, make_corpus


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
