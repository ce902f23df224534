"""How the LM is prepared for training: :func:`configure_model` composes compile (``compile.py``) and FSDP2
sharding (``fsdp.py``) over the transformer blocks."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .compile import CompileOptions, compile_blocks
from .fsdp import FSDP2Strategy


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The units compiled and sharded one by one: the ``TransformerBlock``s of ``net``, in order."""
    from ..models.transformer import TransformerBlock

    return [m for m in net.modules() if isinstance(m, TransformerBlock)]


def configure_model(module: Any) -> None:
    """``LightningModule.configure_model`` for the LM (``module.net``): compile the blocks if
    ``module.compile_options`` is set, then shard them under :class:`FSDP2Strategy`. Idempotent: Lightning
    calls the hook again on every ``fit``/``validate``."""
    net = module.net
    if getattr(net, "_spla_configured", False):
        return
    blocks = transformer_blocks(net)
    # Order: compile each block, then fully_shard it (PyTorch's recommended order, activation checkpointing
    # being outermost: the model wraps each block's call): each compiled block is one FSDP unit, and compile
    # never traces FSDP's all-gather hooks.
    options: CompileOptions | None = getattr(module, "compile_options", None)
    if options is not None:
        compile_blocks(blocks, options)
    strategy = module._trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, FSDP2Strategy):
        strategy.shard(net, blocks)
    elif isinstance(strategy, ModelParallelStrategy):
        raise TypeError("use spla_lit.training.fsdp.FSDP2Strategy (trainer=fsdp) to shard the LM; "
                        "a plain ModelParallelStrategy does not know how to parallelize it")
    net._spla_configured = True
