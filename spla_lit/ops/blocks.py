"""Block bookkeeping shared by the ops: which key blocks each query block can see, and the
per-token view of a block selection.

Conventions: key blocks are ``block_size`` tokens, query blocks ``query_block`` tokens; the last of
either may be partial. Query block ``t`` covers tokens ``[t * query_block, min((t+1) * query_block, N))``
and may see key block ``b`` iff ``b * block_size <= last token of the query block``.
"""

from __future__ import annotations

import torch

from .utils import cdiv


def num_blocks(n: int, block_size: int) -> int:
    return cdiv(n, block_size)


def diagonal_blocks(num_q_blocks: int, num_k_blocks: int, query_block: int, block_size: int,
                    device: torch.device | None = None) -> torch.Tensor:
    """Index of the last key block each query block can see (the block holding its last token). [nQ]"""
    t = torch.arange(num_q_blocks, device=device)
    last_token = (t + 1) * query_block - 1
    return torch.clamp(last_token // block_size, max=num_k_blocks - 1)


def visible_blocks(num_q_blocks: int, num_k_blocks: int, query_block: int, block_size: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Bool [nQ, nK]: key block b is causally visible to query block t."""
    diag = diagonal_blocks(num_q_blocks, num_k_blocks, query_block, block_size, device)
    return torch.arange(num_k_blocks, device=device)[None, :] <= diag[:, None]


def forced_blocks(num_q_blocks: int, num_k_blocks: int, query_block: int, block_size: int,
                  local_blocks: int, sink_blocks: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [nQ, nK]: blocks always kept: the ``local_blocks`` most recent visible blocks, every block
    overlapping the query block itself, and the first ``sink_blocks`` blocks (when visible)."""
    t = torch.arange(num_q_blocks, device=device)
    diag = diagonal_blocks(num_q_blocks, num_k_blocks, query_block, block_size, device)
    first = (t * query_block) // block_size
    return _forced(first, diag, num_k_blocks, local_blocks, sink_blocks)


def _forced(first: torch.Tensor, diag: torch.Tensor, num_k_blocks: int, local_blocks: int,
            sink_blocks: int) -> torch.Tensor:
    """Bool [..., nK] forced blocks of query blocks whose first / last token lie in blocks ``first`` / ``diag``."""
    lo = torch.clamp(torch.minimum(first, diag - local_blocks + 1), min=0)
    b = torch.arange(num_k_blocks, device=diag.device)
    visible = b <= diag[..., None]
    return visible & ((b >= lo[..., None]) | (b < sink_blocks))


def position_block_masks(positions: torch.Tensor, num_k_blocks: int, block_size: int, local_blocks: int,
                         sink_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forced, visible)``, bool [..., nK], for single-token queries at ``positions`` [...] (any shape, e.g. a
    KV cache's per-row positions [B, T]): the rules of :func:`forced_blocks` / :func:`visible_blocks` with
    ``query_block == 1``, for queries that are not at ``arange(N)``."""
    diag = positions.long() // block_size
    visible = torch.arange(num_k_blocks, device=positions.device) <= diag[..., None]
    return _forced(diag, diag, num_k_blocks, local_blocks, sink_blocks), visible


def token_block_idx(block_idx: torch.Tensor, n: int, query_block: int) -> torch.Tensor:
    """Expand a selection ``[B, Hkv, nQ, topk]`` to one row per token ``[B, Hkv, N, topk]``."""
    if query_block == 1:
        return block_idx
    return block_idx.repeat_interleave(query_block, dim=2)[:, :, :n]


def selected_key_mask(block_idx: torch.Tensor, n: int, block_size: int, query_block: int) -> torch.Tensor:
    """Dense bool mask ``[B, Hkv, N, N]``: key j is selected for query i and ``j <= i``.

    O(N^2) memory: for references and tests, never on a fast path.
    """
    B, H, _, _ = block_idx.shape
    nK = num_blocks(n, block_size)
    tok = token_block_idx(block_idx, n, query_block).long()
    chosen = torch.zeros(B, H, n, nK + 1, dtype=torch.bool, device=block_idx.device)
    # -1 padding lands in the spare column nK, which is dropped.
    chosen.scatter_(-1, torch.where(tok < 0, nK, tok), True)
    key_block = torch.arange(n, device=block_idx.device) // block_size
    mask = chosen[..., key_block]  # [B, H, N, N]
    causal = torch.ones(n, n, dtype=torch.bool, device=block_idx.device).tril()
    return mask & causal


def selected_causal_counts(block_idx: torch.Tensor, n: int, block_size: int, query_block: int) -> torch.Tensor:
    """Number of selected keys ``j <= i`` for each token i, exactly, as int64 ``[B, Hkv, N]``.

    Lets the residual be set to exactly zero where nothing is left unselected, instead of leaving
    the rounding noise of ``global - selected``.
    """
    tok = token_block_idx(block_idx, n, query_block).long()
    i = torch.arange(n, device=block_idx.device)[None, None, :, None]
    start = tok * block_size
    end = torch.clamp(torch.minimum(start + block_size - 1, i), max=n - 1)
    count = torch.clamp(end - start + 1, min=0)
    return torch.where(tok >= 0, count, 0).sum(-1)


def union_tiles(block_idx: torch.Tensor, n: int, block_size: int, query_block: int,
                tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group queries into tiles of ``tile`` tokens and list the union of their selected blocks.

    Returns ``(blocks [B, Hkv, nT, U], member [B, Hkv, nT, tile, U])``: the union's block indices (padded
    with 0 where a tile's union is smaller than the largest, U) and whether each token of the tile
    selected each union block (False for padding). A tile reads only blocks that one of its tokens
    selected; per-token masks keep each token's own selection (the loading scheme of the kernels).
    """
    B, H, _, _ = block_idx.shape
    nK, nT = num_blocks(n, block_size), cdiv(n, tile)
    tok = token_block_idx(block_idx, n, query_block).long()
    tok = torch.nn.functional.pad(tok, (0, 0, 0, nT * tile - n), value=-1)
    chosen = torch.zeros(B, H, nT * tile, nK + 1, dtype=torch.bool, device=block_idx.device)
    chosen.scatter_(-1, torch.where(tok < 0, nK, tok), True)
    chosen = chosen[..., :nK].view(B, H, nT, tile, nK)
    union = chosen.any(3)  # [B, H, nT, nK]
    width = max(int(union.sum(-1).max()), 1)
    present, blocks = union.to(torch.int8).topk(width, dim=-1)
    member = chosen.gather(-1, blocks[:, :, :, None, :].expand(B, H, nT, tile, width))
    return blocks, member & present.bool()[:, :, :, None, :]
