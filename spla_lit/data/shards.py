"""The on-disk format of prepared token data (written by :mod:`.prepare`, read by :mod:`.tokens`).

A prepared folder holds:

* ``shard_00000.bin``, ``shard_00001.bin``, ...: the token stream, raw little-endian ``uint16`` (vocabulary
  <= 65536) or ``uint32``, cut into shards of ``shard_tokens`` tokens (the last one shorter). Documents
  follow one another, each followed by the EOS token; a document may continue in the next shard.
* ``documents.npy``: int64 ``[D + 1]`` offsets into the stream; document ``i`` (its EOS included) is
  ``[offsets[i], offsets[i + 1])``.
* ``manifest.json``, written last: the format version, the tokenizer (sha256, EOS id, vocabulary size),
  the inputs (path, size, mtime), the shards (file, tokens, sha256), counts and the prepare throughput.

Every file is written under a temporary name and renamed into place (:func:`atomic_write`), and the
manifest only after every file it lists: a folder without a manifest is an interrupted prepare.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.npy"
SHARD_PATTERN = "shard_{:05d}.bin"
SHARD_GLOB = "shard_*.bin"
TMP_PREFIX = ".tmp-"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """``"uint16"`` when every id of a ``vocab_size`` vocabulary fits, else ``"uint32"``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(binary file)`` into a temporary file of the same folder, fsync, then
    ``os.replace``: an interrupted write leaves the old file (or none), never a partial one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the prepared folder ``path``. Raises ``ValueError`` naming ``data.path`` when there is
    none (never prepared, or interrupted) or its format is not this version's."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        why = "no such folder" if not folder.is_dir() else f"no {MANIFEST}: prepare never finished there"
        raise ValueError(f"data.path: {folder} holds no prepared token data ({why}); prepare it with "
                         f"`python -m spla_lit.data.prepare input=... tokenizer=... out={folder}`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"data.path: {file} is not a readable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"data.path: {file} has format {found!r}, this version reads format {FORMAT_VERSION}; "
                         "prepare the data again")
    return manifest


def prepared_vocab_size(path: str | os.PathLike) -> int:
    """The vocabulary size of the prepared folder ``path`` (``conf/data/tokens.yaml``'s
    ``${prepared_vocab_size:${data.path}}``, a resolver registered by ``import spla_lit``)."""
    return int(read_manifest(path)["vocab_size"])


class TokenShards:
    """Read-only view of a prepared folder: the token stream and its document offsets.

    ``num_tokens``, ``vocab_size``, ``eos_id``, ``dtype`` and ``data_hash`` come from the manifest;
    ``offsets`` is int64 ``[D + 1]`` (see the module docstring). Shards are memory-mapped on first read, in
    each process (a pickled ``TokenShards``, e.g. in a DataLoader worker, maps them again).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.vocab_size = int(m["vocab_size"])
        self.eos_id = int(m["eos_id"])
        self.dtype = DTYPES[m["dtype"]]
        self.data_hash = str(m["data_hash"])
        self.num_tokens = int(m["num_tokens"])
        itemsize = np.dtype(self.dtype).itemsize
        sizes = [int(s["tokens"]) for s in m["shards"]]
        for shard, n in zip(m["shards"], sizes):
            file = self.path / shard["file"]
            actual = file.stat().st_size if file.is_file() else None
            if actual != n * itemsize:
                raise ValueError(f"data.path: shard {file} is {'missing' if actual is None else f'{actual} bytes'}, "
                                 f"the manifest says {n * itemsize} bytes; prepare the data again")
        if sum(sizes) != self.num_tokens:
            raise ValueError(f"data.path: the shards of {self.path} hold {sum(sizes)} tokens, the manifest says "
                             f"{self.num_tokens}")
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.offsets = np.load(self.path / DOCUMENTS)
        o = self.offsets
        if (o.ndim != 1 or len(o) != int(m["num_documents"]) + 1 or o[0] != 0 or o[-1] != self.num_tokens
                or (np.diff(o) < 1).any()):
            raise ValueError(f"data.path: {self.path / DOCUMENTS} does not match the manifest; prepare the data again")
        self._maps: list[np.memmap] | None = None

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # a memmap would pickle as a copy of its data
        return state

    def _shard(self, i: int) -> np.memmap:
        if self._maps is None:
            self._maps = [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r")
                          for s in self.manifest["shards"]]
        return self._maps[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a copy, in the shards' dtype)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) out of [0, {self.num_tokens})")
        return read_concatenated(self._starts, start, stop,
                                 lambda i, a, b: self._shard(i)[a:b], self.dtype)


def read_concatenated(starts: np.ndarray, start: int, stop: int,
                      read_piece: Callable[[int, int, int], np.ndarray], dtype: Any) -> np.ndarray:
    """Elements ``[start, stop)`` of the concatenation of pieces, piece ``i`` covering
    ``[starts[i], starts[i + 1])``; ``read_piece(i, a, b)`` returns elements ``[a, b)`` of piece ``i``."""
    out = np.empty(stop - start, dtype=dtype)
    i = int(np.searchsorted(starts, start, side="right")) - 1
    pos = start
    while pos < stop:
        end = min(stop, int(starts[i + 1]))
        out[pos - start:end - start] = read_piece(i, pos - int(starts[i]), end - int(starts[i]))
        pos, i = end, i + 1
    return out
