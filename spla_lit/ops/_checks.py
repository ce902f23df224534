"""Argument checks shared by the functional ops.

Every public op validates its inputs before computing anything and raises ``ValueError`` naming the
offending argument, so a bad call fails loudly and early instead of deep inside a matmul.
"""

from __future__ import annotations

import torch

from ..options import Selection, check_choice, check_positive_int  # noqa: F401  (re-exported for the ops)
from .utils import sequence_segments

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bshd(name: str, x: object) -> torch.Tensor:
    """``x`` must be a floating tensor laid out ``[B, N, H, D]``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, N, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has an empty sequence dimension (N = 0)")
    return x


def check_qk(q: object, k: object, *, q_name: str = "q", k_name: str = "k") -> tuple[int, int, int, int, int]:
    """Check a query/key pair; return ``(B, N, Hq, Hkv, D)``."""
    q = check_bshd(q_name, q)
    k = check_bshd(k_name, k)
    if k.dtype != q.dtype:
        raise ValueError(f"{k_name}.dtype ({k.dtype}) must match {q_name}.dtype ({q.dtype})")
    if k.device != q.device:
        raise ValueError(f"{k_name} is on {k.device} but {q_name} is on {q.device}")
    B, N, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != N:
        raise ValueError(
            f"{k_name} has [B, N] = {list(k.shape[:2])} but {q_name} has {[B, N]}; they must match"
        )
    Hkv = k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"{k_name} head dim {k.shape[3]} must equal {q_name} head dim {D}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"{q_name} has {Hq} heads, which is not a multiple of the {Hkv} heads of {k_name} "
            "(grouped-query attention needs Hq % Hkv == 0)"
        )
    return B, N, Hq, Hkv, D


def check_values(v: object, k: torch.Tensor, *, v_name: str = "v", k_name: str = "k") -> torch.Tensor:
    v = check_bshd(v_name, v)
    if v.dtype != k.dtype:
        raise ValueError(f"{v_name}.dtype ({v.dtype}) must match {k_name}.dtype ({k.dtype})")
    if v.device != k.device:
        raise ValueError(f"{v_name} is on {v.device} but {k_name} is on {k.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{v_name} has [B, N, H] = {list(v.shape[:3])} but {k_name} has {list(k.shape[:3])}"
        )
    return v


def check_block_idx(
    block_idx: object, *, batch: int, kv_heads: int, num_q_blocks: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(block_idx, torch.Tensor):
        raise ValueError(f"block_idx must be a torch.Tensor, got {type(block_idx).__name__}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be int32 or int64, got {block_idx.dtype}")
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (batch, kv_heads, num_q_blocks):
        raise ValueError(
            f"block_idx must be [B, Hkv, nQ, topk] = [{batch}, {kv_heads}, {num_q_blocks}, topk], "
            f"got shape {tuple(block_idx.shape)}"
        )
    if block_idx.device != device:
        raise ValueError(f"block_idx is on {block_idx.device} but the inputs are on {device}")
    return block_idx


def check_selection(selection: object) -> Selection:
    """``selection`` must be a :class:`~spla_lit.options.Selection` (validated when it was built)."""
    if not isinstance(selection, Selection):
        raise ValueError(f"selection must be a spla_lit.options.Selection, got {type(selection).__name__}")
    return selection


def check_query_block(query_block: int, block_size: int) -> None:
    """A query block larger than one token must tile evenly with the KV blocks."""
    check_positive_int("block_size", block_size)
    check_positive_int("query_block", query_block)
    if query_block > 1 and query_block % block_size and block_size % query_block:
        raise ValueError(
            f"query_block ({query_block}) and block_size ({block_size}) must divide one another"
        )


def check_cu_seqlens(cu_seqlens: object, *, batch: int, n: int, query_block: int = 1) -> list[tuple[int, int]]:
    """Validate packed-sequence boundaries and return them as ``(start, end)`` pairs (see
    :func:`~spla_lit.ops.utils.sequence_segments`)."""
    if cu_seqlens is None:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S + 1] of cumulative sequence lengths")
    return list(sequence_segments(cu_seqlens, batch=batch, n=n, query_block=query_block))


def check_block_idx_values(block_idx: torch.Tensor, *, num_blocks: int) -> None:
    """The values of a selection ``block_idx [B, Hkv, nQ, topk]``: every row holds strictly ascending key block
    indices in ``[0, num_blocks)``, then ``-1`` padding. Costs one host read (public entry points only)."""
    valid = block_idx >= 0
    out_of_range = (block_idx < -1) | (block_idx >= num_blocks)
    padding_first = ~valid[..., :-1] & valid[..., 1:]
    not_ascending = valid[..., 1:] & (block_idx[..., 1:] <= block_idx[..., :-1])
    bad_range, bad_padding, bad_order = torch.stack(
        [out_of_range.any(), padding_first.any(), not_ascending.any()]).tolist()
    if bad_range:
        value = int(block_idx[out_of_range][0])
        raise ValueError(f"block_idx holds {value}, outside [-1, {num_blocks - 1}] (the {num_blocks} key blocks; "
                         "-1 pads a row)")
    if bad_padding:
        raise ValueError("block_idx: the -1 padding of a row must come after its selected blocks")
    if bad_order:
        raise ValueError("block_idx: each row must hold strictly ascending (so unique) block indices")
