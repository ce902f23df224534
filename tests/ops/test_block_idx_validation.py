"""block_sparse_attention checks block_idx's values (range, dtype, ascending, -1 padding last) by default."""

from __future__ import annotations

import pytest
import torch

from spla_lit import ops
from spla_lit.options import Selection


def _qkv(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, n, 2, 8, generator=g), torch.randn(1, n, 1, 8, generator=g),
            torch.randn(1, n, 1, 8, generator=g))


def _idx(rows: list[list[int]], n: int = 32) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32).expand(n, -1)[None, None].contiguous()  # [1, 1, N, topk]


@pytest.mark.parametrize(("rows", "message"), [
    ([[0, 4]], r"block_idx holds 4, outside \[-1, 3\] \(the 4 key blocks"),
    ([[0, -2]], r"block_idx holds -2, outside"),
    ([[-1, 0]], r"-1 padding of a row must come after its selected blocks"),
    ([[1, 0]], r"strictly ascending"),
    ([[0, 0]], r"strictly ascending"),
])
def test_bad_block_idx_values_are_refused_naming_the_problem(rows, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        ops.block_sparse_attention(q, k, v, _idx(rows), block_size=8)


def test_block_idx_dtype_is_checked():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_idx must be int32 or int64"):
        ops.block_sparse_attention(q, k, v, _idx([[0, 1]]).float(), block_size=8)


def test_valid_selections_pass_and_validate_false_skips_the_check():
    q, k, v = _qkv()
    idx = ops.select_blocks(torch.randn(1, 1, 32, 4), Selection(block_size=8, topk=2))
    out = ops.block_sparse_attention(q, k, v, idx, block_size=8)  # from select_blocks: valid, -1 padded
    assert torch.isfinite(out).all()
    padded = _idx([[0, -1]])
    ops.block_sparse_attention(q, k, v, padded, block_size=8)
    unsorted = _idx([[1, 0]])
    with pytest.raises(ValueError, match="ascending"):
        ops.block_sparse_attention(q, k, v, unsorted, block_size=8)
    torch.testing.assert_close(  # unchecked (validate=False), the reference masks the same keys
        ops.block_sparse_attention(q, k, v, unsorted, block_size=8, validate=False, impl="reference"),
        ops.block_sparse_attention(q, k, v, _idx([[0, 1]]), block_size=8, impl="reference"))
