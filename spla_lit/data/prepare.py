"""Tokenize text into memory-mapped token shards for ``data=tokens`` (format: :mod:`.shards`).

    python -m spla_lit.data.prepare input=<files or folders of .txt/.jsonl/.parquet> \\
        tokenizer=<tokenizer dir or tokenizer.json> out=<dir>
    python -m spla_lit.data.prepare input=stdlib tokenizer=data/tokenizer out=data/stdlib   # offline corpus

Documents (see :mod:`.corpus`) are tokenized in chunks with the ``tokenizers`` library's multi-threaded
``encode_batch`` (no special tokens added) and written one after another, each followed by the EOS token.
Re-running with the same inputs (paths, sizes, modification times), tokenizer (sha256) and options does
nothing; anything else tokenizes again. Every file is renamed into place once complete and the manifest
is written last, so an interrupted run leaves no half-written shard, and no manifest (the folder is not
usable until a run completes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import cli
from .corpus import DEFAULT_SUFFIXES, read_documents, require, resolve_inputs
from .shards import (
    DOCUMENTS,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_GLOB,
    SHARD_PATTERN,
    TMP_PREFIX,
    TokenShards,
    atomic_write,
    read_manifest,
    token_dtype,
    write_json,
)

log = logging.getLogger(__name__)

# End-of-sequence tokens looked up, in order, when neither `eos=` nor a tokenizer_config.json names one.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eos|>")
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB shards of uint16
CHUNK_BYTES = 1 << 21  # characters of text per encode_batch call: enough work for every thread


def _tokenizer_file(tokenizer: str | os.PathLike) -> Path:
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"tokenizer: {file} does not exist (give a folder holding tokenizer.json, or the file; "
                         "train one with `python -m spla_lit.data.train_tokenizer`)")
    return file


def _eos_token(file: Path, tok: Any, eos: str | None) -> tuple[str, int]:
    """(EOS token, its id): ``eos`` if given, else the ``eos_token`` of tokenizer_config.json beside
    ``file``, else the first of :data:`EOS_CANDIDATES` the tokenizer knows."""
    if eos is None:
        config = file.with_name("tokenizer_config.json")
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos is None:
            eos = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"eos: the tokenizer {file} names no end-of-sequence token; give it as eos=<token>")
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"eos: {eos!r} is not a token of {file}")
    return eos, int(eos_id)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Appends tokens to shards of ``shard_tokens`` tokens, each written atomically once full."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.dtype = out, np.dtype(DTYPES[dtype])
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []

    def append(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        data = self.buffer[:self.filled]
        name = SHARD_PATTERN.format(len(self.shards))
        atomic_write(self.out / name, lambda f: f.write(memoryview(data).cast("B")))
        self.shards.append({"file": name, "tokens": int(self.filled), "sha256": hashlib.sha256(data).hexdigest()})
        self.filled = 0


def _up_to_date(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of ``out`` if it was prepared with ``key`` and its files are all there, else None."""
    try:
        manifest = read_manifest(out)
        if manifest.get("key") != key:
            return None
        TokenShards(out)  # every shard present with its size, the document index consistent
    except (ValueError, OSError):
        return None
    return manifest


def prepare(input: str | Sequence[str], tokenizer: str | os.PathLike, out: str | os.PathLike, *,
            text_key: str = "text", suffixes: Sequence[str] = DEFAULT_SUFFIXES, eos: str | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool | None = None) -> dict[str, Any]:
    """Tokenize the documents of ``input`` (files, folders or ``"stdlib"``, see :mod:`.corpus`) with
    ``tokenizer`` into the folder ``out``; returns the manifest (see :mod:`.shards`).

    ``eos``: the separator token (default: the tokenizer's, see :func:`_eos_token`). ``progress``: a
    progress bar over the input bytes (None: when stderr is a terminal).
    """
    tokenizers = require("tokenizers", "prepare")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens: must be an integer >= 1, got {shard_tokens!r}")
    tok_file = _tokenizer_file(tokenizer)
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    eos, eos_id = _eos_token(tok_file, tok, eos)
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dtype = token_dtype(vocab_size)
    files = resolve_inputs(input, suffixes)
    stats = [f.stat() for f in files]
    out = Path(out)
    key = {"format": FORMAT_VERSION, "tokenizer_sha256": _sha256(tok_file), "eos": eos, "text_key": text_key,
           "shard_tokens": shard_tokens,
           "inputs": [{"path": str(f), "size": s.st_size, "mtime_ns": s.st_mtime_ns} for f, s in zip(files, stats)]}
    manifest = _up_to_date(out, key)
    if manifest is not None:
        log.info("%s is up to date (%s tokens, %s documents): nothing to do", out,
                 f"{manifest['num_tokens']:,}", f"{manifest['num_documents']:,}")
        return manifest

    out.mkdir(parents=True, exist_ok=True)
    # From here the folder is unusable until the new manifest is written (never old manifest + new shards);
    # then the old run's files (and temporary files of a killed run) go.
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob(f"{TMP_PREFIX}*"), *out.glob(SHARD_GLOB), out / DOCUMENTS]:
        stale.unlink(missing_ok=True)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    writer = _ShardWriter(out, dtype, shard_tokens)
    lengths = array("q")  # tokens per document (8 bytes each, not a Python int each)
    batch: list[str] = []
    pending = 0

    def tokenize() -> None:
        nonlocal batch, pending
        if not batch:
            return
        docs = [np.array(e.ids + [eos_id], dtype=writer.dtype) for e in encode(batch, add_special_tokens=False)]
        lengths.extend(len(d) for d in docs)
        writer.append(np.concatenate(docs))
        batch, pending = [], 0

    start = time.perf_counter()
    total_bytes = sum(s.st_size for s in stats)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
              disable=None if progress is None else not progress) as bar:
        for path, stat in zip(files, stats):
            for text in read_documents(path, text_key):
                batch.append(text)
                pending += len(text)
                if pending >= CHUNK_BYTES:
                    tokenize()
            bar.update(stat.st_size)
        tokenize()
    writer.flush()
    if not lengths:
        raise ValueError(f"input: the {len(files)} input file(s) hold no text")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    atomic_write(out / DOCUMENTS, lambda f: np.save(f, offsets))
    seconds = time.perf_counter() - start
    num_tokens = int(offsets[-1])
    data_hash = hashlib.sha256(json.dumps([s["sha256"] for s in writer.shards]).encode() + offsets.tobytes())
    manifest = {
        "format": FORMAT_VERSION, "key": key, "tokenizer": str(tok_file.resolve()), "eos": eos, "eos_id": eos_id,
        "vocab_size": vocab_size, "dtype": dtype, "num_tokens": num_tokens, "num_documents": len(lengths),
        "documents": DOCUMENTS, "shards": writer.shards, "data_hash": data_hash.hexdigest(),
        "stats": {"input_files": len(files), "input_bytes": total_bytes, "seconds": round(seconds, 3),
                  "tokens_per_second": round(num_tokens / max(seconds, 1e-9))},
    }
    write_json(out / MANIFEST, manifest)
    log.info("%s: %s tokens in %s documents from %d file(s) (%s) in %.1f s: %s tokens/s", out,
             f"{num_tokens:,}", f"{len(lengths):,}", len(files), dtype, seconds,
             f"{manifest['stats']['tokens_per_second']:,}")
    return manifest


OPTIONS = [
    cli.Option("input", cli.as_list, help="files or folders (comma-separated), or `stdlib`"),
    cli.Option("tokenizer", str, help="folder with tokenizer.json, or the file"),
    cli.Option("out", str, help="output folder"),
    cli.Option("text_key", str, "text", "field of .jsonl records / column of .parquet files"),
    cli.Option("suffixes", cli.as_list, list(DEFAULT_SUFFIXES), "file endings read from folders"),
    cli.Option("eos", str, None, "document separator token (default: the tokenizer's EOS)"),
    cli.Option("shard_tokens", cli.positive_int, DEFAULT_SHARD_TOKENS, "tokens per shard file"),
    cli.Option("progress", cli.as_bool, None, "progress bar (default: on a terminal)"),
]

if __name__ == "__main__":
    cli.main("spla_lit.data.prepare", __doc__, OPTIONS, prepare)
