"""select_blocks / score_and_select: forced blocks, ordering and padding, brute-force equivalence."""

from __future__ import annotations

import pytest
import torch
from reference import cdiv, rand_qkv

from spla_lit.ops import Selection, block_scores, min_topk, score_and_select, select_blocks


def _brute_force_row(scores_row, t, *, topk, block_size, query_block, local_blocks, sink_blocks):
    """One row of the selection, written from `docs/spla.md` §2 in plain Python."""
    nK = len(scores_row)
    first_tok, last_tok = t * query_block, (t + 1) * query_block - 1
    diag = min(last_tok // block_size, nK - 1)
    visible = range(diag + 1)
    lo = max(0, min(first_tok // block_size, diag - local_blocks + 1))
    forced = {b for b in visible if b >= lo or b < sink_blocks}
    cands = [b for b in visible if b not in forced and scores_row[b] == scores_row[b] and scores_row[b] > -1e300]
    cands.sort(key=lambda b: -scores_row[b])
    chosen = sorted(forced | set(cands[: max(0, topk - len(forced))]))
    return chosen + [-1] * (topk - len(chosen))


def _brute_force(scores, **kw):
    B, H, nQ, nK = scores.shape
    out = torch.empty(B, H, nQ, kw["topk"], dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for t in range(nQ):
                out[b, h, t] = torch.tensor(_brute_force_row(scores[b, h, t].tolist(), t, **kw))
    return out


def _visible(nQ, nK, block_size, query_block):
    last = (torch.arange(nQ) + 1) * query_block - 1
    return torch.arange(nK)[None, :] <= torch.clamp(last // block_size, max=nK - 1)[:, None]


CONFIGS = [  # (N, block_size, query_block, topk, local_blocks, sink_blocks)
    (37, 4, 1, 3, 1, 0),
    (37, 4, 1, 4, 2, 1),
    (40, 8, 1, 2, 1, 1),
    (33, 4, 4, 3, 1, 0),
    (30, 4, 2, 3, 2, 1),
    (33, 2, 8, 6, 1, 1),
    (29, 4, 8, 5, 3, 0),
    (12, 4, 1, 8, 1, 0),  # fewer visible blocks than topk everywhere
]


def _random_scores(B, H, N, block_size, query_block, seed, p_neg_inf=0.0):
    nQ, nK = cdiv(N, query_block), cdiv(N, block_size)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, nQ, nK, generator=g)
    if p_neg_inf:
        scores[torch.rand(B, H, nQ, nK, generator=g) < p_neg_inf] = float("-inf")
    return scores.masked_fill(~_visible(nQ, nK, block_size, query_block), float("-inf"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("N", "block_size", "query_block", "topk", "local_blocks", "sink_blocks"), CONFIGS)
def test_select_blocks_matches_brute_force(N, block_size, query_block, topk, local_blocks, sink_blocks, seed):
    B, H = 2, 2
    scores = _random_scores(B, H, N, block_size, query_block, seed * 1000 + N)
    scores[0, 0, -1, 0] = float("nan")  # a NaN score is never picked (unless forced)
    kw = dict(topk=topk, block_size=block_size, query_block=query_block, local_blocks=local_blocks,
              sink_blocks=sink_blocks)
    idx = select_blocks(scores, Selection(**kw))
    assert idx.dtype == torch.int32 and idx.shape == (B, H, cdiv(N, query_block), topk)
    assert torch.equal(idx.long(), _brute_force(scores, **kw))


def test_select_blocks_matches_brute_force_with_neg_inf_scores():
    """Visible candidates scored -inf are ruled out: the selection holds fewer than topk blocks then."""
    for N, block_size, query_block, topk, local_blocks, sink_blocks in CONFIGS:
        kw = dict(topk=topk, block_size=block_size, query_block=query_block, local_blocks=local_blocks,
                  sink_blocks=sink_blocks)
        for seed in range(3):
            scores = _random_scores(2, 2, N, block_size, query_block, seed * 1000 + N, p_neg_inf=0.3)
            assert torch.equal(select_blocks(scores, Selection(**kw)).long(), _brute_force(scores, **kw)), (kw, seed)


@pytest.mark.parametrize(("N", "block_size", "query_block", "topk", "local_blocks", "sink_blocks"), CONFIGS)
def test_selection_invariants(N, block_size, query_block, topk, local_blocks, sink_blocks):
    """Forced blocks present even when they score worst (-inf), ascending, unique, -1 padding only at the end,
    only visible blocks, and every visible block when they fit."""
    B, H = 1, 2
    q, k, _ = rand_qkv(B, N, 4, H, 8, seed=N)
    nQ, nK = cdiv(N, query_block), cdiv(N, block_size)
    kw = dict(topk=topk, block_size=block_size, query_block=query_block, local_blocks=local_blocks,
              sink_blocks=sink_blocks)
    scores = block_scores(q, k, Selection(block_size=block_size, query_block=query_block))
    vis = _visible(nQ, nK, block_size, query_block)
    # make the forced blocks the worst candidates
    adversarial = scores.clone()
    for t in range(nQ):
        diag = min(((t + 1) * query_block - 1) // block_size, nK - 1)
        lo = max(0, min(t * query_block // block_size, diag - local_blocks + 1))
        adversarial[..., t, lo:diag + 1] = float("-inf")
        adversarial[..., t, :min(sink_blocks, diag + 1)] = float("-inf")
    for s in (scores, adversarial):
        idx = select_blocks(s, Selection(**kw)).long()
        for t in range(nQ):
            diag = min(((t + 1) * query_block - 1) // block_size, nK - 1)
            lo = max(0, min(t * query_block // block_size, diag - local_blocks + 1))
            for h in range(H):
                row = idx[0, h, t].tolist()
                real = [b for b in row if b >= 0]
                assert row == real + [-1] * (topk - len(real)), row
                assert real == sorted(set(real)), row
                assert all(vis[t, b] for b in real), row
                for b in list(range(lo, diag + 1)) + list(range(min(sink_blocks, diag + 1))):
                    assert b in real, (t, b, row)
                if diag + 1 <= topk:
                    assert real == list(range(diag + 1)), (t, row)  # short prefix: dense
                else:
                    assert len(real) == topk


def test_short_prefix_is_dense():
    q, k, _ = rand_qkv(1, 20, 2, 1, 8, seed=3)
    idx = score_and_select(q, k, Selection(block_size=4, topk=16))
    for i in range(20):
        assert idx[0, 0, i].tolist() == list(range(i // 4 + 1)) + [-1] * (16 - i // 4 - 1)


def test_neg_inf_scores_never_selected_even_with_room():
    scores = torch.zeros(1, 1, 6, 6)
    scores[..., 1] = float("-inf")
    scores[..., 3] = float("nan")
    idx = select_blocks(scores, Selection(topk=6, block_size=1))
    for t in range(6):
        expected = [b for b in range(t + 1) if b not in (1, 3) or b == t]
        assert idx[0, 0, t].tolist() == expected + [-1] * (6 - len(expected))


def test_sinks_kept_when_they_score_worst():
    scores = torch.arange(10.0).expand(1, 1, 40, 10).clone()  # later blocks always score higher
    idx = select_blocks(scores, Selection(topk=4, block_size=4, local_blocks=1, sink_blocks=2))
    for i in range(40):
        d = i // 4
        exp = sorted({0, 1, d} | set(range(d - 1, 1, -1)[: max(0, 4 - len({0, 1, d}))])) if d >= 1 else [0]
        exp = [b for b in exp if b <= d]
        assert idx[0, 0, i].tolist() == exp + [-1] * (4 - len(exp)), (i, idx[0, 0, i].tolist())


@pytest.mark.parametrize(("block_size", "query_block", "local_blocks", "sink_blocks"),
                         [(4, 1, 1, 0), (4, 1, 2, 1), (4, 8, 1, 0), (2, 8, 1, 2), (8, 4, 3, 1), (4, 4, 2, 0)])
def test_topk_below_forced_raises_and_min_topk_suffices(block_size, query_block, local_blocks, sink_blocks):
    N = 64
    nQ, nK = cdiv(N, query_block), cdiv(N, block_size)
    scores = torch.randn(1, 1, nQ, nK).masked_fill(~_visible(nQ, nK, block_size, query_block), float("-inf"))
    kw = dict(block_size=block_size, query_block=query_block, local_blocks=local_blocks, sink_blocks=sink_blocks)
    m = min_topk(**kw)
    selection = Selection(topk=m, **kw)
    assert selection.forced == m
    idx = select_blocks(scores, selection)
    assert (idx[..., -1] >= 0).any()  # the forced blocks fill it at long range
    with pytest.raises(ValueError, match="topk"):  # the rule is checked once, when the Selection is built
        Selection(topk=max(m - 1, 0), **kw)


@pytest.mark.parametrize(("N", "block_size", "query_block", "topk", "local_blocks", "sink_blocks"), CONFIGS)
def test_window_mode_keeps_exactly_the_forced_blocks(N, block_size, query_block, topk, local_blocks, sink_blocks):
    """mode="window" scores nothing: each row is its forced blocks (local and sinks), k = Selection.forced wide,
    the same as topk mode with topk = forced and every free candidate scored -inf."""
    q, k, _ = rand_qkv(2, N, 4, 2, 8, seed=N)
    geometry = dict(block_size=block_size, query_block=query_block, local_blocks=local_blocks, sink_blocks=sink_blocks)
    window = Selection(mode="window", topk=topk, **geometry)
    idx = score_and_select(q, k, window)
    assert window.k == window.forced and idx.shape == (2, 2, cdiv(N, query_block), window.forced)
    scores = _random_scores(2, 2, N, block_size, query_block, seed=N, p_neg_inf=1.0)  # no free candidate
    assert torch.equal(idx.long(), _brute_force(scores, topk=window.forced, **geometry))


@pytest.mark.parametrize("scorer", ["taylor2", "taylor1", "oracle"])
def test_packed_selection_equals_separate(scorer):
    lengths = [9, 17, 3, 12]
    N, bs, topk = sum(lengths), 4, 3
    q, k, _ = rand_qkv(1, N, 4, 2, 8, seed=2)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    idx = score_and_select(q, k, Selection(block_size=bs, topk=topk, scorer=scorer, sink_blocks=1), cu_seqlens=cu)
    assert idx.shape == (1, 2, N, topk)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = score_and_select(q[:, s:e], k[:, s:e], Selection(block_size=bs, topk=topk, scorer=scorer, sink_blocks=1))
        assert torch.equal(idx[:, :, s:e], sep)
        assert int(idx[:, :, s:e].max()) < cdiv(e - s, bs)  # local block indices
    # select_blocks on packed scores gives the same
    scores = block_scores(q, k, Selection(block_size=bs, scorer=scorer), cu_seqlens=cu)
    assert torch.equal(select_blocks(scores, Selection(topk=topk, block_size=bs, sink_blocks=1), cu_seqlens=cu), idx)


def test_score_and_select_equals_scores_then_select():
    q, k, _ = rand_qkv(2, 45, 4, 2, 8, seed=5)
    for scorer, qb in [("taylor2", 1), ("taylor1", 4), ("oracle", 1), ("taylor2", 8)]:
        selection = Selection(block_size=4, query_block=qb, topk=4, scorer=scorer)
        a = score_and_select(q, k, selection)
        b = select_blocks(block_scores(q, k, selection), selection)
        assert torch.equal(a, b)


def test_oracle_selection_picks_highest_mass_blocks():
    """A past block whose keys equal the query direction is chosen by every sensible scorer."""
    g = torch.Generator().manual_seed(0)
    N, D, bs = 48, 8, 8
    q, k, _ = rand_qkv(1, N, 2, 1, D, seed=1)
    u = torch.randn(D, generator=g)
    q[:, 40:] = 4 * u / u.norm()
    k[:, 8:16] = 4 * u / u.norm()  # block 1
    for scorer in ("taylor2", "taylor1", "oracle"):
        idx = score_and_select(q, k, Selection(block_size=bs, topk=2, scorer=scorer))
        assert (idx[0, 0, 40:] == torch.tensor([1, 5], dtype=torch.int32)).all(), scorer
