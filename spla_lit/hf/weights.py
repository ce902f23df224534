"""Safetensors folders as Hugging Face writes them: ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json``. Read lazily (one tensor at a
time, so a checkpoint is never held twice in memory) and written sharded by size."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as e:
        raise ImportError('reading and writing Hugging Face weights needs safetensors: pip install "spla[hf]"') from e
    import safetensors

    return safetensors


def parse_size(text: str | int, key: str = "max_shard_size") -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes (``ConfigError`` naming ``key``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{key}: expected a size like 2GB, 500MB or a number of bytes, got {text!r}")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"{key}: must be at least 1 byte, got {text!r}")
    return size


def weight_files(folder: str | os.PathLike, key: str = "init_from") -> dict[str, Path]:
    """``{tensor name: file}`` of a model folder's safetensors weights (``ConfigError`` naming ``key`` if none)."""
    safetensors = _safetensors()
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{key}: {index} is not a safetensors index ({e})") from e
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise ConfigError(f"{key}: {index} lists missing shard file(s): {', '.join(absent[:3])}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {', '.join(other[:3])}: only {SINGLE_FILE} or {INDEX_FILE} shards are read)" if other else ""
        raise ConfigError(f"{key}: {folder} has no safetensors weights{hint}")
    with safetensors.safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118  (safe_open has keys(), not iteration)


def tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of :func:`weight_files`, read from the file headers (no data)."""
    safetensors = _safetensors()
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safetensors.safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if name in files:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def iter_tensors(files: Mapping[str, Path], names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the tensors of :func:`weight_files` (only ``names`` when given), one file open at a
    time, one tensor in memory at a time."""
    safetensors = _safetensors()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if names is None or name in names:
            by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with safetensors.safe_open(str(file), framework="pt") as f:
            for name in by_file[file]:
                yield name, f.get_tensor(name)


def save_sharded(tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` into ``folder`` as Hugging Face does: one ``model.safetensors`` when they fit in
    ``max_shard_bytes``, else shards of at most that size (a larger tensor gets a shard of its own) and
    ``model.safetensors.index.json``. Tensors must not share memory. Returns the files written.

    The files are written in place: write into a temporary folder and rename it (as ``spla_lit.export`` does)
    to make the whole folder appear at once."""
    from safetensors.torch import save_file

    _safetensors()
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: file for file, shard in zip(names, shards) for t in shard}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names] + ([folder / INDEX_FILE] if len(shards) > 1 else [])
