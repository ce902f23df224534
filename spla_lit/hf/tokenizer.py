"""The tokenizer of a run: found (``tokenizer=``, the ``init_from`` folder, or the prepared data's manifest),
copied into the run folder, and its path recorded in the run config (so checkpoints name it for ``eval.py``
and ``spla_lit.export``)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger(__name__)

# The files of a Hugging Face tokenizer folder (whichever exist are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The :data:`TOKENIZER_FILES` present in ``folder``."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def copy_tokenizer(source: str | os.PathLike, dest: str | os.PathLike, key: str = "tokenizer") -> Path:
    """Copy the tokenizer files of the folder ``source`` into the folder ``dest``, all at once (a temporary
    folder renamed into place); a ``dest`` that already exists is kept (another rank of the same run wrote it).
    ``ConfigError`` naming ``key`` if ``source`` holds no tokenizer."""
    files = tokenizer_files(source)
    if not files:
        raise ConfigError(f"{key}: {source} holds no tokenizer file ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    dest = Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for file in files:
            shutil.copy2(file, tmp / file.name)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent rank's copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
