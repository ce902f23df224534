"""Fixtures of the launcher tests that read prepared text (tests/textdata.py): a tiny corpus, its tokenizer, the
prepared shards."""

from textdata import corpus, prepared, tokenizer_dir  # noqa: F401  (fixtures)
