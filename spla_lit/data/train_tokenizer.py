"""Train a byte-level BPE tokenizer on local text (no tokenizer can be downloaded).

    python -m spla_lit.data.train_tokenizer input=stdlib vocab_size=8192 out=data/tokenizer

Writes ``out/tokenizer.json`` (the ``tokenizers`` library's format) and ``out/tokenizer_config.json``, so
the folder loads with ``transformers.AutoTokenizer.from_pretrained(out)`` (``PreTrainedTokenizerFast``) as
well as ``tokenizers.Tokenizer.from_file``. Special tokens: ``<pad>`` (id 0), ``<s>`` (BOS, 1), ``</s>``
(EOS, 2); ``prepare`` separates documents with EOS. Byte-level: every text encodes (no unknown token) and
decodes back exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import cli
from .corpus import DEFAULT_SUFFIXES, read_documents, require, resolve_inputs
from .shards import atomic_write, write_json

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens


def _documents(files: Sequence[Path], text_key: str) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_key)


def train_tokenizer(input: str | Sequence[str], vocab_size: int, out: str | os.PathLike, *, text_key: str = "text",
                    suffixes: Sequence[str] = DEFAULT_SUFFIXES, min_frequency: int = 2,
                    progress: bool = True) -> Path:
    """Train byte-level BPE with ``vocab_size`` ids (at most: a tiny corpus may stop earlier) on the
    documents of ``input`` (see :mod:`.corpus`) and save it into the folder ``out``; returns
    ``out/tokenizer.json``."""
    tokenizers = require("tokenizers", "train_tokenizer")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: must be an integer >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency: must be an integer >= 1, got {min_frequency!r}")
    files = resolve_inputs(input, suffixes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    log.info("training a %d-token byte-level BPE on %d file(s)", vocab_size, len(files))
    tok.train_from_iterator(_documents(files, text_key), trainer=trainer)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens did not get ids 0..{len(SPECIAL_TOKENS) - 1}")

    path = out / "tokenizer.json"
    atomic_write(path, lambda f: f.write(tok.to_str().encode()))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 2**31 - 1,
    })
    log.info("saved %s (%d tokens)", path, tok.get_vocab_size())
    return path


OPTIONS = [
    cli.Option("input", cli.as_list, help="files or folders (comma-separated), or `stdlib`"),
    cli.Option("vocab_size", cli.positive_int, help="number of ids, special tokens included"),
    cli.Option("out", str, help="output folder"),
    cli.Option("text_key", str, "text", "field of .jsonl records / column of .parquet files"),
    cli.Option("suffixes", cli.as_list, list(DEFAULT_SUFFIXES), "file endings read from folders"),
    cli.Option("min_frequency", cli.positive_int, 2, "fewest occurrences of a merged pair"),
    cli.Option("progress", cli.as_bool, True, "show the trainer's progress bar"),
]

if __name__ == "__main__":
    cli.main("spla_lit.data.train_tokenizer", __doc__, OPTIONS, train_tokenizer)
