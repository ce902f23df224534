"""Tile and launch choices of the Triton kernels: one frozen dataclass per kernel family and a per-device table.

Every entry point takes ``config=None``, meaning "look this table up for the tensors' device, dtype and
shape", or an explicit config that overrides it. The table is keyed by the GPU class (compute capability)
and, inside a class, by the operand width (2-byte or 4-byte tiles) and the widest head/feature dim; what
each entry is and where it comes from is in ``docs/kernels.md`` (section "Tile table").

Classes: ``sm90`` (H100 / H200, compute capability 9.0: the measured entries), ``sm80`` (A100, 8.0 / 8.7,
163 KiB of shared memory per block), ``sm89`` (8.6 / 8.9 / 12.x, 99 KiB) and ``default`` (anything else:
the smallest-memory entries). Under the Triton interpreter (CPU tensors) the ``sm90`` entries apply, so the
tests run the tiles the GPU runs.

This module needs torch only (not Triton).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

__all__ = [
    "ARCHS",
    "SHARED_MEMORY",
    "CombineConfig",
    "LinearConfig",
    "SelectConfig",
    "SparseConfig",
    "arch_of",
    "linear_config",
    "select_config",
    "sparse_config",
]

ARCHS = ("sm90", "sm80", "sm89", "default")
# Largest shared memory one block may use (opt-in maximum), bytes: a config must compile within it.
SHARED_MEMORY = {"sm90": 232448, "sm80": 166912, "sm89": 101376, "default": 101376}


def _check_fields(cfg: object, *, pow2: tuple[str, ...] = ()) -> None:
    """ValueError naming the field: bool fields are bools, int fields integers >= 1 (``window`` may be None),
    warps a power of two in [1, 16], the ``pow2`` fields powers of two."""
    name = type(cfg).__name__
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}.{f.name} must be True or False, got {value!r}")
            continue
        if value is None and "None" in f.type:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{f.name} must be an integer >= 1, got {value!r}")
        if (f.name.endswith("warps") or f.name in pow2) and value & (value - 1):
            raise ValueError(f"{name}.{f.name} must be a power of two, got {value}")
        if f.name.endswith("warps") and value > 16:
            raise ValueError(f"{name}.{f.name} must be <= 16, got {value}")


@dataclass(frozen=True)
class SparseConfig:
    """Tiles of the block-sparse kernels (``sparse.py``): forward, dQ and dK/dV passes.

    ``*_rows``: target tensor-core rows per program (tokens per query group = rows // G, at least 1);
    ``window``: query tokens per dK/dV work window (None: the whole sequence); ``*_warps``, ``*_stages``:
    the launch's ``num_warps`` and ``num_stages``.
    """

    fwd_rows: int = 16
    dq_rows: int = 16
    dkv_rows: int = 16
    window: int | None = 2048
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_warps: int = 4
    dq_stages: int = 2
    dkv_warps: int = 4
    dkv_stages: int = 2

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class SelectConfig:
    """Tiles of the fused block selection (``select.py``).

    ``rows``: (token, query head) rows per program (tokens per program = rows // next_pow2(G));
    ``blocks_per_step``: key blocks scored per loop step (raised to the padded topk when that is larger);
    ``quad_split``: bf16 inputs multiply the float32 covariance statistics as bf16 hi + lo halves (three
    products instead of one, ~16 mantissa bits instead of 8); ``mean_split``: the same for the mean term (two
    products instead of one).
    ``presplit``: the block statistics come from a Triton kernel (``block_stats_kernel``) already scaled and
    rounded to their bf16 hi / lo halves, so the loop loads bf16 operands straight into the tensor-core
    tiles instead of loading float32 and splitting them in every program (bit-identical halves; bf16 inputs
    with the taylor1 / taylor2-diag scorers, else ignored). False: ``spla_lit.ops.block_key_stats``.
    ``relayout``: before the per-step top-k, the candidate keys move (an identity ``tl.gather``) into a plain
    layout, so the sort runs one key per thread instead of eight per thread (the tensor-core layout of the
    head reduction leaves them replicated across lanes).
    """

    rows: int = 128
    blocks_per_step: int = 32
    warps: int = 8
    stages: int = 3
    quad_split: bool = True
    mean_split: bool = True
    presplit: bool = False
    relayout: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, pow2=("rows", "blocks_per_step"))


@dataclass(frozen=True)
class LinearConfig:
    """Tiles of the chunked causal linear attention (``linear.py``) and the residual epilogue (``residual.py``).

    ``out_rows`` / ``out_warps`` / ``out_stages``: the output kernel's (token, head) rows per program and
    launch; ``dkdv_rows`` / ``dkdv_warps`` / ``dkdv_stages``: the key-gradient kernel's query rows per loop
    step and launch; ``super_target``: aim for at least this many (super-chunk, head) programs in the
    sequential state pass; ``scan_chunks`` / ``scan_block``: super-chunks per scan step and state elements
    per scan program; ``epilogue_rows``: (token, head) rows per program of the residual's backward epilogue;
    ``bwd_split``: bf16 inputs split the float32 operands of the backward products into hi + lo halves too
    (False: one bf16 product, faster, gradients ~1.2x less accurate).
    """

    out_rows: int = 64
    out_warps: int = 4
    out_stages: int = 3
    dkdv_rows: int = 64
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    super_target: int = 256
    scan_chunks: int = 16
    scan_block: int = 256
    epilogue_rows: int = 32
    bwd_split: bool = True

    def __post_init__(self) -> None:
        _check_fields(self, pow2=("out_rows", "dkdv_rows", "scan_chunks", "scan_block", "epilogue_rows"))


@dataclass(frozen=True)
class CombineConfig:
    """Tiles of the fused add-combine (``combine.py``), an elementwise kernel that fits every class (no table):
    ``rows`` (token, head) rows per program (capped at 8192 elements), ``warps`` the launch's ``num_warps``."""

    rows: int = 16
    warps: int = 4

    def __post_init__(self) -> None:
        _check_fields(self)


# ------------------------------------------------------------------------------------------------ the table
# (class, wide) -> config, or None where no tile fits the class's shared memory (the entry point then raises
# NotImplementedError and spla_lit.ops runs its reference). ``wide``: operands or tiles past the measured
# shape (each lookup below says which). sm90 narrow: the H100 sweeps. The rest is not timed: the sm90 tiles
# with fewer rows or stages where offline compilation (benchmarks/compile_tiles.py) found them overflowing.
# Sources and the compiled sizes: docs/kernels.md, "Tile table".

@dataclass(frozen=True)
class DecodeConfig:
    """Launch choices of the decode kernels (``decode.py``; one set for every device: the kernels are bound by
    fixed costs, not tiles). ``programs_per_sm``: splits are chosen so that about this many programs per SM run
    (flash-decoding: at batch 1 there are only Hkv rows of work); ``score_blocks``: blocks per scoring step;
    ``combine_splits``: attention splits the combine kernel reads at once."""

    programs_per_sm: int = 2
    score_blocks: int = 64
    score_warps: int = 4
    attn_warps: int = 4
    attn_stages: int = 2
    combine_splits: int = 16
    combine_warps: int = 4

    def __post_init__(self) -> None:
        _check_fields(self, pow2=("score_blocks", "combine_splits"))  # both are tile sizes (tl.arange)


def _with_default(table: dict) -> dict:
    """``table`` plus the ``default`` class (unknown GPUs): the entries of the class with the least shared
    memory, sm89."""
    return {**table, **{("default", wide): table["sm89", wide] for wide in (False, True)}}


_SPARSE = _with_default({
    ("sm90", False): SparseConfig(),
    ("sm90", True): SparseConfig(),
    ("sm80", False): SparseConfig(),
    ("sm80", True): SparseConfig(),
    ("sm89", False): SparseConfig(),
    ("sm89", True): None,  # float32 fused dK/dV: 120 KiB at one stage
})
_SELECT = _with_default({
    # presplit + relayout: the measured tiles, 40% fewer instructions per step offline (docs/kernels.md)
    ("sm90", False): SelectConfig(presplit=True, relayout=True),
    ("sm90", True): SelectConfig(rows=64, warps=4, stages=2),
    ("sm80", False): SelectConfig(),
    ("sm80", True): SelectConfig(rows=64, warps=4, stages=1),
    ("sm89", False): SelectConfig(rows=64, warps=4, stages=2),
    ("sm89", True): SelectConfig(rows=32, warps=4, stages=1),
})
_LINEAR = _with_default({
    ("sm90", False): LinearConfig(),
    ("sm90", True): LinearConfig(dkdv_rows=32, dkdv_stages=1),
    ("sm80", False): LinearConfig(),
    ("sm80", True): LinearConfig(dkdv_rows=32, dkdv_stages=1),
    # The key-gradient kernel holds the float32 reverse state [F, Dv] and its bf16 halves: 160 KiB at
    # F = Dv = 128 whatever its rows and stages.
    ("sm89", False): None,
    ("sm89", True): None,
})


def _entry(table: dict, family: str, arch: str, wide: bool, what: str):
    cfg = table[arch, wide]
    if cfg is None:
        raise NotImplementedError(f"no {family} tiles fit the shared memory of GPU class {arch} for {what} "
                                  "(spla_kernels.config; pass config= to force one)")
    return cfg


@functools.lru_cache(maxsize=16)
def _cuda_arch(index: int) -> str:
    cc = torch.cuda.get_device_capability(index)
    if cc == (9, 0):
        return "sm90"
    if cc in ((8, 0), (8, 7)):
        return "sm80"
    if cc in ((8, 6), (8, 9)) or cc[0] == 12:
        return "sm89"
    return "default"


def arch_of(device: torch.device | str) -> str:
    """The table's GPU class for ``device``; ``sm90`` for a CPU device (the Triton interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sm90"
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def sparse_config(arch: str, *, fused: bool, dtype: torch.dtype, dim: int, block_size: int) -> SparseConfig:
    """Table entry of the sparse kernels for GPU class ``arch`` (:func:`arch_of`): ``fused`` with the
    selected-linear term; ``dim`` the widest of the head, feature and value dims. Wide: float32 operands,
    ``dim > 128`` or ``block_size > 64``. NotImplementedError where the class has no entry."""
    del fused  # one entry serves both kernels today; the key stays so that they can diverge
    wide = dtype == torch.float32 or dim > 128 or block_size > 64
    return _entry(_SPARSE, "sparse-attention", arch, wide, f"{dtype}, dim {dim}, blocks of {block_size}")


def select_config(arch: str, *, dtype: torch.dtype, head_dim: int) -> SelectConfig:
    """Table entry of the fused selection for GPU class ``arch`` and q/k of ``dtype`` and ``head_dim``. Wide:
    other than bfloat16 inputs (the kernel multiplies float32 tf32x3 operands then) or ``head_dim > 128``."""
    wide = dtype != torch.bfloat16 or head_dim > 128
    return _entry(_SELECT, "selection", arch, wide, f"{dtype}, head dim {head_dim}")


def linear_config(arch: str, *, dtype: torch.dtype) -> LinearConfig:
    """Table entry of the linear-attention kernels for GPU class ``arch`` and inputs of ``dtype``. Wide: other
    than bfloat16 inputs (float32 operands). NotImplementedError where the class has no entry."""
    return _entry(_LINEAR, "linear-attention", arch, dtype != torch.bfloat16, str(dtype))
