"""Text inputs of ``prepare`` and ``train_tokenizer``: which files, and the documents inside them.

An input is a file, a folder (searched recursively for files with one of ``suffixes``, in sorted order) or
``stdlib``: the ``*.py`` sources of the running interpreter's standard library (see :func:`stdlib_files`).
Documents: a ``.jsonl`` file holds one per line (the string field ``text_key``), a ``.parquet`` file one
per row (the string column ``text_key``), any other file is one document (UTF-8 text). Empty documents
(and null fields) are skipped.
"""

from __future__ import annotations

import importlib
import json
import logging
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

STDLIB = "stdlib"
DEFAULT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Folders of the standard library left out of the `stdlib` corpus: the regression tests (`test/` alone is
# more than half of the sources, much of it generated data and deliberately odd code) and third-party
# packages installed into it.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
HF_EXTRA = 'pip install "spla[hf]"'


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency of the ``hf`` extra, or fail naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module.split('.')[0]!r}: {HF_EXTRA}") from e


def stdlib_files() -> list[Path]:
    """The offline corpus ``input=stdlib``: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``,
    sorted by relative path, without the folders of :data:`STDLIB_SKIP_DIRS` (tests, site-packages) and the
    build-specific ``_sysconfigdata_*.py`` (paths and compiler flags of this machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
             and not p.name.startswith("_sysconfigdata") and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_inputs(inputs: Sequence[str | Path], suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[Path]:
    """The input files, in order: each input in turn (a folder's files sorted), duplicates dropped.
    Raises ``ValueError`` naming ``input`` for a missing path or when no file is found."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("input: give at least one file or folder (or input=stdlib)")
    suffixes = tuple(s if s.startswith(".") else f".{s}" for s in suffixes)
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if str(spec) == STDLIB:  # a folder of that name: write ./stdlib
            found = stdlib_files()
        elif path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()),
                           key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise ValueError(f"input: folder {path} has no file ending in {', '.join(suffixes)} "
                                 "(set suffixes=... to read others)")
        elif path.is_file():
            found = [path]
        else:
            raise ValueError(f"input: {spec} is neither a file nor a folder (nor `{STDLIB}`)")
        files.extend(p.resolve() for p in found)
    return list(dict.fromkeys(files))


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s is not valid UTF-8 (%s): invalid bytes replaced by U+FFFD", path, e.reason)
        return data.decode("utf-8-sig", errors="replace")


def _field(value: object, text_key: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"text_key: {where}: field {text_key!r} is a {type(value).__name__}, not a string")


def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """The non-empty documents of one input file (see the module docstring)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"input: {path}:{lineno} is not a JSON line ({e})") from e
                if not isinstance(record, dict) or text_key not in record:
                    raise ValueError(f"text_key: {path}:{lineno} has no field {text_key!r}")
                text = _field(record[text_key], text_key, f"{path}:{lineno}")
                if text:
                    yield text
    elif path.suffix == ".parquet":
        pq = require("pyarrow.parquet", "reading .parquet input")
        table = pq.ParquetFile(path)
        if text_key not in table.schema_arrow.names:
            raise ValueError(f"text_key: {path} has no column {text_key!r} (columns: {table.schema_arrow.names})")
        for batch in table.iter_batches(columns=[text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if _field(text, text_key, str(path)):
                    yield text
    else:
        text = _decode(path.read_bytes(), path)
        if text:
            yield text
