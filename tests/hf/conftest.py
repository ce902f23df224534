"""Fixtures of the Hugging Face tests (tests/textdata.py): a tiny corpus, a tokenizer trained on it, the corpus
prepared into token shards."""

from textdata import corpus, prepared, tokenizer_dir  # noqa: F401  (fixtures)
