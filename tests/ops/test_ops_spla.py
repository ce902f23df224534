"""spla_attention end to end: token-level causality, the query-block leak, combine formulas, packing, gradients,
argument rules of the residual inputs (phi, gate, norm weight) and combine_residual on its own."""

from __future__ import annotations

import pytest
import torch
from reference import (
    all_blocks_idx,
    assert_close,
    causal_mask,
    cdiv,
    dense_causal_reference,
    dense_selected_mask,
    masked_linear_attention,
    rand_qkv,
    random_block_idx,
    repeat_kv,
)

from spla_lit import options
from spla_lit.ops import (
    FEATURE_MAPS,
    Selection,
    SPLAAux,
    block_scores,
    block_sparse_attention,
    combine_residual,
    feature_map,
    residual_linear_attention,
    rms_norm,
    score_and_select,
    spla_attention,
)

SELECTION_FIELDS = {"block_size", "topk", "query_block", "local_blocks", "sink_blocks", "mode", "scorer",
                    "covariance", "rank", "head_reduce", "scale"}


def _spla(q, k, v, **kw):
    """spla_attention with the selection fields among the keywords gathered into one Selection."""
    selection = Selection(**{key: kw.pop(key) for key in list(kw) if key in SELECTION_FIELDS})
    return spla_attention(q, k, v, selection, **kw)

# ------------------------------------------------------------------------------------------ causality


def _run(q, k, v, kw):
    kw = dict(kw)
    if kw.get("scorer") == "random":
        kw["generator"] = torch.Generator().manual_seed(1234)  # the same draws for both runs
    return _spla(q, k, v, **kw)


def _assert_causal(kw, *, B=1, N=40, Hq=4, Hkv=2, D=8, trials=3, seed=0):
    q, k, v = rand_qkv(B, N, Hq, Hkv, D, seed=seed)
    o = _run(q, k, v, kw)
    # "Exact or to 1e-6": the references may regroup their float32 sums when the *shapes* of the future's
    # selections change (e.g. the union width of a query tile), so allow 1e-6 relative to the output's scale.
    atol = 1e-6 * max(1.0, float(o.abs().max()))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(trials):
        i = int(torch.randint(0, N - 1, (1,), generator=g))
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, i + 1:] = 3 * torch.randn(x[:, i + 1:].shape, generator=g)
        o2 = _run(q2, k2, v2, kw)
        torch.testing.assert_close(o2[:, : i + 1], o[:, : i + 1], rtol=0, atol=atol,
                                   msg=lambda m, i=i: f"position <= {i} changed with {kw}: {m}")
        assert not torch.allclose(o2[:, i + 1:], o[:, i + 1:])  # the perturbation did reach the future


def test_causal_with_defaults():
    """The defaults (block_size 64, topk 16) only become sparse past 16 blocks: N = 1100."""
    _assert_causal({}, N=1100, Hq=2, Hkv=1, D=16, trials=2)


@pytest.mark.parametrize("rla", ["subtract", "explicit", "none"])
@pytest.mark.parametrize("scorer", ["taylor2", "taylor1", "random", "oracle"])
def test_causal_scorers_and_rla(scorer, rla):
    _assert_causal(dict(block_size=4, topk=3, scorer=scorer, rla=rla), seed=len(scorer) + len(rla))


@pytest.mark.parametrize("combine", ["add", "joint"])
@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
def test_causal_feature_maps_and_combine(fmap, combine):
    normalize = fmap != "identity"  # identity features can be negative: only the plain residual is meaningful
    _assert_causal(dict(block_size=4, topk=3, feature_map=fmap, combine=combine, normalize=normalize), seed=5)


@pytest.mark.parametrize("kw", [dict(covariance="full"), dict(covariance="lowrank", rank=2),
                                dict(head_reduce="max"), dict(head_reduce="mean"),
                                dict(local_blocks=2, sink_blocks=1, topk=4), dict(block_size=8, topk=2),
                                dict(mode="window", local_blocks=2), dict(mode="window", sink_blocks=1)])
def test_causal_other_options(kw):
    _assert_causal({"block_size": 4, "topk": 3, **kw}, B=2, N=37, seed=11)


def _leak_setup(scorer):
    """Keys whose dimension 0 is zero except in one past block b, with b the lowest-scored candidate of
    query block t = 5 (tokens 20..23) for query_block 4: a query at token 23 pointing along dimension 0
    then pulls b into the shared selection, and token 20 sees it."""
    N, D, bs, qb = 32, 8, 4, 4
    q, k, v = rand_qkv(1, N, 1, 1, D, seed=3)
    q[..., 0] = 0
    k[..., 0] = 0
    s = block_scores(q, k, Selection(block_size=bs, query_block=qb, scorer=scorer))[0, 0, 5, :5]
    b = int(s.argmin())
    k[0, b * bs:(b + 1) * bs, 0, 0] = 3.0
    return q, k, v, b


@pytest.mark.parametrize("scorer", ["taylor2", "taylor1"])
def test_query_block_selection_leaks_within_the_block(scorer):
    q, k, v, b = _leak_setup(scorer)
    kw = dict(block_size=4, topk=2, scorer=scorer)
    o, aux = _spla(q, k, v, query_block=4, return_aux=True, **kw)
    assert b not in aux.block_idx[0, 0, 5].tolist()
    q2 = q.clone()
    q2[0, 23, 0, 0] = 40.0  # a future token of the same query block
    o2, aux2 = _spla(q2, k, v, query_block=4, return_aux=True, **kw)
    assert b in aux2.block_idx[0, 0, 5].tolist()
    # the leak: token 20 (< 23) changed because of token 23
    assert (o2[0, 20] - o[0, 20]).abs().max() > 1e-2
    # but it stays inside the query block
    torch.testing.assert_close(o2[:, :20], o[:, :20], rtol=0, atol=0)
    # per-token selection (query_block = 1) never leaks: tokens <= 22 are untouched
    p = _spla(q, k, v, query_block=1, **kw)
    p2 = _spla(q2, k, v, query_block=1, **kw)
    torch.testing.assert_close(p2[:, :23], p[:, :23], rtol=0, atol=1e-6)
    assert (p2[0, 23] - p[0, 23]).abs().max() > 1e-2


def test_query_block_one_never_leaks_random_trials():
    """Many random single-token perturbations: query_block > 1 leaks in some, query_block = 1 in none."""
    N, bs = 32, 4
    leaks = {1: 0, 4: 0}
    g = torch.Generator().manual_seed(0)
    for trial in range(8):
        q, k, v = rand_qkv(1, N, 2, 1, 8, seed=100 + trial)
        i = 4 * int(torch.randint(3, 8, (1,), generator=g))  # first token of a query block with choices
        q2 = q.clone()
        q2[0, i + 3] = 6 * torch.randn(2, 8, generator=g)
        for qb in leaks:
            selection = Selection(block_size=bs, topk=2, query_block=qb, scorer="taylor2")
            o, o2 = spla_attention(q, k, v, selection), spla_attention(q2, k, v, selection)
            leaks[qb] += int(not torch.allclose(o[:, : i + 3], o2[:, : i + 3], rtol=0, atol=1e-5))
    assert leaks[1] == 0
    assert leaks[4] >= 2  # measured: 5 of 8


# ------------------------------------------------------------------------------------------ combine formulas


def _reference_parts(q, k, v, idx, block_size, query_block, fmap):
    N = q.shape[1]
    sel = dense_selected_mask(idx, N, block_size, query_block)
    o_sparse, lse = dense_causal_reference(q, k, v, mask=sel)
    phi = feature_map(fmap)
    num, den = masked_linear_attention(phi(q.double()), phi(k.double()), v, causal_mask(N) & ~sel)
    return o_sparse, lse, num, den


@pytest.mark.parametrize("fmap", ["elu1", "taylor", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("query_block", "rla"), [(1, "subtract"), (1, "explicit"), (4, "subtract")])
def test_combine_add_formula(fmap, dtype, query_block, rla):
    B, N, Hq, Hkv, bs = 2, 33, 4, 2, 4
    q, k, v = rand_qkv(B, N, Hq, Hkv, 8, dtype, seed=query_block + len(fmap))
    gate = torch.rand(B, N, Hq, generator=torch.Generator().manual_seed(0))
    selection = Selection(block_size=bs, topk=3, query_block=query_block)
    out, aux = spla_attention(q, k, v, selection, feature_map=fmap, rla=rla, gate=gate, return_aux=True)
    assert out.dtype == dtype and out.shape == (B, N, Hq, 8)
    idx = aux.block_idx
    o_sparse, lse, num, den = _reference_parts(q, k, v, idx, bs, query_block, fmap)
    r = num / (den[..., None] + 1e-6)
    ref = o_sparse + gate[..., None].double() * r
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out, ref, dtype=dtype, rtol=tol, atol=None)
    assert_close(aux.o_sparse, o_sparse, dtype=dtype)
    assert aux.lse is None  # only the joint combine needs it (the reference path then skips it)
    # with the residual's RMSNorm (the model's o_sparse + gate * RMSNorm(r)), on the same selection
    w = 0.5 + torch.rand(8, generator=torch.Generator().manual_seed(1))
    normed = spla_attention(q, k, v, selection, feature_map=fmap, rla=rla, gate=gate, norm_weight=w, block_idx=idx)
    r_norm = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    assert_close(normed, o_sparse + gate[..., None].double() * r_norm, dtype=dtype, rtol=tol, atol=None)


@pytest.mark.parametrize("fmap", ["elu1", "taylor"])
@pytest.mark.parametrize("rla", ["subtract", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_joint_formula(fmap, rla, dtype):
    """o = (sum_sel e^s v + num) / (sum_sel e^s + den), all computed from scratch in float64."""
    B, N, Hq, Hkv, bs = 1, 37, 4, 2, 4
    q, k, v = rand_qkv(B, N, Hq, Hkv, 8, dtype, seed=7)
    out, aux = spla_attention(q, k, v, Selection(block_size=bs, topk=3), feature_map=fmap, combine="joint", rla=rla,
                              return_aux=True)
    idx = aux.block_idx
    sel = dense_selected_mask(idx, N, bs)
    G = Hq // Hkv
    s = 8**-0.5 * torch.einsum("bihd,bjhd->bhij", q.double(), repeat_kv(k.double(), G))
    e = torch.exp(s) * sel.repeat_interleave(G, dim=1)
    a = torch.einsum("bhij,bjhd->bihd", e, repeat_kv(v.double(), G))
    z = e.sum(-1).transpose(1, 2)[..., None]
    phi = feature_map(fmap)
    num, den = masked_linear_attention(phi(q.double()), phi(k.double()), v, causal_mask(N) & ~sel)
    ref = (a + num) / (z + den[..., None])
    assert_close(out, ref, dtype=dtype, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert aux.residual.shape == (B, N, Hq, 9)
    assert_close(aux.lse, s.masked_fill(~sel.repeat_interleave(G, dim=1), float("-inf")).logsumexp(-1), dtype=dtype)
    assert aux.gate_abs is None and 0 < float(aux.residual_share) < 1


@pytest.mark.parametrize("combine", ["add", "joint"])
def test_all_blocks_selected_is_dense_attention(combine):
    q, k, v = rand_qkv(2, 30, 4, 2, 8, seed=2)
    o = spla_attention(q, k, v, Selection(block_size=4, topk=8), combine=combine)
    o_ref, _ = dense_causal_reference(q, k, v)
    assert_close(o, o_ref)
    idx = all_blocks_idx(2, 2, 30, 8)
    assert_close(spla_attention(q, k, v, Selection(block_size=4), block_idx=idx, combine=combine), o_ref)


def test_rla_none_is_block_sparse_attention():
    q, k, v = rand_qkv(2, 41, 4, 2, 8, seed=4)
    out, aux = spla_attention(q, k, v, Selection(block_size=4, topk=3), rla="none", return_aux=True)
    assert aux.residual is None
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, aux.block_idx, block_size=4),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(aux.block_idx, score_and_select(q, k, Selection(block_size=4, topk=3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gate_is_exactly_sparse_attention(dtype):
    q, k, v = rand_qkv(1, 41, 4, 2, 8, dtype, seed=4)
    sparse = spla_attention(q, k, v, Selection(block_size=4, topk=3), rla="none")
    for gate in (0.0, torch.zeros(1, 41, 4)):
        out, aux = spla_attention(q, k, v, Selection(block_size=4, topk=3), gate=gate, return_aux=True)
        assert torch.count_nonzero(aux.residual) > 0  # there is a residual, and the gate removes it exactly
        assert torch.equal(out, aux.o_sparse)
        assert_close(out, sparse, dtype=dtype, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_subtract_equals_explicit_end_to_end(normalize):
    for combine in ("add", "joint"):
        q, k, v = rand_qkv(2, 45, 4, 2, 8, seed=9)
        selection = Selection(block_size=4, topk=3)
        a = spla_attention(q, k, v, selection, rla="subtract", combine=combine, normalize=normalize)
        b = spla_attention(q, k, v, selection, rla="explicit", combine=combine, normalize=normalize)
        assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, spla_attention(q, k, v, selection, rla="none"))


def test_aux_residual_is_residual_linear_attention():
    q, k, v = rand_qkv(1, 29, 2, 1, 8, seed=6)
    _, aux = spla_attention(q, k, v, Selection(block_size=4, topk=2), return_aux=True)
    phi = feature_map("elu1")
    ref = residual_linear_attention(phi(q), phi(k), v, aux.block_idx, block_size=4, normalize=True)
    assert torch.equal(aux.residual, ref)
    assert isinstance(aux, SPLAAux) and aux.gate_abs is None  # no gate given: the residual is added as it is
    share = (aux.residual.norm() / (aux.o_sparse.norm() + aux.residual.norm())).item()
    assert aux.residual_share.item() == pytest.approx(share, rel=1e-5)


def test_bf16_close_to_float32_with_same_selection():
    q, k, v = rand_qkv(2, 40, 4, 2, 16, seed=8)
    idx = score_and_select(q, k, Selection(block_size=8, topk=2))
    for combine in ("add", "joint"):
        a = spla_attention(q, k, v, Selection(block_size=8), block_idx=idx, combine=combine)
        b = spla_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), Selection(block_size=8), block_idx=idx,
                           combine=combine)
        assert b.dtype == torch.bfloat16
        assert_close(b, a, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize(("rla", "combine", "scorer"), [("subtract", "add", "taylor2"), ("explicit", "joint", "oracle"),
                                                        ("subtract", "joint", "taylor1"), ("none", "add", "taylor2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_separate(rla, combine, scorer, dtype):
    lengths = [13, 5, 22]
    N = sum(lengths)
    q, k, v = rand_qkv(1, N, 4, 2, 8, dtype, seed=12)
    cu = torch.tensor([0, 13, 18, 40], dtype=torch.int32)
    selection = Selection(block_size=4, topk=3, sink_blocks=1, scorer=scorer)
    kw = dict(rla=rla, combine=combine)
    out = spla_attention(q, k, v, selection, cu_seqlens=cu, **kw)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = spla_attention(q[:, s:e], k[:, s:e], v[:, s:e], selection, **kw)
        assert_close(out[:, s:e], sep, dtype=dtype, rtol=1e-5 if dtype == torch.float32 else 1e-2)


# ------------------------------------------------------------------------------------------ gradients


def _directional_gradcheck(f, inputs, *, n_dirs=2, eps=1e-6, rtol=1e-5, atol=1e-7, seed=0):
    """Cheap float64 gradient check: <w, J u> from autograd equals the central difference along u (random u, w).

    torch.autograd.gradcheck(fast_mode=True) checks the same quantity but rebuilds the whole Jacobian for
    its error message when it fails, which costs tens of seconds per case here."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_dirs):
        us = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in inputs]
        out = f(*inputs)
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((out * w).sum(), inputs)
        analytic = sum((gr * u).sum() for gr, u in zip(grads, us))
        with torch.no_grad():
            plus = f(*[x + eps * u for x, u in zip(inputs, us)])
            minus = f(*[x - eps * u for x, u in zip(inputs, us)])
            numeric = ((plus - minus) * w).sum() / (2 * eps)
        assert abs(float(analytic - numeric)) <= atol + rtol * abs(float(numeric)), (float(analytic), float(numeric))


def _spla_grad_case(N, block_size, query_block, seed):
    q, k, v = rand_qkv(1, N, 2, 1, 4, torch.float64, seed=seed, requires_grad=True)
    gate = torch.rand(1, N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    idx = random_block_idx(1, 1, N, block_size, 2, seed=seed, query_block=query_block)
    return (q, k, v, gate), idx


GRAD_SHAPES = [(11, 2, 1), (12, 3, 3)]


@pytest.mark.parametrize(("N", "block_size", "query_block"), GRAD_SHAPES)
def test_gradcheck_spla_no_residual(N, block_size, query_block):
    (q, k, v, _), idx = _spla_grad_case(N, block_size, query_block, seed=N)
    selection = Selection(block_size=block_size, query_block=query_block)
    f = lambda q, k, v: spla_attention(q, k, v, selection, block_idx=idx, rla="none")
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(("combine", "rla", "fmap"), [
    ("add", "subtract", "elu1"),
    ("joint", "subtract", "elu1"),
    ("add", "explicit", "elu1"),
    ("joint", "explicit", "taylor"),
    ("joint", "subtract", "softmax"),
])
@pytest.mark.parametrize(("N", "block_size", "query_block"), GRAD_SHAPES)
def test_gradcheck_spla_fixed_selection(combine, rla, fmap, N, block_size, query_block):
    inputs, idx = _spla_grad_case(N, block_size, query_block, seed=N + len(fmap))
    if combine == "joint":
        inputs = inputs[:3]  # the joint combine has no gate
    selection = Selection(block_size=block_size, query_block=query_block)

    def f(q, k, v, gate=None):
        return spla_attention(q, k, v, selection, block_idx=idx, combine=combine, rla=rla, feature_map=fmap, gate=gate)

    _directional_gradcheck(f, inputs)


@pytest.mark.parametrize(("combine", "rla"), [("add", "subtract"), ("add", "explicit"), ("joint", "subtract"),
                                              ("joint", "explicit")])
@pytest.mark.parametrize(("N", "block_size", "query_block"), GRAD_SHAPES)
def test_gradcheck_spla_given_features_gate_and_norm_weight(combine, rla, N, block_size, query_block):
    """Every tensor input of the layer's call gets its gradient: q, k, v, phi_q, phi_k (a feature width F = 6
    other than D) and, for combine=add, the gate and the residual norm's weight."""
    q, k, v = rand_qkv(1, N, 2, 1, 4, torch.float64, seed=N, requires_grad=True)
    g = torch.Generator().manual_seed(N + 1)
    phi_q = (0.1 + torch.rand(1, N, 2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    phi_k = (0.1 + torch.rand(1, N, 1, 6, generator=g, dtype=torch.float64)).requires_grad_()
    inputs = [q, k, v, phi_q, phi_k]
    if combine == "add":
        inputs.append(torch.randn(1, N, 2, generator=g, dtype=torch.float64).requires_grad_())  # gate
        inputs.append((0.5 + torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_())  # norm weight
    idx = random_block_idx(1, 1, N, block_size, 2, seed=N, query_block=query_block)
    selection = Selection(block_size=block_size, query_block=query_block)

    def f(q, k, v, phi_q, phi_k, gate=None, norm_weight=None):
        return spla_attention(q, k, v, selection, phi_q=phi_q, phi_k=phi_k, gate=gate, norm_weight=norm_weight,
                              block_idx=idx, combine=combine, rla=rla)

    _directional_gradcheck(f, inputs)


@pytest.mark.parametrize("combine", ["add", "joint"])
def test_torch_gradcheck_spla_tiny(combine):
    """torch.autograd.gradcheck itself, on the smallest case (slow when it fails: ~2 s)."""
    q, k, v = rand_qkv(1, 5, 2, 1, 4, torch.float64, seed=1, requires_grad=True)
    idx = random_block_idx(1, 1, 5, 2, 2, seed=1)
    f = lambda q, k, v: spla_attention(q, k, v, Selection(block_size=2), block_idx=idx, combine=combine)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("combine", ["add", "joint"])
def test_float64_is_float64_accurate(combine):
    """Gradients aside, float64 inputs (documented "for checks") should give float64-accurate outputs."""
    B, N, Hq, Hkv, bs = 1, 30, 4, 2, 4
    q, k, v = rand_qkv(B, N, Hq, Hkv, 8, torch.float64, seed=3)
    out, aux = spla_attention(q, k, v, Selection(block_size=bs, topk=3), combine=combine, return_aux=True)
    assert out.dtype == torch.float64
    o_sparse, lse, num, den = _reference_parts(q, k, v, aux.block_idx, bs, 1, "elu1")
    if combine == "add":
        ref = o_sparse + num / (den[..., None] + 1e-6)
    else:
        ref = (o_sparse * lse.exp().transpose(1, 2)[..., None] + num) / (lse.exp().transpose(1, 2)[..., None]
                                                                         + den[..., None])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("combine", "fmap"), [("add", "elu1"), ("joint", "elu1"), ("joint", "taylor")])
@pytest.mark.parametrize("rla", ["subtract", "explicit"])
def test_spla_gradients_match_reference_autograd(combine, fmap, rla):
    """Gradients of spla_attention (fixed selection) equal autograd through the float64 formula of
    ``docs/spla.md``."""
    B, N, Hq, Hkv, bs = 1, 21, 4, 2, 4
    q, k, v = rand_qkv(B, N, Hq, Hkv, 8, torch.float64, seed=17, requires_grad=True)
    gate = torch.rand(B, N, Hq, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    idx = random_block_idx(B, Hkv, N, bs, 3, seed=17)
    w = torch.randn(B, N, Hq, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = spla_attention(q, k, v, Selection(block_size=bs), block_idx=idx, combine=combine, rla=rla, feature_map=fmap,
                         gate=gate if combine == "add" else None)
    inputs = (q, k, v, gate) if combine == "add" else (q, k, v)
    got = torch.autograd.grad((out * w).sum(), inputs)
    o_sparse, lse, num, den = _reference_parts(q, k, v, idx, bs, 1, fmap)
    if combine == "add":
        ref = o_sparse + gate[..., None] * num / (den[..., None] + 1e-6)
    else:
        z = lse.exp().transpose(1, 2)[..., None]
        ref = (o_sparse * z + num) / (z + den[..., None])
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert b.abs().max() > 1e-3


def test_directional_gradcheck_detects_wrong_gradients():
    """The helper above is not vacuous: a function with a wrong backward fails it."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            return g  # should be g * cos(x)

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    _directional_gradcheck(lambda x: x.sin(), (x,))
    with pytest.raises(AssertionError):
        _directional_gradcheck(Wrong.apply, (x,))


def test_gradients_flow_and_are_finite_with_selection():
    """With selection inside (discrete, not differentiated), gradients exist and are finite for q, k, v."""
    q, k, v = rand_qkv(2, 40, 4, 2, 8, seed=3, requires_grad=True)
    out = spla_attention(q, k, v, Selection(block_size=4, topk=3), combine="joint")
    out.square().sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert cdiv(40, 4) > 3  # the selection is genuinely sparse here


# ------------------------------------------------------------------------------------------ residual inputs


def test_feature_map_functions_are_exactly_the_option_list():
    assert tuple(FEATURE_MAPS) == options.FEATURE_MAPS
    assert set(options.POSITIVE_FEATURE_MAPS) <= set(FEATURE_MAPS)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    for name in options.POSITIVE_FEATURE_MAPS:  # their kernels phi(x) . phi(y) are never negative
        phi = feature_map(name)(x)
        assert (phi @ phi.T >= 0).all(), name


@pytest.mark.parametrize("fmap", ["elu1", "taylor"])
@pytest.mark.parametrize("rla", ["subtract", "explicit"])
def test_given_features_are_the_feature_map(fmap, rla):
    q, k, v = rand_qkv(1, 30, 4, 2, 8, seed=21)
    selection = Selection(block_size=4, topk=3)
    phi = feature_map(fmap)
    a = spla_attention(q, k, v, selection, feature_map=fmap, rla=rla)
    b = spla_attention(q, k, v, selection, phi_q=phi(q), phi_k=phi(k), rla=rla)
    assert torch.equal(a, b)


@pytest.mark.parametrize(("combine", "norm"), [("add", False), ("add", True), ("joint", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_residual_is_the_ops_combine_step(combine, norm, dtype):
    """A decode path reusing combine_residual on the op's own parts gets the op's output exactly."""
    q, k, v = rand_qkv(2, 33, 4, 2, 8, dtype, seed=22)
    g = torch.Generator().manual_seed(3)
    extra = {}
    if combine == "add":
        extra["gate"] = torch.randn(2, 33, 4, generator=g).to(dtype)
        if norm:
            extra["norm_weight"] = 0.5 + torch.rand(8, generator=g)
    out, aux = spla_attention(q, k, v, Selection(block_size=4, topk=3), combine=combine, return_aux=True, **extra)
    again = combine_residual(aux.o_sparse, aux.residual, combine=combine, lse=aux.lse, **extra)
    assert again.dtype == dtype and torch.equal(again, out)
    if combine == "add":
        assert aux.gate_abs.item() == pytest.approx(extra["gate"].float().abs().mean().item())


def test_rms_norm_formula():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    w = torch.rand(8, generator=torch.Generator().manual_seed(5))
    ref = x.double() / (x.double().square().mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    assert_close(rms_norm(x, w), ref)
    assert_close(rms_norm(x), ref / w.double())
    assert rms_norm(x.bfloat16(), w).dtype == torch.bfloat16


def _residual_case():
    q, k, v = rand_qkv(1, 16, 4, 2, 8, seed=23)
    return q, k, v, Selection(block_size=4, topk=2)


@pytest.mark.parametrize(("name", "kw"), [
    ("gate", dict(combine="joint", gate=torch.ones(1, 16, 4))),
    ("norm_weight", dict(combine="joint", norm_weight=torch.ones(8))),
    ("gate", dict(rla="none", gate=0.5)),
    ("norm_weight", dict(rla="none", norm_weight=torch.ones(8))),
    ("phi_q", dict(rla="none", phi_q=torch.ones(1, 16, 4, 8), phi_k=torch.ones(1, 16, 2, 8))),
    ("phi_k", dict(phi_q=torch.ones(1, 16, 4, 8))),
    ("phi_q", dict(phi_q=torch.ones(1, 16, 2, 8), phi_k=torch.ones(1, 16, 2, 8))),
    ("phi_q", dict(phi_q=torch.ones(1, 15, 4, 8), phi_k=torch.ones(1, 15, 2, 8))),
    ("phi_k", dict(phi_q=torch.ones(1, 16, 4, 8), phi_k=torch.ones(1, 16, 2, 6))),
    ("norm_weight", dict(norm_weight=torch.ones(9))),
    ("norm_weight", dict(norm_weight=[1.0] * 8)),
    ("gate", dict(gate="0.5")),
    ("gate", dict(gate=torch.ones(1, 16, 4, dtype=torch.int64))),
    ("selection", dict(selection=dict(block_size=4, topk=2))),
])
def test_residual_inputs_are_checked(name, kw):
    q, k, v, selection = _residual_case()
    selection = kw.pop("selection", selection)
    with pytest.raises(ValueError, match=name):
        spla_attention(q, k, v, selection, **kw)


@pytest.mark.parametrize(("name", "kw"), [
    ("residual", dict(residual=torch.zeros(1, 16, 4, 8), combine="joint")),
    ("residual", dict(residual=torch.zeros(1, 16, 4, 9))),
    ("lse", dict(residual=torch.zeros(1, 16, 4, 9), combine="joint")),
    ("combine", dict(combine="mul")),
    ("gate", dict(gate=torch.ones(1, 16, 2))),
])
def test_combine_residual_checks_its_arguments(name, kw):
    args = dict(residual=torch.zeros(1, 16, 4, 8)) | kw
    with pytest.raises(ValueError, match=name):
        combine_residual(torch.zeros(1, 16, 4, 8), **args)
