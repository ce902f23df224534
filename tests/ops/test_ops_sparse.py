"""block_sparse_attention: dense equivalence, masked-softmax equivalence, packed sequences, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    all_blocks_idx,
    assert_close,
    cdiv,
    dense_causal_reference,
    dense_selected_mask,
    rand_qkv,
    random_block_idx,
    repeat_kv,
)

from spla_lit.ops import Selection, block_sparse_attention, score_and_select, select_blocks

# (B, N, Hq, Hkv, D, block_size): partial last blocks, GQA and MHA, a block larger than the sequence.
SHAPES = [
    (2, 37, 4, 2, 16, 8),
    (1, 32, 2, 2, 8, 4),
    (2, 13, 4, 4, 8, 16),
    (1, 29, 4, 1, 8, 4),
]
DTYPES = [torch.float32, torch.bfloat16]


def _sdpa_causal(q, k, v):
    G = q.shape[2] // k.shape[2]
    qq, kk, vv = (x.float().transpose(1, 2) for x in (q, repeat_kv(k, G), repeat_kv(v, G)))
    return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_block", [1, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_all_blocks_selected_is_dense_causal(shape, query_block, dtype):
    B, N, Hq, Hkv, D, bs = shape
    seed = 10 * sum(shape) + query_block
    q, k, v = rand_qkv(B, N, Hq, Hkv, D, dtype, seed=seed)
    idx = all_blocks_idx(B, Hkv, cdiv(N, query_block), cdiv(N, bs))
    o, lse = block_sparse_attention(q, k, v, idx, block_size=bs, query_block=query_block, return_lse=True)
    assert o.dtype == dtype and o.shape == (B, N, Hq, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, N)
    assert_close(o, _sdpa_causal(q, k, v), dtype=dtype)
    _, lse_ref = dense_causal_reference(q, k, v)
    assert_close(lse, lse_ref, dtype=dtype)
    o2 = block_sparse_attention(q, k, v, idx, block_size=bs, query_block=query_block)
    assert_close(o2, _sdpa_causal(q, k, v), dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_select_blocks_with_large_topk_is_dense(shape):
    """The -1-padded selection that select_blocks returns for topk >= nK is also exactly dense attention."""
    B, N, Hq, Hkv, D, bs = shape
    q, k, v = rand_qkv(B, N, Hq, Hkv, D, seed=N + bs)
    nK = cdiv(N, bs)
    idx = score_and_select(q, k, Selection(block_size=bs, topk=nK + 2))
    assert (idx[..., -2:] == -1).all()
    o, lse = block_sparse_attention(q, k, v, idx, block_size=bs, return_lse=True)
    o_ref, lse_ref = dense_causal_reference(q, k, v)
    assert_close(o, o_ref)
    assert_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("query_block", "block_size", "topk"), [(1, 4, 3), (4, 4, 3), (2, 4, 2), (8, 4, 4),
                                                                        (1, 1, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_masked_softmax(query_block, block_size, topk, dtype, seed):
    B, N, Hq, Hkv, D = 2, 30, 4, 2, 8
    q, k, v = rand_qkv(B, N, Hq, Hkv, D, dtype, seed=100 + seed, Dv=6)
    idx = random_block_idx(B, Hkv, N, block_size, topk, seed=seed, query_block=query_block)
    o, lse = block_sparse_attention(q, k, v, idx, block_size=block_size, query_block=query_block, return_lse=True)
    mask = dense_selected_mask(idx, N, block_size, query_block)
    o_ref, lse_ref = dense_causal_reference(q, k, v, mask=mask)
    assert o.shape == (B, N, Hq, 6)
    assert_close(o, o_ref, dtype=dtype)
    assert_close(lse, lse_ref, dtype=dtype)
    # without return_lse the op may take another path (fused SDPA): same result
    o2 = block_sparse_attention(q, k, v, idx, block_size=block_size, query_block=query_block)
    assert o2.dtype == dtype and o2.shape == o.shape
    assert_close(o2, o_ref, dtype=dtype)


def test_custom_scale():
    q, k, v = rand_qkv(1, 19, 2, 1, 8, seed=5)
    idx = random_block_idx(1, 1, 19, 4, 2, seed=5)
    o, lse = block_sparse_attention(q, k, v, idx, block_size=4, scale=0.7, return_lse=True)
    o_ref, lse_ref = dense_causal_reference(q, k, v, scale=0.7, mask=dense_selected_mask(idx, 19, 4))
    assert_close(o, o_ref)
    assert_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[5, 11, 16], [9, 1, 7], [23]])
def test_packed_equals_separate(lengths, dtype):
    N, Hq, Hkv, D, bs, topk = sum(lengths), 4, 2, 8, 4, 2
    q, k, v = rand_qkv(1, N, Hq, Hkv, D, dtype, seed=len(lengths) * 7 + N)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    starts = cu[:-1].tolist()
    idx = torch.cat([score_and_select(q[:, s:s + n], k[:, s:s + n], Selection(block_size=bs, topk=topk))
                     for s, n in zip(starts, lengths)], dim=2)
    o, lse = block_sparse_attention(q, k, v, idx, block_size=bs, cu_seqlens=cu, return_lse=True)
    for s, n in zip(starts, lengths):
        o_s, lse_s = block_sparse_attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], idx[:, :, s:s + n],
                                            block_size=bs, return_lse=True)
        torch.testing.assert_close(o[:, s:s + n], o_s, rtol=0, atol=0)
        torch.testing.assert_close(lse[:, :, s:s + n], lse_s, rtol=0, atol=0)
    # Packing must isolate sequences: the result differs from attending over the whole packed row.
    if len(lengths) > 1:
        flat_idx = score_and_select(q, k, Selection(block_size=bs, topk=topk))
        o_flat = block_sparse_attention(q, k, v, flat_idx, block_size=bs)
        assert not torch.allclose(o[:, lengths[0]:].float(), o_flat[:, lengths[0]:].float())


def test_packed_all_blocks_equals_dense_per_sequence():
    lengths = [7, 12, 6]
    N, bs = sum(lengths), 4
    q, k, v = rand_qkv(1, N, 2, 2, 8, seed=3)
    cu = torch.tensor([0, 7, 19, 25])
    idx = torch.cat([all_blocks_idx(1, 2, n, 3) for n in lengths], dim=2)
    o = block_sparse_attention(q, k, v, idx, block_size=bs, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert_close(o[:, s:e], _sdpa_causal(q[:, s:e], k[:, s:e], v[:, s:e]))


@pytest.mark.parametrize(("N", "block_size", "query_block", "Hq", "Hkv"), [(9, 2, 1, 2, 1), (11, 4, 1, 2, 2),
                                                                            (12, 3, 3, 2, 1)])
def test_gradcheck(N, block_size, query_block, Hq, Hkv):
    q, k, v = rand_qkv(1, N, Hq, Hkv, 4, torch.float64, seed=N, requires_grad=True)
    idx = random_block_idx(1, Hkv, N, block_size, 2, seed=N, query_block=query_block)

    def f(q, k, v):
        return block_sparse_attention(q, k, v, idx, block_size=block_size, query_block=query_block, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_float64_stays_float64():
    q, k, v = rand_qkv(1, 10, 2, 1, 4, torch.float64, seed=1)
    idx = select_blocks(torch.zeros(1, 1, 10, 3), Selection(topk=2, block_size=4))
    o, lse = block_sparse_attention(q, k, v, idx, block_size=4, return_lse=True)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    o_ref, lse_ref = dense_causal_reference(q, k, v, mask=dense_selected_mask(idx, 10, 4))
    assert_close(o, o_ref, dtype=torch.float64)
    assert_close(lse, lse_ref, dtype=torch.float64)
