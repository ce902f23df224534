"""Consolidate a sharded checkpoint (a folder written by ``trainer=fsdp``) into one ordinary Lightning file.

    python -m spla_lit.training.consolidate logs/train/runs/<run>/checkpoints/last.ckpt last-full.ckpt
    python -m spla_lit.training.consolidate <folder> weights.ckpt --weights-only   # no optimizer state

The file has ``state_dict`` (``net.`` keys, full tensors), ``spla_config`` and, unless ``--weights-only``,
``optimizer_states`` keyed like a plain ``torch.optim`` state dict, with the loops, LR schedulers and
callbacks: ``LMModule`` / eval load it as any single-GPU checkpoint, and ``ckpt_path=<file>`` resumes from
it at the exact step on one device, under DDP, or under FSDP on any number of GPUs. Runs on the CPU,
without a process group; the whole checkpoint must fit in memory.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint_io import atomic_torch_save

log = logging.getLogger(__name__)
METADATA = "meta.pt"  # Lightning's file of the non-tensor state, next to the shards


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder of ``torch.distributed.checkpoint`` shards with Lightning's metadata file."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file() and (path / ".metadata").is_file()


def load_sharded(path: str | Path) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint, gathered into full tensors, plus its metadata file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint folder (with {METADATA} and .metadata)")
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    state.update(torch.load(path / METADATA, map_location="cpu", weights_only=True))
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
        raise KeyError(f"{src}: no model state_dict in the checkpoint")
    if "spla_config" not in checkpoint:
        log.warning("%s has no spla_config: eval cannot rebuild the model from it alone", src)
    if dst is not None:
        atomic_torch_save(checkpoint, dst)
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
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in checkpoint["state_dict"].values() if torch.is_tensor(v))
    print(f"wrote {args.dst}: step {checkpoint.get('global_step')}, {n:,} model values"
          f"{'' if args.weights_only else ', optimizer state'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
