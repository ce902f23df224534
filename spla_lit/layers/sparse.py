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

    # The geometry, read from the Selection (read-only: the layer built its own Selection from it).
    mode = property(lambda self: self.selection.mode)
    block_size = property(lambda self: self.selection.block_size)
    query_block = property(lambda self: self.selection.query_block)
    local_blocks = property(lambda self: self.selection.local_blocks)
    sink_blocks = property(lambda self: self.selection.sink_blocks)
    topk = property(lambda self: self.selection.k, doc="Blocks per query (block): ``topk``, or the window's forced "
                                                       "blocks in ``window`` mode.")

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, block_size={self.block_size}, topk={self.topk}, query_block={self.query_block}, "
                f"local_blocks={self.local_blocks}, sink_blocks={self.sink_blocks}")
