"""Consolidate a sharded checkpoint (a folder written by ``trainer=fsdp``) into one ordinary Lightning file.

    python -m spla_lit.training.consolidate logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt
    python -m spla_lit.training.consolidate <folder> weights.ckpt --weights-only   # no optimizer state

The file has ``state_dict`` (``net.`` keys, full tensors), ``spla_config`` and, unless ``--weights-only``,
``optimizer_states`` keyed like a plain ``torch.optim`` state dict, with the loops, LR schedulers and
callbacks: ``LMModule`` / eval load it as any single-GPU checkpoint, and ``ckpt_path=<file>`` resumes from
it at the exact step on one device, under DDP, or under FSDP on any number of GPUs. Runs on the CPU,
without a process group; the whole checkpoint must fit in memory. The folder is checked first (its shards'
checksums, finite weights, the stored config's targets: :func:`.checkpoint_io.verify_sharded`) and the file
is written atomically with per-tensor checksums.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .checkpoint_io import CheckpointError, check_finite, is_sharded_checkpoint, save_checkpoint_file, verify_sharded

log = logging.getLogger(__name__)
__all__ = ["consolidate", "is_sharded_checkpoint", "load_sharded", "main", "rekey_optimizer_state"]


def load_sharded(path: str | Path, key: str = "src") -> dict[str, Any]:
    """Every tensor of a sharded checkpoint, gathered into full tensors, plus its metadata file; the folder is
    verified first and the weights must be finite (:class:`.checkpoint_io.CheckpointError` naming ``key``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = verify_sharded(path, key=key)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(Path(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    check_finite(state, f"{key}: {path}", what="")  # model weights and optimizer states
    state.update(meta)
    return state


def rekey_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (``torch.distributed.checkpoint``) -> keyed by position, in
    the order of the parameter groups (what ``torch.optim.Optimizer.load_state_dict`` expects)."""
    groups, index = [], {}
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def consolidate(src: str | Path, dst: str | Path | None = None, *, weights_only: bool = False) -> dict[str, Any]:
    """Load the sharded checkpoint ``src`` as one Lightning checkpoint dict; write it to ``dst`` (atomically)
    if given. ``weights_only`` drops the optimizer states (a smaller file for evaluation)."""
    checkpoint = load_sharded(src)
    optimizers = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    states = [rekey_optimizer_state(checkpoint.pop(k)) for k in optimizers]
    if not weights_only:
        checkpoint["optimizer_states"] = states
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"src: {src}: no model state_dict in the checkpoint")
    if "spla_config" not in checkpoint:
        log.warning("%s has no spla_config: eval cannot rebuild the model from it alone", src)
    if dst is not None:
        save_checkpoint_file(checkpoint, dst)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spla_lit.training.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="sharded checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("dst", type=Path, help="output file")
    parser.add_argument("--weights-only", action="store_true", help="leave out the optimizer states")
    args = parser.parse_args(argv)
    if args.dst.resolve() == args.src.resolve():
        parser.error("dst must differ from src")
    try:
        checkpoint = consolidate(args.src, args.dst, weights_only=args.weights_only)
    except ConfigError as e:  # one line naming the folder and what is wrong with it
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in checkpoint["state_dict"].values() if torch.is_tensor(v))
    print(f"wrote {args.dst}: step {checkpoint.get('global_step')}, {n:,} model values"
          f"{'' if args.weights_only else ', optimizer state'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
