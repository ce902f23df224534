"""Shape helpers shared by the ops, the layers and the Triton launchers (``spla_kernels``): integer
arithmetic, the accumulation dtype, the grouped-query head layout, and the bookkeeping of packed sequences
(``cu_seqlens``, flash-attn convention)."""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """Smallest power of two ``>= max(1, x)`` (Triton block shapes must be powers of two)."""
    return 1 << (max(1, int(x)) - 1).bit_length()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradient checks), everything else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_heads(x: torch.Tensor, kv_heads: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, N, H, D] -> [B, Hkv, G, N, D]`` (a view when no cast is needed); query head ``h`` belongs to KV
    head ``h // G``. ``dtype`` defaults to :func:`acc_dtype`."""
    B, N, H, D = x.shape
    return x.to(dtype or acc_dtype(x)).view(B, N, kv_heads, H // kv_heads, D).permute(0, 2, 3, 1, 4)


def ungroup_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, G, N, D] -> [B, N, Hkv * G, D]``, the inverse of :func:`group_heads`."""
    B, Hkv, G, N, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, N, Hkv * G, D)


def sequence_segments(cu_seqlens: torch.Tensor | None, *, batch: int, n: int,
                      query_block: int = 1) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of every sequence on the flattened token axis ``[B * N]``.

    Without ``cu_seqlens`` each row is one sequence. With it, ``cu_seqlens`` is int32/int64 ``[S + 1]``,
    ``cu[0] == 0``, ``cu[S] == N``, strictly increasing; packed inputs have ``B == 1`` and selection is per
    token (``query_block == 1``). Raises ``ValueError`` naming ``cu_seqlens`` otherwise. Reads the tensor on
    the host (one sync): call it once per op.
    """
    if cu_seqlens is None:
        return tuple((b * n, (b + 1) * n) for b in range(batch))
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S + 1] of cumulative sequence lengths")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with B == 1, got B = {batch}")
    if query_block != 1:
        raise ValueError(f"cu_seqlens needs query_block == 1, got {query_block}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != n or any(e <= s for s, e in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, end at N = {n} and strictly increase, got {cu}")
    return tuple(zip(cu[:-1], cu[1:]))


def sequence_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the packed sequence each of the ``n`` tokens belongs to, int64 ``[N]`` (no host sync)."""
    idx = torch.arange(n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)


def positions_in_sequence(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Position of each packed token inside its own sequence, int64 ``[N]`` (RoPE positions)."""
    return torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[sequence_ids(cu_seqlens, n)]
