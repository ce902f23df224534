"""Allowed values of every SPLA knob, declared once, and the selection geometry shared by ops, kernels,
layers and config validation.

Each ``Literal`` type below is the single source of its option list: ``SCORERS = get_args(Scorer)`` and so
on. Code validates against these tuples (``check_choice``) and config validation reads them, so adding an
option is one edit here plus its implementation.

This module imports nothing heavy (no torch): the kernels package and the config validation both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Scorer = Literal["taylor2", "taylor1", "random", "oracle"]
Covariance = Literal["diag", "full", "lowrank"]
HeadReduce = Literal["lse", "max", "mean"]
SparseMode = Literal["topk", "window"]
RLAMode = Literal["subtract", "explicit", "none"]
FeatureMap = Literal["elu1", "relu", "softmax", "identity", "taylor"]
Combine = Literal["add", "joint"]
Impl = Literal["auto", "reference", "triton"]
# RoPE frequency scalings beyond plain RoPE (``model.rope_scaling.rope_type``; null: none)
RopeScaling = Literal["llama3"]

SCORERS: tuple[str, ...] = get_args(Scorer)
COVARIANCES: tuple[str, ...] = get_args(Covariance)
HEAD_REDUCTIONS: tuple[str, ...] = get_args(HeadReduce)
SPARSE_MODES: tuple[str, ...] = get_args(SparseMode)
RLA_MODES: tuple[str, ...] = get_args(RLAMode)
FEATURE_MAPS: tuple[str, ...] = get_args(FeatureMap)
# Feature maps whose values are never negative: needed by the normalized residual and by combine=joint.
POSITIVE_FEATURE_MAPS: tuple[str, ...] = ("elu1", "relu", "softmax", "taylor")
COMBINES: tuple[str, ...] = get_args(Combine)
IMPLS: tuple[str, ...] = get_args(Impl)
ROPE_SCALINGS: tuple[str, ...] = get_args(RopeScaling)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value  # type: ignore[return-value]


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def min_topk(*, block_size: int, query_block: int = 1, local_blocks: int = 1, sink_blocks: int = 0) -> int:
    """Smallest ``topk`` that holds the forced blocks at any sequence length: the ``local_blocks`` most
    recent blocks (at least every block a query block overlaps) plus the ``sink_blocks`` first ones."""
    overlap = max(1, query_block // block_size) if query_block > 1 else 1
    return max(local_blocks, overlap) + sink_blocks


@dataclass(frozen=True)
class Selection:
    """How each query (block) picks the key blocks it attends to exactly (``docs/spla.md`` §1-2).

    Attributes:
        block_size: tokens per key block.
        topk: blocks per query (block), forced ones included. ``mode="window"`` ignores it and keeps exactly
            the forced blocks (see :attr:`k`).
        query_block: tokens per query block; 1 (the default) is causal at token level, > 1 shares one
            selection among a block of queries (a speed option that leaks within the block).
        local_blocks: most recent visible blocks always kept (>= 1: the diagonal block).
        sink_blocks: first blocks always kept.
        mode: ``topk`` (scored) or ``window`` (only the local and sink blocks: a sliding window).
        scorer, covariance, rank, head_reduce: the block scorer (``topk`` mode; see ``ops.block_scores``).
        scale: softmax scale; None means ``head_dim ** -0.5``.

    Construction validates every field and the rule ``topk >= forced blocks``, naming the field, so every
    layer that holds a ``Selection`` holds a valid one.
    """

    block_size: int = 64
    topk: int = 16
    query_block: int = 1
    local_blocks: int = 1
    sink_blocks: int = 0
    mode: SparseMode = "topk"
    scorer: Scorer = "taylor2"
    covariance: Covariance = "diag"
    rank: int = 4
    head_reduce: HeadReduce = "lse"
    scale: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("block_size", self.block_size)
        check_positive_int("topk", self.topk)
        check_positive_int("query_block", self.query_block)
        check_positive_int("local_blocks", self.local_blocks)
        check_positive_int("sink_blocks", self.sink_blocks, minimum=0)
        check_positive_int("rank", self.rank)
        check_choice("mode", self.mode, SPARSE_MODES)
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("covariance", self.covariance, COVARIANCES)
        check_choice("head_reduce", self.head_reduce, HEAD_REDUCTIONS)
        if self.query_block > 1 and self.query_block % self.block_size and self.block_size % self.query_block:
            raise ValueError(f"query_block ({self.query_block}) and block_size ({self.block_size}) "
                             "must divide one another")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be > 0 or None, got {self.scale!r}")
        if self.mode == "topk" and self.topk < self.forced:
            raise ValueError(f"topk ({self.topk}) is smaller than the {self.forced} forced blocks "
                             f"(local_blocks={self.local_blocks}, sink_blocks={self.sink_blocks}, "
                             f"query_block={self.query_block})")

    @property
    def forced(self) -> int:
        """Blocks kept whatever the scores (see :func:`min_topk`)."""
        return min_topk(block_size=self.block_size, query_block=self.query_block, local_blocks=self.local_blocks,
                        sink_blocks=self.sink_blocks)

    @property
    def k(self) -> int:
        """Width of the selection: ``topk``, or the forced blocks alone in ``window`` mode."""
        return self.topk if self.mode == "topk" else self.forced
