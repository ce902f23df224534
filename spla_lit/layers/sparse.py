"""The exact block-sparse attention component (config group ``sparse/``)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._checks import check_choice, check_positive_int, check_query_block

SPARSE_MODES = ("topk", "window")


class BlockSparseAttention(nn.Module):
    """Holds the selection geometry and runs exact attention on the selected blocks.

    ``mode="topk"``: the scorer picks ``topk`` blocks per token (forced local and sink blocks included).
    ``mode="window"``: no scorer, only the ``local_blocks`` most recent blocks and the sinks (a sliding
    window baseline: with RLA it becomes window attention plus linear attention over everything else).
    """

    def __init__(self, block_size: int = 64, topk: int = 16, query_block: int = 1, local_blocks: int = 1,
                 sink_blocks: int = 0, mode: str = "topk", layer_idx: int = 0, impl: str = "auto") -> None:
        super().__init__()
        check_query_block(query_block, block_size)
        self.block_size, self.query_block = block_size, query_block
        self.topk = check_positive_int("sparse.topk", topk)
        self.local_blocks = check_positive_int("sparse.local_blocks", local_blocks)
        self.sink_blocks = check_positive_int("sparse.sink_blocks", sink_blocks, minimum=0)
        self.mode = check_choice("sparse.mode", mode, SPARSE_MODES)
        self.impl = impl
        need = ops.min_topk(block_size=block_size, query_block=query_block, local_blocks=local_blocks,
                            sink_blocks=sink_blocks)
        if mode == "topk" and topk < need:
            raise ValueError(f"sparse.topk ({topk}) is smaller than the {need} forced blocks "
                             f"(sparse.local_blocks={local_blocks}, sparse.sink_blocks={sink_blocks})")
        if mode == "window":
            self.topk = need

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor, scorer: nn.Module | None,
               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Block indices int32 [B, Hkv, nQ, topk] for q [B, N, Hq, D], k [B, N, Hkv, D]."""
        geometry = dict(block_size=self.block_size, topk=self.topk, query_block=self.query_block,
                        local_blocks=self.local_blocks, sink_blocks=self.sink_blocks, cu_seqlens=cu_seqlens)
        if self.mode == "topk":
            if scorer is None:
                raise ValueError("sparse.mode=topk needs a scorer")
            return scorer(q, k, **geometry)
        B, N, _, _ = q.shape
        nQ, nK = -(-N // self.query_block), -(-N // self.block_size)
        if cu_seqlens is not None:
            nK = -(-int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) // self.block_size)
        scores = torch.zeros(B, k.shape[2], nQ, nK, device=q.device)
        return ops.select_blocks(scores, **geometry)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None,
                return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact attention over the selected blocks: (o [B, N, Hq, D], lse [B, Hq, N] or None)."""
        out = ops.block_sparse_attention(q, k, v, block_idx, block_size=self.block_size,
                                         query_block=self.query_block, return_lse=return_lse,
                                         cu_seqlens=cu_seqlens, impl=self.impl,
                                         validate=False)  # a selection of select_blocks: no host read
        return out if return_lse else (out, None)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, block_size={self.block_size}, topk={self.topk}, query_block={self.query_block}, "
                f"local_blocks={self.local_blocks}, sink_blocks={self.sink_blocks}")
