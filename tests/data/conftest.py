"""Fixtures of the real-text tests (defined in tests/textdata.py): a tiny generated corpus, a BPE tokenizer
trained on it in the test session, and that corpus prepared into token shards."""

from textdata import corpus, prepared, tokenizer_dir  # noqa: F401  (fixtures)
