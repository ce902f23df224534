"""``torch.compile`` of the transformer blocks (``trainer.compile*`` in the config)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` arguments for each block.

    ``fullgraph=True`` makes any graph break an error (use it where a block must compile whole, e.g. the
    dense baseline); otherwise breaks are allowed and reported by :class:`~.callbacks.CompileReport`.
    """

    mode: str | None = None
    fullgraph: bool = False
    backend: str = "inductor"
    dynamic: bool | None = None


def compile_blocks(blocks: Sequence[nn.Module], options: CompileOptions) -> int:
    """Compile each of ``blocks`` in place (``Module.compile``: parameter names, state dicts and checkpoints
    are unchanged). Returns the number of blocks compiled."""
    # Forget code compiled by an earlier run in this process (a multirun, a notebook): its cached graphs
    # would be reused without re-checking fullgraph.
    torch._dynamo.reset()
    for block in blocks:
        block.compile(backend=options.backend, mode=options.mode, fullgraph=options.fullgraph,
                      dynamic=options.dynamic)
    log.info("torch.compile: %d blocks (backend=%s, mode=%s, fullgraph=%s)", len(blocks), options.backend,
             options.mode, options.fullgraph)
    return len(blocks)
