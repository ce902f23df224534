"""Test helper: the network weights a checkpoint holds (a file, or an FSDP2 folder of shards), compared."""

from __future__ import annotations

from pathlib import Path

import torch

from spla_lit.training.consolidate import consolidate


def net_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The ``net.*`` tensors of the LightningModule's state dict in ``ckpt``."""
    state = consolidate(ckpt) if ckpt.is_dir() else torch.load(ckpt, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5,
                        atol: float = 1e-6) -> None:
    """Same names, and every tensor close (in float32) within ``rtol``/``atol``; 0/0 asks for equality."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=rtol, atol=atol, msg=k)
