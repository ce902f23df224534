"""Checkpoint files that are never half-written, carry checksums, and are checked before use.

Writing: :func:`atomic_torch_save` (temporary name, fsync, ``os.replace``); :func:`save_checkpoint_file`
adds a SHA-256 of every tensor (:data:`CHECKSUM_KEY`); a sharded folder (``trainer=fsdp``) gets a
manifest of its files' SHA-256 (:func:`write_manifest`, :data:`MANIFEST`).

Reading: :func:`read_checkpoint` (one file) and :func:`verify_sharded` (a folder) are the only ways the
project opens a checkpoint (resume, eval, consolidate). Each failure is a :class:`CheckpointError` whose
one-line message starts with the config key or argument that named the file (``ckpt_path: ...``): a missing,
empty, truncated or foreign file, a tensor whose bytes no longer match their checksum, non-finite weights,
and a stored run config naming a class outside :data:`spla_lit.safety.ALLOWED_TARGETS`. Tensors are
always loaded with ``weights_only=True`` (no code from the file runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..config import ConfigError
from ..safety import check_targets

log = logging.getLogger(__name__)

CHECKSUM_KEY = "spla_checksums"  # {"algorithm": "sha256", "tensors": {"state_dict/net.emb.weight": hex}}
MANIFEST = "checksums.json"  # in a sharded folder: {"algorithm": "sha256", "files": {name: hex}}
ALGORITHM = "sha256"  # hardware-accelerated on current x86 and ARM CPUs (~1.4 GB/s per core measured here)
CONFIG_KEY = "spla_config"  # the run config train.py stores in every checkpoint
SHARDED_METADATA = "meta.pt"  # Lightning's file of the non-tensor state in a sharded folder
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives (since torch 1.6)
_CHUNK = 16 * 2**20


class CheckpointError(ConfigError):
    """A checkpoint cannot be used; the message starts with the key that named it and says why."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace`` over ``path``.

    A crash mid-write leaves the previous file (if any) intact and at most a stray ``.tmp`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename in it durable
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------------------------- checksums


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists of a checkpoint, with a path like ``state_dict/net.emb.weight``."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if key != CHECKSUM_KEY:
                yield from _tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{i}" if prefix else str(i))


def tensor_checksum(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes (any dtype, any device; copied to the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = hashlib.new(ALGORITHM)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the GIL is released while hashing
    return h.hexdigest()


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tensor_checksums(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """``{path: sha256}`` for every tensor of ``checkpoint``, hashed on up to 8 threads."""
    items = list(_tensors(checkpoint))
    with ThreadPoolExecutor(_workers()) as pool:
        return dict(zip((k for k, _ in items), pool.map(tensor_checksum, (t for _, t in items))))


def add_checksums(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with :data:`CHECKSUM_KEY` holding every tensor's checksum."""
    return {**checkpoint, CHECKSUM_KEY: {"algorithm": ALGORITHM, "tensors": tensor_checksums(checkpoint)}}


def verify_checksums(checkpoint: Mapping[str, Any], where: str) -> bool:
    """Raise :class:`CheckpointError` (``where`` first) when a tensor does not match its stored checksum, or
    a checksummed tensor is missing. Returns False (and logs a warning) for a checkpoint without checksums
    (written before they existed), True when verified."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        log.warning("%s: no checksums (written by an older version): its bytes cannot be verified", where)
        return False
    if not isinstance(stored, Mapping) or stored.get("algorithm") != ALGORITHM:
        raise CheckpointError(f"{where}: unknown checksum record {str(stored)[:80]!r}")
    expected: Mapping[str, str] = stored["tensors"]
    actual = tensor_checksums(checkpoint)
    for name, digest in expected.items():
        if name not in actual:
            raise CheckpointError(f"{where}: tensor {name!r} is missing (it has a stored checksum)")
        if actual[name] != digest:
            raise CheckpointError(f"{where}: tensor {name!r} does not match its checksum: the file is corrupted")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]!r} has no stored checksum (the file was altered)")
    return True


def check_finite(tensors: Mapping[str, Any], where: str, what: str = "state_dict") -> None:
    """Raise :class:`CheckpointError` naming the first floating tensor of ``tensors`` (nested) holding NaN/inf."""
    for name, t in _tensors(tensors, what):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: {name} holds NaN or inf values: the checkpoint's weights are not "
                                  "finite, refusing it")


def _file_sha256(path: Path) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write :data:`MANIFEST` (the SHA-256 of every other file) into a sharded checkpoint folder, atomically."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))
    with ThreadPoolExecutor(_workers()) as pool:
        digests = dict(zip((p.name for p in files), pool.map(_file_sha256, files)))
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": digests}, indent=1))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ reading


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder of ``torch.distributed.checkpoint`` shards with Lightning's metadata file."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's zip errors go on for a paragraph)."""
    text = str(e).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(e).__name__)[:160]


def _torch_load(path: Path, where: str, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{where}: holds Python objects other than tensors and plain containers; refused "
                              "(checkpoints are read with weights_only=True, so no code from the file runs)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{where}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from None


def _check_stored_config(checkpoint: Mapping[str, Any], where: str) -> None:
    config = checkpoint.get(CONFIG_KEY)
    if config is not None:
        try:
            check_targets(config, CONFIG_KEY, stored=True)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None


def read_checkpoint(path: str | os.PathLike, *, key: str = "ckpt_path", verify: bool = True,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a single-file checkpoint on the CPU, checked.

    Refuses (:class:`CheckpointError`, ``"<key>: <path>: <why>"``): a missing path or a folder, a file that
    is not a ``torch.save`` zip archive (text, random bytes), a truncated one, one holding pickled objects,
    one without ``state_dict``, and a stored run config naming a non-allowlisted ``_target_``. With
    ``verify`` (default) also tensors that do not match their checksums and non-finite model weights or
    optimizer states. ``verify=False, mmap=True`` is a cheap look at the metadata (the tensors stay on disk).
    """
    p = Path(path)
    where = f"{key}: {p}"
    if not p.exists():
        raise CheckpointError(f"{where}: no such file")
    if p.is_dir():
        if is_sharded_checkpoint(p):
            raise CheckpointError(f"{where}: a sharded checkpoint folder (trainer=fsdp); make one file of it with "
                                  f"python -m spla_lit.training.consolidate {p} <file>")
        raise CheckpointError(f"{where}: a folder, not a checkpoint file")
    with open(p, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        raise CheckpointError(f"{where}: empty file")
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{where}: not a PyTorch checkpoint (not a zip archive written by torch.save)")
    checkpoint = _torch_load(p, where, mmap=mmap)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{where}: not a training checkpoint (no 'state_dict')")
    _check_stored_config(checkpoint, where)
    if verify:
        verify_checksums(checkpoint, where)
        check_finite(checkpoint["state_dict"], where)
        check_finite(checkpoint.get("optimizer_states", []), where, "optimizer_states")
    return checkpoint


def verify_sharded(path: str | os.PathLike, *, key: str = "ckpt_path", verify: bool = True) -> dict[str, Any]:
    """Check a sharded checkpoint folder; return its metadata (``meta.pt``: step, loops, ``spla_config``...).

    With ``verify``, every file listed in :data:`MANIFEST` must match its SHA-256 (a folder without a
    manifest, written by an older version, is accepted with a warning). The stored run config must name only
    allowlisted targets. Raises :class:`CheckpointError` naming ``key``, the folder and the file.
    """
    p = Path(path)
    where = f"{key}: {p}"
    if not is_sharded_checkpoint(p):
        raise CheckpointError(f"{where}: not a sharded checkpoint folder (needs {SHARDED_METADATA} and .metadata)")
    manifest = p / MANIFEST
    if verify and manifest.is_file():
        try:
            record = json.loads(manifest.read_text())
            files: Mapping[str, str] = record["files"]
            if record["algorithm"] != ALGORITHM:
                raise ValueError(record["algorithm"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: unreadable {MANIFEST} ({_first_line(e)})") from None
        for name, digest in sorted(files.items()):
            if not (p / name).is_file():
                raise CheckpointError(f"{where}: shard {name} is missing")
            if _file_sha256(p / name) != digest:
                raise CheckpointError(f"{where}: shard {name} does not match its checksum: the folder is corrupted")
    elif verify:
        log.warning("%s: no %s (written by an older version): its shards cannot be verified", where, MANIFEST)
    meta = _torch_load(p / SHARDED_METADATA, f"{where}/{SHARDED_METADATA}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: {SHARDED_METADATA} is not a checkpoint's metadata")
    _check_stored_config(meta, where)
    return meta


def inspect_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """The metadata of a file or sharded folder (``global_step``, ``spla_config``...) without reading the
    tensors (memory-mapped, checksums not verified: that happens when the checkpoint is loaded)."""
    p = Path(path)
    if p.is_dir() and is_sharded_checkpoint(p):
        return verify_sharded(p, key=key, verify=False)
    return read_checkpoint(p, key=key, verify=False, mmap=True)


def verify_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> str | None:
    """Fully check a checkpoint file (memory-mapped) or sharded folder: None if usable, else the error message
    (for strategies that verify on one rank and broadcast the verdict)."""
    try:
        if is_sharded_checkpoint(path):
            verify_sharded(path, key=key)
        else:
            read_checkpoint(path, key=key, mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O plugin (``Trainer(plugins=[AtomicCheckpointIO()])``): atomic writes with
    per-tensor checksums; loads through :func:`read_checkpoint` (``weights_only``, checksums, finite)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # Always on the CPU (Lightning moves the state to the device) and always weights_only.
        return read_checkpoint(path)


def save_checkpoint_file(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """:func:`atomic_torch_save` of ``checkpoint`` with every tensor's checksum added."""
    atomic_torch_save(add_checksums(checkpoint), path)
