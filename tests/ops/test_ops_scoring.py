"""Block scorers: the second-order formula by hand, the oracle, covariance variants, masking, fidelity."""

from __future__ import annotations

import math

import pytest
import torch
from reference import rand_qkv, repeat_kv

from spla_lit.ops import Selection, block_key_stats, block_scores, exact_block_log_mass, score_and_select
from spla_lit.ops.utils import cdiv

SCORERS = ["taylor2", "taylor1", "random", "oracle"]


def _taylor_by_hand(q, k, block_size, order, scale=None):
    """Per-head, per-token estimated log-mass [B, Hq, N, nK] (float64, no masking), `docs/spla.md` §1:
    ``log|b| + scale q.mu_b + scale^2 / 2 q^T Sigma_b q`` with the population covariance of the block."""
    B, N, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qq, kk = q.double(), repeat_kv(k.double(), G)
    out = []
    for b in range(cdiv(N, block_size)):
        kb = kk[:, b * block_size:(b + 1) * block_size]  # [B, nb, Hq, D]
        nb = kb.shape[1]
        mu = kb.mean(1)  # [B, Hq, D]
        cen = kb - mu[:, None]
        sigma = torch.einsum("bnhd,bnhe->bhde", cen, cen) / nb
        lm = math.log(nb) + scale * torch.einsum("bihd,bhd->bhi", qq, mu)
        if order == 2:
            lm = lm + 0.5 * scale**2 * torch.einsum("bihd,bhde,bihe->bhi", qq, sigma, qq)
        out.append(lm)
    return torch.stack(out, -1)


def _oracle_by_hand(q, k, block_size, scale=None):
    """Exact per-head causal block log-mass [B, Hq, N, nK], float64: logsumexp_{j in b, j <= i} s_ij."""
    B, N, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    s = scale * torch.einsum("bihd,bjhd->bhij", q.double(), repeat_kv(k.double(), G))
    s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    nK = cdiv(N, block_size)
    return torch.stack([s[..., b * block_size:(b + 1) * block_size].logsumexp(-1) for b in range(nK)], -1)


def _reduce_heads(lm, Hkv, how="lse"):
    B, Hq, N, nK = lm.shape
    x = lm.view(B, Hkv, Hq // Hkv, N, nK)
    return {"lse": lambda: x.logsumexp(2), "max": lambda: x.amax(2), "mean": lambda: x.mean(2)}[how]()


def _visible(N, block_size, query_block):
    nQ, nK = cdiv(N, query_block), cdiv(N, block_size)
    last = torch.clamp((torch.arange(nQ) + 1) * query_block - 1, max=N - 1)
    return torch.arange(nK)[None, :] * block_size <= last[:, None]  # [nQ, nK]


# ------------------------------------------------------------------------------------------ taylor


@pytest.mark.parametrize("head_reduce", ["lse", "max", "mean"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(("B", "N", "Hq", "Hkv", "D", "block_size"), [(1, 10, 4, 2, 4, 3), (2, 23, 2, 2, 8, 4),
                                                                       (1, 17, 4, 1, 6, 5)])
def test_taylor_matches_formula_by_hand(order, head_reduce, B, N, Hq, Hkv, D, block_size):
    q, k, _ = rand_qkv(B, N, Hq, Hkv, D, seed=N * 10 + order)
    scorer = "taylor2" if order == 2 else "taylor1"
    s = block_scores(q, k, Selection(block_size=block_size, scorer=scorer, covariance="full", head_reduce=head_reduce))
    assert s.dtype == torch.float32 and s.shape == (B, Hkv, N, cdiv(N, block_size))
    ref = _reduce_heads(_taylor_by_hand(q, k, block_size, order), Hkv, head_reduce)
    i = torch.arange(N)[:, None]
    b = torch.arange(s.shape[-1])[None, :]
    past = (b + 1) * block_size <= i  # blocks entirely in the past: the ones selection actually ranks
    torch.testing.assert_close(s[..., past].double(), ref[..., past], rtol=1e-5, atol=1e-5)
    diag = b == i // block_size
    assert torch.isfinite(s[..., diag]).all()


def test_taylor_custom_scale():
    q, k, _ = rand_qkv(1, 16, 2, 1, 4, seed=3)
    s = block_scores(q, k, Selection(block_size=4, scorer="taylor2", covariance="full", scale=0.3))
    ref = _reduce_heads(_taylor_by_hand(q, k, 4, 2, scale=0.3), 1)
    past = (torch.arange(4)[None, :] + 1) * 4 <= torch.arange(16)[:, None]
    torch.testing.assert_close(s[..., past].double(), ref[..., past], rtol=1e-5, atol=1e-5)


def test_taylor2_sees_spread_along_query_taylor1_does_not():
    """Two past blocks with the same mean key: block 0 spread along the query, block 1 spread orthogonally.
    taylor1 ties them; taylor2 (every covariance) and the exact mass rank block 0 higher."""
    D, bs, N = 4, 4, 12
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    mu = torch.tensor([0.3, -0.2, 0.5, 0.1])
    a = 2.0
    block0 = torch.stack([mu + a * e0, mu - a * e0, mu + a * e0, mu - a * e0])
    block1 = torch.stack([mu + a * e1, mu - a * e1, mu + a * e1, mu - a * e1])
    block2 = torch.randn(bs, D, generator=torch.Generator().manual_seed(0))
    k = torch.cat([block0, block1, block2])[None, :, None]  # [1, 12, 1, D]
    q = (3.0 * e0 + 0.1 * torch.randn(N, D, generator=torch.Generator().manual_seed(1)))[None, :, None]
    rows = slice(8, 12)  # queries in block 2 see blocks 0 and 1 entirely
    t1 = block_scores(q, k, Selection(block_size=bs, scorer="taylor1"))[0, 0, rows]
    torch.testing.assert_close(t1[:, 0], t1[:, 1], rtol=0, atol=1e-6)
    for cov in ("diag", "full", "lowrank"):
        t2 = block_scores(q, k, Selection(block_size=bs, scorer="taylor2", covariance=cov, rank=2))[0, 0, rows]
        assert (t2[:, 0] > t2[:, 1] + 0.5).all(), cov
    orc = block_scores(q, k, Selection(block_size=bs, scorer="oracle"))[0, 0, rows]
    assert (orc[:, 0] > orc[:, 1] + 0.5).all()
    # and the selection follows: with room for one extra block, taylor2 takes block 0, like the oracle.
    sel2 = score_and_select(q, k, Selection(block_size=bs, topk=2, scorer="taylor2"))[0, 0, rows]
    sel_o = score_and_select(q, k, Selection(block_size=bs, topk=2, scorer="oracle"))[0, 0, rows]
    assert (sel2 == torch.tensor([0, 2], dtype=torch.int32)).all()
    assert torch.equal(sel2, sel_o)


def _diag_cov_keys(nblocks, bs, D, seed):
    """Keys whose per-block covariance is diagonal: mu_b +- a_d e_d, one axis per key pair."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(nblocks):
        mu = torch.randn(D, generator=g)
        rows = []
        for j in range(bs // 2):
            d = j % D
            amp = 0.5 + torch.rand((), generator=g) * 2
            rows += [mu + amp * torch.eye(D)[d], mu - amp * torch.eye(D)[d]]
        blocks.append(torch.stack(rows))
    return torch.cat(blocks)


def test_diag_equals_full_when_block_covariance_is_diagonal():
    D, bs, nb, Hq = 4, 8, 5, 3
    k = torch.stack([_diag_cov_keys(nb, bs, D, seed=s) for s in (0, 1)], dim=1)[None]  # [1, N, 2, D]
    q, _, _ = rand_qkv(1, nb * bs, 2 * Hq, 2, D, seed=9)
    _, _, cov = block_key_stats(k, bs, "full")
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-6  # the construction really is diagonal
    diag = block_scores(q, k, Selection(block_size=bs, scorer="taylor2", covariance="diag"))
    full = block_scores(q, k, Selection(block_size=bs, scorer="taylor2", covariance="full"))
    torch.testing.assert_close(diag, full, rtol=1e-5, atol=1e-5)
    # and on generic keys they differ (the test above is not vacuous)
    q2, k2, _ = rand_qkv(1, 40, 4, 2, D, seed=1)
    d2 = block_scores(q2, k2, Selection(block_size=bs, scorer="taylor2", covariance="diag"))
    f2 = block_scores(q2, k2, Selection(block_size=bs, scorer="taylor2", covariance="full"))
    fin = torch.isfinite(f2)
    assert (d2[fin] - f2[fin]).abs().max() > 1e-3


@pytest.mark.parametrize(("N", "D", "block_size"), [(24, 4, 6), (29, 8, 8)])
def test_lowrank_full_rank_equals_full(N, D, block_size):
    q, k, _ = rand_qkv(2, N, 4, 2, D, seed=N)
    full = block_scores(q, k, Selection(block_size=block_size, scorer="taylor2", covariance="full"))
    low = block_scores(q, k, Selection(block_size=block_size, scorer="taylor2", covariance="lowrank", rank=D))
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-5)
    # a larger rank than D is clipped to D
    low2 = block_scores(q, k, Selection(block_size=block_size, scorer="taylor2", covariance="lowrank", rank=3 * D))
    torch.testing.assert_close(low2, full, rtol=1e-5, atol=1e-5)
    # truncating keeps non-negative eigenvalues only: a lower rank never scores above full
    low1 = block_scores(q, k, Selection(block_size=block_size, scorer="taylor2", covariance="lowrank", rank=1))
    fin = torch.isfinite(full)
    assert (low1[fin] <= full[fin] + 1e-5).all()
    assert (full[fin] - low1[fin]).max() > 1e-3


def test_lowrank_rank1_exact_for_rank1_blocks():
    """Keys mu_b + t_j u_b (rank-one covariance): lowrank with rank 1 equals full."""
    g = torch.Generator().manual_seed(4)
    D, bs, nb = 6, 5, 4
    mu = torch.randn(nb, 1, D, generator=g)
    u = torch.randn(nb, 1, D, generator=g)
    t = torch.randn(nb, bs, 1, generator=g)
    k = (mu + t * u).reshape(1, nb * bs, 1, D)
    q, _, _ = rand_qkv(1, nb * bs, 2, 1, D, seed=4)
    full = block_scores(q, k, Selection(block_size=bs, scorer="taylor2", covariance="full"))
    low = block_scores(q, k, Selection(block_size=bs, scorer="taylor2", covariance="lowrank", rank=1))
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-4)


def test_block_key_stats_partial_block():
    q, k, _ = rand_qkv(1, 11, 2, 2, 4, seed=2)
    count, mean, var = block_key_stats(k, 4, "diag")
    assert count.tolist() == [4, 4, 3]
    last = k[0, 8:].double()  # [3, H, D]
    torch.testing.assert_close(mean[0, :, 2].double(), last.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var[0, :, 2].double(), last.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_block", [2, 4, 8])
def test_taylor_query_block_is_mean_of_token_log_mass(query_block):
    """query_block > 1 aggregates the per-token estimates linearly (mean over the block's tokens)."""
    B, N, Hq, Hkv, bs = 1, 30, 4, 2, 4
    q, k, _ = rand_qkv(B, N, Hq, Hkv, 8, seed=query_block)
    s = block_scores(q, k, Selection(block_size=bs, query_block=query_block, scorer="taylor2", covariance="full"))
    per_tok = _taylor_by_hand(q, k, bs, 2)  # [B, Hq, N, nK]
    nQ = cdiv(N, query_block)
    agg = torch.stack([per_tok[:, :, t * query_block:(t + 1) * query_block].mean(2) for t in range(nQ)], 2)
    ref = _reduce_heads(agg, Hkv)
    vis = _visible(N, bs, query_block)
    assert s.shape == (B, Hkv, nQ, cdiv(N, bs))
    # compare blocks that lie before the whole query block (the diagonal ones mix in their own tokens)
    past = (torch.arange(cdiv(N, bs))[None, :] + 1) * bs <= (torch.arange(nQ) * query_block)[:, None]
    assert past.any()
    torch.testing.assert_close(s[..., past].double(), ref[..., past], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(s[..., vis]).all()


# ------------------------------------------------------------------------------------------ oracle


@pytest.mark.parametrize("head_reduce", ["lse", "max", "mean"])
@pytest.mark.parametrize(("B", "N", "Hq", "Hkv", "D", "block_size"), [(1, 10, 4, 2, 4, 3), (2, 23, 2, 2, 8, 4),
                                                                       (1, 17, 4, 1, 6, 5)])
def test_oracle_is_exact_block_log_mass(head_reduce, B, N, Hq, Hkv, D, block_size):
    q, k, _ = rand_qkv(B, N, Hq, Hkv, D, seed=N + D)
    s = block_scores(q, k, Selection(block_size=block_size, scorer="oracle", head_reduce=head_reduce))
    per_head = _oracle_by_hand(q, k, block_size)
    ref = _reduce_heads(per_head, Hkv, head_reduce)
    vis = _visible(N, block_size, 1)
    torch.testing.assert_close(s[..., vis].double(), ref[..., vis], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(s[..., ~vis]).all()
    # the per-head fidelity helper agrees too
    ex = exact_block_log_mass(q, k, block_size=block_size)
    assert ex.shape == (B, Hq, N, cdiv(N, block_size))
    torch.testing.assert_close(ex[..., vis].double(), per_head[..., vis], rtol=1e-5, atol=1e-5)


def test_oracle_group_lse_is_total_group_mass():
    """lse over the G heads is the log of the group's total mass, computed here by explicit sums."""
    q, k, _ = rand_qkv(1, 12, 4, 2, 4, torch.float64, seed=8)
    s = block_scores(q, k, Selection(block_size=4, scorer="oracle"))
    scale = 0.5
    i, b, h = 10, 1, 1  # token 10, block 1 (tokens 4..7), KV head 1 (query heads 2, 3)
    total = sum(math.exp(scale * float(q[0, i, hq] @ k[0, j, h])) for hq in (2, 3) for j in range(4, 8))
    assert abs(float(s[0, h, i, b]) - math.log(total)) < 1e-5
    i, b = 9, 2  # the diagonal block: only j <= i count
    total = sum(math.exp(scale * float(q[0, i, hq] @ k[0, j, h])) for hq in (2, 3) for j in range(8, 10))
    assert abs(float(s[0, h, i, b]) - math.log(total)) < 1e-5


@pytest.mark.parametrize("query_block", [2, 4])
def test_oracle_query_block_is_mean_mass(query_block):
    B, N, Hq, Hkv, bs = 1, 22, 4, 2, 4
    q, k, _ = rand_qkv(B, N, Hq, Hkv, 8, seed=30 + query_block)
    s = block_scores(q, k, Selection(block_size=bs, query_block=query_block, scorer="oracle"))
    per_head = _oracle_by_hand(q, k, bs)  # [B, Hq, N, nK]
    nQ = cdiv(N, query_block)
    parts = []
    for t in range(nQ):
        blk = per_head[:, :, t * query_block:(t + 1) * query_block]  # [B, Hq, n_t, nK]
        parts.append(blk.logsumexp(2) - math.log(blk.shape[2]))
    ref = _reduce_heads(torch.stack(parts, 2), Hkv)
    vis = _visible(N, bs, query_block)
    torch.testing.assert_close(s[..., vis].double(), ref[..., vis], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ masking, random


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize(("N", "block_size", "query_block"), [(23, 4, 1), (32, 8, 1), (30, 4, 4), (26, 4, 2),
                                                              (27, 2, 8), (5, 8, 1)])
def test_non_visible_blocks_are_neg_inf(scorer, N, block_size, query_block):
    q, k, _ = rand_qkv(2, N, 4, 2, 8, seed=N)
    gen = torch.Generator().manual_seed(0)
    s = block_scores(q, k, Selection(block_size=block_size, query_block=query_block, scorer=scorer), generator=gen)
    vis = _visible(N, block_size, query_block)
    assert s.shape == (2, 2, cdiv(N, query_block), cdiv(N, block_size))
    assert torch.isneginf(s[..., ~vis]).all()
    assert torch.isfinite(s[..., vis]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scores_are_float32_and_not_differentiable(dtype):
    q, k, _ = rand_qkv(1, 16, 2, 1, 8, dtype, seed=0, requires_grad=True)
    for scorer in ("taylor2", "oracle"):
        s = block_scores(q, k, Selection(block_size=4, scorer=scorer))
        assert s.dtype == torch.float32 and not s.requires_grad


def test_bf16_scores_close_to_float32():
    q, k, _ = rand_qkv(1, 40, 4, 2, 16, seed=5)
    for scorer in ("taylor2", "taylor1", "oracle"):
        a = block_scores(q, k, Selection(block_size=8, scorer=scorer))
        b = block_scores(q.bfloat16(), k.bfloat16(), Selection(block_size=8, scorer=scorer))
        fin = torch.isfinite(a)
        torch.testing.assert_close(b[fin], a[fin], rtol=2e-2, atol=5e-2)


def test_random_is_reproducible_and_seed_dependent():
    q, k, _ = rand_qkv(2, 33, 4, 2, 8, seed=0)
    rand = Selection(block_size=4, scorer="random")
    draw = lambda seed: block_scores(q, k, rand, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(123), draw(123), draw(124)
    assert torch.equal(a, b)
    fin = torch.isfinite(a)
    assert not torch.equal(a[fin], c[fin])
    assert ((a[fin] >= 0) & (a[fin] < 1)).all()
    # independent of the inputs' values: the same seed gives the same scores for other q, k
    q2, k2, _ = rand_qkv(2, 33, 4, 2, 8, seed=1)
    d = block_scores(q2, k2, rand, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, d)
    rand3 = Selection(block_size=4, topk=3, scorer="random")
    sel_a = score_and_select(q, k, rand3, generator=torch.Generator().manual_seed(7))
    sel_b = score_and_select(q, k, rand3, generator=torch.Generator().manual_seed(7))
    sel_c = score_and_select(q, k, rand3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sel_a, sel_b) and not torch.equal(sel_a, sel_c)


def test_head_reduce_orders():
    """For the same per-head scores: lse >= max >= mean and lse <= max + log G."""
    q, k, _ = rand_qkv(1, 24, 4, 1, 8, seed=12)
    r = {h: block_scores(q, k, Selection(block_size=4, scorer="taylor2", head_reduce=h))
         for h in ("lse", "max", "mean")}
    fin = torch.isfinite(r["lse"])
    assert (r["lse"][fin] >= r["max"][fin] - 1e-5).all()
    assert (r["max"][fin] >= r["mean"][fin] - 1e-5).all()
    assert (r["lse"][fin] <= r["max"][fin] + math.log(4) + 1e-5).all()
    assert (r["lse"][fin] - r["mean"][fin]).min() > 0


@pytest.mark.parametrize("scorer", ["taylor2", "taylor1", "oracle"])
def test_packed_scores_equal_separate(scorer):
    lengths = [7, 13, 4]
    N, bs = sum(lengths), 4
    q, k, _ = rand_qkv(1, N, 4, 2, 8, seed=6)
    cu = torch.tensor([0, 7, 20, 24])
    s = block_scores(q, k, Selection(block_size=bs, scorer=scorer), cu_seqlens=cu)
    assert s.shape == (1, 2, N, cdiv(13, bs))
    for st, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = block_scores(q[:, st:e], k[:, st:e], Selection(block_size=bs, scorer=scorer))
        w = sep.shape[-1]
        torch.testing.assert_close(s[:, :, st:e, :w], sep, rtol=1e-6, atol=1e-6)
        assert torch.isneginf(s[:, :, st:e, w:]).all()


# ------------------------------------------------------------------------------------------ fidelity


def _concentrated_inputs(seed, N=256, D=16, bs=16, Hq=2, Hkv=1):
    """Queries share a direction u; a few key blocks are shifted along u (mean-aligned), a few spread
    along u with zero-mean noise (variance-aligned), the rest are isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    nK = N // bs
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = 0.5 * torch.randn(1, N, Hq, D, generator=g) + 3.0 * u
    k = torch.randn(1, N, Hkv, D, generator=g)
    perm = torch.randperm(nK - 2, generator=g).tolist()
    for b in perm[:3]:
        k[0, b * bs:(b + 1) * bs] += u
    for b in perm[3:6]:
        k[0, b * bs:(b + 1) * bs] += 2.0 * torch.randn(bs, generator=g)[:, None, None] * u
    return q, k


def _recall(sel, ref, block_size):
    """Fraction of the oracle's non-diagonal picks that ``sel`` also picks (tokens with a real choice)."""
    hit = tot = 0
    topk = sel.shape[-1]
    for i in range(sel.shape[2]):
        d = i // block_size
        if d + 1 <= topk:
            continue  # every visible block fits: nothing to choose
        r = set(ref[0, 0, i].tolist()) - {-1, d}
        s = set(sel[0, 0, i].tolist()) - {-1, d}
        tot += len(r)
        hit += len(r & s)
    return hit / tot


def test_taylor2_recalls_oracle_at_least_as_well_as_taylor1():
    """Measured over seeds 0..7: taylor1 ~0.66, taylor2 ~0.73, random ~0.37 (other seed ranges: gaps .05-.11)."""
    bs, topk = 16, 4
    rec = {"taylor1": [], "taylor2": [], "random": []}
    for seed in range(8):
        q, k = _concentrated_inputs(seed)
        ref = score_and_select(q, k, Selection(block_size=bs, topk=topk, scorer="oracle"))
        for scorer in rec:
            sel = score_and_select(q, k, Selection(block_size=bs, topk=topk, scorer=scorer),
                                   generator=torch.Generator().manual_seed(seed))
            rec[scorer].append(_recall(sel, ref, bs))
    mean = {s: sum(v) / len(v) for s, v in rec.items()}
    assert mean["taylor2"] >= mean["taylor1"] + 0.02, mean
    assert mean["taylor1"] >= mean["random"] + 0.15, mean
    assert mean["taylor2"] >= 0.6, mean
