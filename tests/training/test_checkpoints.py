"""Checkpoints carry checksums; corrupted, non-finite, foreign or missing files are refused with one line
naming ``ckpt_path`` (exit code 2 from train.py / eval.py, no traceback, no run folder left behind)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra_utils import ROOT, make_cfg

from spla_lit.config import ConfigError
from spla_lit.eval.loading import load_model
from spla_lit.training.checkpoint_io import (
    CHECKSUM_KEY,
    MANIFEST,
    AtomicCheckpointIO,
    CheckpointError,
    add_checksums,
    read_checkpoint,
    verify_sharded,
    write_manifest,
)
from spla_lit.training.run import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=1"], out))
    return out


def test_every_tensor_of_every_checkpoint_has_a_checksum(run_dir):
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        record = ckpt[CHECKSUM_KEY]
        assert record["algorithm"] == "sha256"
        names = set(record["tensors"])
        assert {f"state_dict/{k}" for k in ckpt["state_dict"]} <= names, path
        assert any(n.startswith("optimizer_states/0/state/") for n in names), path
        read_checkpoint(path)  # verifies


def _tensor_offset(path: Path, tensor_index: int) -> tuple[int, int]:
    """(byte offset, size) of storage record ``tensor_index`` inside a ``torch.save`` zip archive."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(f"/data/{tensor_index}"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _corrupt(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with 8 bytes in the middle of its largest tensor overwritten (the zip stays valid)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename]
    biggest = max(records, key=lambda i: i.file_size)
    offset, size = _tensor_offset(src, int(biggest.filename.rsplit("/", 1)[1]))
    middle = offset + size // 2
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    dst.write_bytes(bytes(data))
    return dst


def test_a_byte_corrupted_checkpoint_is_refused_on_every_load(run_dir, tmp_path):
    bad = _corrupt(run_dir / "checkpoints" / "last.ckpt", tmp_path / "bad.ckpt")
    torch.load(bad, weights_only=True)  # torch itself reads it silently
    pattern = rf"^ckpt_path: {bad}: tensor '.+' does not match its checksum: the file is corrupted$"
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(bad)  # eval.py
    with pytest.raises(CheckpointError, match=pattern):  # resume, through Lightning's checkpoint I/O
        train(make_cfg(["trainer.max_steps=3", f"ckpt_path={bad}"], tmp_path / "resumed"))


def test_non_finite_weights_are_refused_on_load(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt[CHECKSUM_KEY]
    name = next(k for k in ckpt["state_dict"] if k.endswith("wq.weight"))
    ckpt["state_dict"][name][0, 0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(add_checksums(ckpt), path)  # saved that way: the checksums match
    with pytest.raises(CheckpointError, match=rf"^ckpt_path: {path}: state_dict/{name} holds NaN or inf values"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds NaN or inf"):
        load_model(path)


def test_a_resumed_run_refuses_non_finite_state_whatever_loaded_it(run_dir, tmp_path, monkeypatch):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["optimizer_states"][0]["state"]
    next(iter(state.values()))["exp_avg"].fill_(float("inf"))
    torch.save(ckpt, tmp_path / "inf.ckpt")
    # a loader that checks nothing (as the sharded FSDP path loads straight into the model): LMModule still does
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint",
                        lambda self, path, *a, **k: torch.load(path, map_location="cpu", weights_only=True))
    with pytest.raises(CheckpointError, match=r"^ckpt_path: .*inf\.ckpt: the loaded weights or optimizer state hold"):
        train(make_cfg(["trainer.max_steps=3", "trainer.val_check_interval=1", f"ckpt_path={tmp_path / 'inf.ckpt'}"],
                       tmp_path / "resumed"))


def test_a_checkpoint_without_checksums_loads_with_a_warning(run_dir, tmp_path, caplog):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt[CHECKSUM_KEY]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt").global_step == 2
    assert "no checksums" in caplog.text


def test_an_altered_tensor_set_is_refused(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["net.extra"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"tensor 'state_dict/net\.extra' has no stored checksum"):
        read_checkpoint(tmp_path / "extra.ckpt")
    del ckpt["state_dict"]["net.extra"]
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"tensor 'state_dict/.+' is missing"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_sharded_folders_carry_a_manifest_that_catches_a_corrupted_shard(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 3, "spla_config": {"seed": 1}}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(os.urandom(100))
    (folder / "__0_0.distcp").write_bytes(os.urandom(4096))
    write_manifest(folder)
    assert verify_sharded(folder)["global_step"] == 3
    shard = bytearray((folder / "__0_0.distcp").read_bytes())
    shard[100] ^= 0xFF
    (folder / "__0_0.distcp").write_bytes(bytes(shard))
    with pytest.raises(CheckpointError, match=rf"^ckpt_path: {folder}: shard __0_0\.distcp does not match its"):
        verify_sharded(folder)
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"shard __0_0\.distcp is missing"):
        verify_sharded(folder)
    (folder / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match=rf"unreadable {MANIFEST}"):
        verify_sharded(folder)


def _non_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file that is no usable checkpoint, what the one-line error says)."""
    (tmp_path / "text.ckpt").write_text("hello\n")
    (tmp_path / "random.ckpt").write_bytes(os.urandom(5000))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:20000])
    (tmp_path / "folder").mkdir()
    torch.save({"not": "a checkpoint"}, tmp_path / "plain.pt")
    return {
        "missing": (tmp_path / "missing.ckpt", "no such file"),
        "text": (tmp_path / "text.ckpt", r"not a PyTorch checkpoint \(not a zip archive written by torch\.save\)"),
        "random": (tmp_path / "random.ckpt", r"not a PyTorch checkpoint \(.+\)"),
        "empty": (tmp_path / "empty.ckpt", "empty file"),
        "truncated": (tmp_path / "truncated.ckpt", r"truncated or not a PyTorch checkpoint \(.+\)"),
        "readme": (ROOT / "README.md", r"not a PyTorch checkpoint \(.+\)"),
        "folder": (tmp_path / "folder", "a folder, not a checkpoint file"),
        "plain": (tmp_path / "plain.pt", r"not a training checkpoint \(no 'state_dict'\)"),
    }


def test_non_checkpoint_files_give_one_line_naming_ckpt_path(run_dir, tmp_path):
    for name, (path, why) in _non_checkpoints(tmp_path, run_dir / "checkpoints" / "last.ckpt").items():
        with pytest.raises(CheckpointError, match=rf"^ckpt_path: {path}: {why}$") as e:
            read_checkpoint(path)
        assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value), name
        with pytest.raises(ConfigError, match=rf"^ckpt_path: {path}: {why}$"):  # resume: before building
            train(make_cfg([f"ckpt_path={path}"], tmp_path / "resumed"))
        assert not (tmp_path / "resumed").exists(), name


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2_and_leave_no_folder(run_dir, tmp_path):
    files = _non_checkpoints(tmp_path, run_dir / "checkpoints" / "last.ckpt")
    logs = tmp_path / "logs"
    cases = [("train.py", [f"ckpt_path={files['text'][0]}"], files["text"][1]),
             ("eval.py", [f"ckpt_path={files['random'][0]}"], files["random"][1]),
             ("eval.py", [f"ckpt_path={files['readme'][0]}"], files["readme"][1]),
             ("eval.py", [], "missing; give ckpt_path="),
             ("train.py", ["sparse.topk=0"], "must be an integer >= 1, got 0")]
    for script, args, why in cases:
        proc = _cli(script, *args, f"paths.log_dir={logs}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (script, args, out[-2000:])
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "Traceback" not in out, out[-2000:]
        assert "invalid config: " in errors[0], errors[0]
        assert re.search(why, errors[0]), (why, errors[0])
        assert not logs.exists(), (script, args, list(logs.rglob("*")))
