"""Fused block scoring + top-k (``spla_kernels.select``) against ``select_blocks(block_scores(...))``.

Runs on CPU under the Triton interpreter at tiny shapes (tests/kernels/conftest.py); buffers poisoned.
Random inputs make score ties unlikely; where a row still differs, the two selections must have the same
reference scores (a tie broken the other way), never a worse pick.
"""

import pytest
import torch

import spla_kernels.select as sel
from spla_kernels.config import SelectConfig
from spla_lit.ops import block_scores, score_and_select, select_blocks
from spla_lit.options import Selection

POISONED = (sel,)


def _assert_same_selection(got: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
    assert got.dtype == torch.int32 and got.shape == ref.shape and got.shape[-1] == topk
    valid = got >= 0
    assert ((got >= -1) & (got < scores.shape[-1])).all()
    # Ascending, -1 padding only at the end, same number of picks as the reference.
    assert (valid[..., :-1] | ~valid[..., 1:]).all()
    g = torch.where(valid, got, torch.iinfo(torch.int32).max)
    assert (g[..., 1:] > g[..., :-1])[valid[..., 1:]].all()
    assert torch.equal(valid.sum(-1), (ref >= 0).sum(-1))
    same = (got == ref).all(-1)
    assert same.float().mean() > 0.9
    # Differing rows: equal reference scores (forced blocks are +inf in both).
    s = scores.masked_fill(torch.isinf(scores), 1e4)

    def picked(idx):
        return torch.where(idx >= 0, s.gather(-1, idx.clamp(min=0).long()), 0).sort(-1).values

    assert torch.allclose(picked(got), picked(ref), atol=1e-4, rtol=1e-5)


def _check(B, N, Hq, Hkv, D, dtype, *, cu=None, seed=0, config=None, **selection):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g).to(dtype)
    k = (torch.randn(B, N, Hkv, D, generator=g) * torch.rand(D, generator=g) * 2).to(dtype)  # uneven variances
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    s = Selection(**selection)
    got = sel.select_blocks_fused(q, k, s, cu_seqlens=cu_t, config=config)
    scores = block_scores(q, k, s, cu_seqlens=cu_t)
    ref = select_blocks(scores, s, cu_seqlens=cu_t)
    _assert_same_selection(got, ref, scores, s.topk)
    return got


def test_taylor2_diag_float32_gqa():
    # N = 200 ends in a partial block; long enough that top-k really drops blocks.
    got = _check(1, 200, 4, 2, 32, torch.float32, block_size=16, topk=5)
    assert (got >= 0).sum(-1).max() == 5
    assert (got[:, :, 0, 0] == 0).all() and (got[:, :, 0, 1:] == -1).all()  # token 0 sees block 0 only


def test_taylor1_max_bf16_batch_local_sink():
    # B = 2, G = 1, two local blocks and a sink block forced in.
    got = _check(2, 150, 2, 2, 16, torch.bfloat16, block_size=8, topk=6, local_blocks=2, sink_blocks=1,
                 scorer="taylor1", head_reduce="max")
    t = torch.arange(150)
    diag = t // 8
    # Forced: the diagonal block, the one before it, and block 0.
    for b in (diag, (diag - 1).clamp(min=0), torch.zeros_like(diag)):
        assert (got == b[None, None, :, None]).any(-1).all()


def test_lowrank_mean_packed():
    # cu_seqlens: local block indices, a one-token and a short sequence, rank-3 covariance, mean over heads.
    _check(1, 160, 4, 2, 16, torch.bfloat16, block_size=16, topk=4, sink_blocks=1, scorer="taylor2",
           covariance="lowrank", rank=3, head_reduce="mean", cu=[0, 1, 40, 160])


def test_packed_odd_group_padding():
    # G = 3 (rows padded to 4 per token), topk larger than the short sequences' block counts: -1 padding.
    got = _check(1, 300, 3, 1, 32, torch.bfloat16, block_size=16, topk=12, cu=[0, 17, 200, 300])
    assert (got[0, 0, :17, 2:] == -1).all()  # the first sequence has 2 blocks


def test_packed_equal_lengths_and_causal():
    # Two sequences of one length share one statistics call; a third differs. Changing the last tokens moves
    # no earlier token's selection.
    _check(1, 150, 2, 1, 16, torch.float32, block_size=8, topk=3, cu=[0, 40, 80, 150], seed=9)
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 150, 2, 16, generator=g), torch.randn(1, 150, 1, 16, generator=g)
    cu = torch.tensor([0, 40, 80, 150], dtype=torch.int32)
    q2, k2 = q.clone(), k.clone()
    q2[:, 120:], k2[:, 120:] = torch.randn(1, 30, 2, 16, generator=g), torch.randn(1, 30, 1, 16, generator=g)
    first, again = (sel.select_blocks_fused(a, b, Selection(block_size=8, topk=3), cu_seqlens=cu)
                    for a, b in ((q, k), (q2, k2)))
    assert torch.equal(first[:, :, :120], again[:, :, :120]) and not torch.equal(first, again)


def test_dispatch_through_op():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 96, 2, 16, generator=g), torch.randn(1, 96, 1, 16, generator=g)
    selection = Selection(block_size=8, topk=4, scorer="taylor2", covariance="diag")
    got = score_and_select(q, k, selection, impl="triton")
    ref = score_and_select(q, k, selection, impl="reference")
    assert torch.equal(got, ref)


def test_scale_and_tile_configs():
    # An explicit softmax scale, the single-product covariance term, other tiles (BN > padded topk, 2 tokens per
    # program) and the table entries of the smallest-memory class: all pick the reference's blocks.
    from spla_kernels.config import _SELECT

    for config in (SelectConfig(rows=8, blocks_per_step=16, warps=2, stages=1, quad_split=False),
                   _SELECT["default", False], _SELECT["default", True]):
        _check(1, 130, 4, 1, 16, torch.bfloat16, block_size=8, topk=5, scale=0.3, config=config)


def test_unsupported_and_invalid():
    q, k = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 1, 16)
    for unsupported in (Selection(block_size=8, topk=2, query_block=8),
                        Selection(block_size=8, topk=2, scorer="oracle"),
                        Selection(block_size=8, topk=2, scorer="random"),
                        Selection(block_size=8, topk=2, covariance="full"),
                        Selection(block_size=8, topk=2, local_blocks=2, mode="window")):
        with pytest.raises(NotImplementedError):
            sel.select_blocks_fused(q, k, unsupported)
    with pytest.raises(NotImplementedError, match="group"):  # more query heads per KV head than rows per program
        sel.select_blocks_fused(torch.randn(1, 32, 4, 16), k, Selection(block_size=8, topk=2),
                                config=SelectConfig(rows=2))
    with pytest.raises(TypeError, match="selection"):
        sel.select_blocks_fused(q, k, dict(block_size=8, topk=2))
    with pytest.raises(ValueError, match="heads"):
        sel.select_blocks_fused(torch.randn(1, 32, 3, 16), torch.randn(1, 32, 2, 16), Selection(block_size=8, topk=2))
    with pytest.raises(ValueError, match="dtype"):
        sel.select_blocks_fused(q, k.double(), Selection(block_size=8, topk=2))
