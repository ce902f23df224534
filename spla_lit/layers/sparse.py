"""The block geometry of a layer's selection (config group ``sparse/``)."""

from __future__ import annotations

from torch import nn

from ..options import Selection


class BlockSparseAttention(nn.Module):
    """Holds the selection geometry of an SPLA layer as a validated :class:`~spla_lit.options.Selection`
    (:attr:`selection`; its scorer fields are set by the layer's :class:`~spla_lit.layers.BlockScorer`).

    ``mode="topk"``: the scorer picks ``topk`` blocks per token (forced local and sink blocks included).
    ``mode="window"``: no scorer, only the ``local_blocks`` most recent blocks and the sinks (a sliding
    window baseline: with RLA it becomes window attention plus linear attention over everything else);
    ``topk`` is ignored.
    """

    def __init__(self, block_size: int = 64, topk: int = 16, query_block: int = 1, local_blocks: int = 1,
                 sink_blocks: int = 0, mode: str = "topk", layer_idx: int = 0) -> None:
        super().__init__()
        self.selection = Selection(block_size=block_size, topk=topk, query_block=query_block,
                                   local_blocks=local_blocks, sink_blocks=sink_blocks, mode=mode)

    @property
    def mode(self) -> str:
        return self.selection.mode

    @property
    def block_size(self) -> int:
        return self.selection.block_size

    @property
    def topk(self) -> int:
        """Blocks per query (block): ``topk``, or the window's forced blocks in ``window`` mode."""
        return self.selection.k

    @property
    def query_block(self) -> int:
        return self.selection.query_block

    @property
    def local_blocks(self) -> int:
        return self.selection.local_blocks

    @property
    def sink_blocks(self) -> int:
        return self.selection.sink_blocks

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, block_size={self.block_size}, topk={self.topk}, query_block={self.query_block}, "
                f"local_blocks={self.local_blocks}, sink_blocks={self.sink_blocks}")
