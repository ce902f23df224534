"""Triton sparse kernels (kernels/sparse.py) against the PyTorch references, on CPU via TRITON_INTERPRET=1.

Forward outputs (o, lse, sel) and the gradients of every input are compared with ``spla_lit.ops``'s
reference ops on fresh random inputs; kernel outputs are NaN-poisoned first (tests/kernels/conftest.py) so an
unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spla_kernels.sparse as S
from spla_kernels.config import SparseConfig
from spla_lit import ops

POISONED = (S,)


def _inputs(B, N, Hq, Hkv, D, dtype, seed, F_dim=None):
    g = torch.Generator().manual_seed(seed)
    F_dim = D if F_dim is None else F_dim
    q, k, v = (torch.randn(B, N, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    # elu1-like positive features (a leaf of their own, so their gradients are checked separately).
    pq = (F.elu(torch.randn(B, N, Hq, F_dim, generator=g)) + 1).to(dtype)
    pk = (F.elu(torch.randn(B, N, Hkv, F_dim, generator=g)) + 1).to(dtype)
    return [x.requires_grad_() for x in (q, k, v, pq, pk)]


def _random_idx(B, Hkv, N, bs, topk, query_block, seed):
    """Random per-(query block) selection: the diagonal block(s) plus random visible ones, ascending, -1 padded."""
    g = torch.Generator().manual_seed(seed)
    nq = -(-N // query_block)
    out = torch.full((B, Hkv, nq, topk), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t in range(nq):
                last = min((t + 1) * query_block, N) - 1
                forced = set(range((t * query_block) // bs, last // bs + 1))
                others = [c for c in range(last // bs + 1) if c not in forced]
                extra = torch.randperm(len(others), generator=g)[: max(0, topk - len(forced))].tolist()
                n_extra = int(torch.randint(0, len(extra) + 1, (1,), generator=g))
                chosen = sorted(forced | {others[i] for i in extra[:n_extra]})
                out[b, h, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-2


def _reference(q, k, v, pq, pk, idx, bs, qb, scale, norm, cu=None):
    o, lse = ops.block_sparse_attention(q, k, v, idx, block_size=bs, query_block=qb, scale=scale, return_lse=True,
                                        cu_seqlens=cu, impl="reference")
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1) if norm else v
    sel = ops.selected_linear_attention(pq, pk, vv, idx, block_size=bs, query_block=qb, cu_seqlens=cu,
                                        impl="reference")
    return o, lse, sel


def _check_fused(q, k, v, pq, pk, idx, bs, qb, norm, dtype, seed, cu=None, config=None):
    scale = q.shape[-1] ** -0.5
    out = S.sparse_attention_with_selected_linear(q, k, v, pq, pk, idx, block_size=bs, query_block=qb, scale=scale,
                                                  with_normalizer=norm, cu_seqlens=cu, config=config)
    ref = _reference(q, k, v, pq, pk, idx, bs, qb, scale, norm, cu)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    for name, a, b in zip(("o", "lse", "sel"), out, ref):
        assert a.shape == b.shape, name
        assert _rel(a, b) < _tol(dtype), (name, _rel(a, b))
    g = torch.Generator().manual_seed(seed + 1)
    ups = [torch.randn(x.shape, generator=g) for x in ref]
    leaves = [q, k, v, pq, pk]
    got = torch.autograd.grad(sum((a.float() * u).sum() for a, u in zip(out, ups)), leaves)
    want = torch.autograd.grad(sum((b.float() * u).sum() for b, u in zip(ref, ups)), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dphi_q", "dphi_k"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) < 3 * _tol(dtype), (name, _rel(a, b))


# (B, N, Hq, Hkv, D, block_size, topk, query_block, dtype, with_normalizer)
CASES = [
    (1, 70, 4, 2, 16, 16, 3, 1, torch.float32, True),  # GQA G=2, partial last block
    (2, 45, 2, 2, 32, 16, 2, 1, torch.bfloat16, False),  # G=1, batch of 2
    (1, 64, 16, 1, 16, 16, 2, 1, torch.bfloat16, True),  # G=16 (the benchmark's group), one KV head
    (1, 50, 4, 2, 16, 16, 2, 16, torch.float32, True),  # query blocks of 16 tokens
    (1, 37, 6, 2, 16, 8, 3, 4, torch.float32, False),  # G=3, blocks of 8 (padded tiles), query blocks of 4
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_fused_matches_reference(case):
    B, N, Hq, Hkv, D, bs, topk, qb, dtype, norm = case
    seed = sum(x for x in case if isinstance(x, int))
    q, k, v, pq, pk = _inputs(B, N, Hq, Hkv, D, dtype, seed)
    idx = _random_idx(B, Hkv, N, bs, topk, qb, seed)
    _check_fused(q, k, v, pq, pk, idx, bs, qb, norm, dtype, seed)


@pytest.mark.parametrize("config", [SparseConfig(fwd_rows=16, dq_rows=16, dkv_rows=16, window=8),
                                    SparseConfig(fwd_rows=64, dq_rows=64, dkv_rows=64, window=None),
                                    SparseConfig(fwd_rows=32, dq_rows=32, dkv_rows=32, window=16)],
                         ids=["16-w8", "64-whole", "32-w16"])
def test_tile_configs_agree(config):
    """Other group sizes and dK/dV windows (several items per unit: the atomics) give the same result."""
    q, k, v, pq, pk = _inputs(1, 48, 8, 2, 16, torch.float32, 7 + config.fwd_rows)
    idx = ops.score_and_select(q, k, ops.Selection(block_size=16, topk=2), impl="reference")  # a real selection
    _check_fused(q, k, v, pq, pk, idx, 16, 1, True, torch.float32, 3, config=config)
    # The softmax-only and selected-only entry points take the config too.
    o, _ = S.block_sparse_attention(q, k, v, idx, block_size=16, query_block=1, scale=0.25, config=config)
    o_ref = ops.block_sparse_attention(q, k, v, idx, block_size=16, scale=0.25, impl="reference")
    s = S.selected_linear_attention(pq, pk, v, idx, block_size=16, query_block=1, config=config)
    s_ref = ops.selected_linear_attention(pq, pk, v, idx, block_size=16, impl="reference")
    assert _rel(o, o_ref) < 1e-5 and _rel(s, s_ref) < 1e-5


def test_feature_dim_differs_from_head_dim():
    q, k, v, pq, pk = _inputs(1, 40, 4, 2, 16, torch.float32, 11, F_dim=32)
    idx = _random_idx(1, 2, 40, 16, 2, 1, 11)
    _check_fused(q, k, v, pq, pk, idx, 16, 1, True, torch.float32, 11)


def test_packed_sequences():
    """cu_seqlens: local block indices per sequence, nothing crosses a boundary (also the selection)."""
    lens = [23, 40, 9]
    N = sum(lens)
    cu = torch.tensor([0, 23, 63, 72], dtype=torch.int32)
    q, k, v, pq, pk = _inputs(1, N, 4, 2, 16, torch.bfloat16, 5)
    parts = [_random_idx(1, 2, n, 16, 2, 1, 5 + i) for i, n in enumerate(lens)]
    idx = torch.cat(parts, dim=2)
    _check_fused(q, k, v, pq, pk, idx, 16, 1, True, torch.bfloat16, 5, cu=cu)
    # Same numbers as running each sequence on its own.
    o = S.block_sparse_attention(q, k, v, idx, block_size=16, query_block=1, scale=0.25, cu_seqlens=cu)[0]
    s = 23
    o2 = S.block_sparse_attention(q[:, s:63], k[:, s:63], v[:, s:63], parts[1], block_size=16, query_block=1,
                                  scale=0.25)[0]
    assert _rel(o[:, s:63], o2) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_selected_is_dense_causal_sdpa(dtype):
    B, N, Hq, Hkv, D, bs = 1, 50, 4, 2, 16, 16
    q, k, v, _, _ = _inputs(B, N, Hq, Hkv, D, dtype, 21)
    nk = -(-N // bs)
    idx = torch.arange(nk, dtype=torch.int32).expand(B, Hkv, N, nk).contiguous()
    o, lse = S.block_sparse_attention(q, k, v, idx, block_size=bs, query_block=1, scale=D**-0.5)
    qq, kk, vv = (x.double().transpose(1, 2) for x in (q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(1, 2)
    s = (qq @ kk.transpose(-1, -2)) * D**-0.5
    lse_ref = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1)
    assert _rel(o, ref) < _tol(dtype)
    assert _rel(lse, lse_ref) < 1e-5
    # And its gradient is dense causal attention's.
    do = torch.randn_like(ref)
    got = torch.autograd.grad((o.double() * do).sum(), [q, k, v])
    want = torch.autograd.grad((ref * do).sum(), [q, k, v])
    for a, b in zip(got, want):
        assert _rel(a, b) < 3 * _tol(dtype)


def test_block_sparse_with_lse_gradient():
    """dlse flows into dq and dk (the joint combine differentiates through lse)."""
    q, k, v, _, _ = _inputs(1, 40, 4, 2, 16, torch.float32, 31)
    idx = _random_idx(1, 2, 40, 16, 3, 1, 31)
    o, lse = S.block_sparse_attention(q, k, v, idx, block_size=16, query_block=1, scale=0.25)
    o_r, lse_r = ops.block_sparse_attention(q, k, v, idx, block_size=16, scale=0.25, return_lse=True,
                                            impl="reference")
    gl = torch.randn_like(lse)
    got = torch.autograd.grad((lse * gl).sum() + o.sum(), [q, k, v])
    want = torch.autograd.grad((lse_r * gl).sum() + o_r.sum(), [q, k, v])
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_selected_linear_alone_and_through_dispatch():
    _, _, v, pq, pk = _inputs(1, 45, 4, 2, 16, torch.float32, 41)
    idx = _random_idx(1, 2, 45, 16, 2, 1, 41)
    sel = S.selected_linear_attention(pq, pk, v, idx, block_size=16, query_block=1)
    via_ops = ops.selected_linear_attention(pq, pk, v, idx, block_size=16, impl="triton")
    ref = ops.selected_linear_attention(pq, pk, v, idx, block_size=16, impl="reference")
    assert sel.dtype == torch.float32 and _rel(sel, ref) < 1e-5 and _rel(via_ops, ref) < 1e-5
    u = torch.randn_like(ref)
    got = torch.autograd.grad((sel * u).sum(), [pq, pk, v])
    want = torch.autograd.grad((ref * u).sum(), [pq, pk, v])
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_dispatch_block_sparse_triton():
    q, k, v, _, _ = _inputs(1, 33, 4, 1, 16, torch.float32, 51)
    idx = _random_idx(1, 1, 33, 16, 2, 1, 51)
    o = ops.block_sparse_attention(q, k, v, idx, block_size=16, impl="triton")
    ref = ops.block_sparse_attention(q, k, v, idx, block_size=16, impl="reference")
    assert _rel(o, ref) < 1e-5


def test_rejects_unsupported_feature_dim():
    q, k, v, _, _ = _inputs(1, 16, 2, 1, 16, torch.float32, 0)
    big = torch.ones(1, 16, 2, 300)
    idx = torch.zeros(1, 1, 16, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="feature dim"):
        S.sparse_attention_with_selected_linear(q, k, v, big, big[:, :, :1], idx, block_size=16, query_block=1,
                                                scale=0.25, with_normalizer=False)


@pytest.mark.parametrize("combine,normalize", [("add", True), ("add", False), ("joint", True)])
def test_spla_attention_triton_path_matches_reference(combine, normalize):
    """The whole op through the kernels (fused select, fused sparse + selected-linear, chunked linear
    attention, the cumulative-sum normalizer) equals the reference path, forward and gradients."""
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 70, h, 16, dtype=torch.float32, requires_grad=True) for h in (4, 2, 2))
    gate = torch.rand(1, 70, 4)
    kw = dict(combine=combine, normalize=normalize, gate=gate if combine == "add" else None)
    outs, grads = [], []
    for impl in ("reference", "triton"):
        o = ops.spla_attention(q, k, v, ops.Selection(block_size=16, topk=2), impl=impl, **kw)
        outs.append(o)
        grads.append(torch.autograd.grad(o.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-4, atol=2e-4)
    for g_t, g_r in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_t, g_r, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("window,cu", [(None, None), (8, None), (5, [0, 7, 16, 30]), (64, [0, 13, 30])])
def test_transposed_items_match_brute_force(window, cu):
    """The dK/dV work list (sized on the host, no device read) holds exactly the (window, bh, unit) token
    lists, in order, and the spare entries past them are empty."""
    from spla_kernels.sparse_index import items_bound, token_units, transposed_items

    B, Hkv, N, bs, topk = 2 if cu is None else 1, 2, 30, 4, 3
    cu_t = None if cu is None else torch.tensor(cu)
    idx = _random_idx(B, Hkv, N, bs, topk, 1, seed=3)
    if cu is not None:  # per-sequence local block indices: keep the entries visible in each sequence
        for s, e in zip(cu[:-1], cu[1:]):
            for t in range(s, e):
                for h in range(Hkv):
                    local = [c for c in idx[0, h, t].tolist() if 0 <= c * bs <= t - s]
                    idx[0, h, t] = torch.tensor((local + [-1] * topk)[:topk], dtype=torch.int32)
    tok_units, units = token_units(idx, N, bs, 1, cu_t)
    items = transposed_items(tok_units, units, bs, window)
    w = N if window is None else window
    expected = {}
    for bh in range(tok_units.shape[0]):
        for t in range(N):
            for u in tok_units[bh, t].tolist():
                if u >= 0:
                    expected.setdefault((t // w, bh, u), []).append(t)
    keys = sorted(expected, key=lambda k: ((k[0] * tok_units.shape[0] + k[1]) * units.count + k[2]))
    assert items.seg.numel() == items_bound(tok_units.shape[0], N, topk, units, bs, w) >= len(keys)
    got = []
    for i in range(items.seg.numel()):
        n = int(items.length[i])
        if n:
            seg = int(items.seg[i])
            toks = items.tokens[int(items.off[i]): int(items.off[i]) + n].tolist()
            got.append(((toks[0] // w, seg // units.count, seg % units.count), toks))
        else:
            assert i >= len(keys), "an empty item before the end of the list"
    assert [k for k, _ in got] == keys
    assert all(toks == expected[k] for k, toks in got)


def test_declines_where_the_table_has_no_tiles(monkeypatch):
    """A GPU class whose table entry is None (float32 on sm89) raises NotImplementedError before any launch
    (spla_lit.ops then runs its reference); an explicit config still runs."""
    monkeypatch.setattr(S, "arch_of", lambda device: "sm89")
    q, k, v, pq, pk = _inputs(1, 20, 2, 1, 16, torch.float32, 61)
    idx = _random_idx(1, 1, 20, 16, 2, 1, 61)
    with pytest.raises(NotImplementedError, match="sm89"):
        S.block_sparse_attention(q, k, v, idx, block_size=16, query_block=1, scale=0.25)
    o, _ = S.block_sparse_attention(q, k, v, idx, block_size=16, query_block=1, scale=0.25, config=SparseConfig())
    assert _rel(o, ops.block_sparse_attention(q, k, v, idx, block_size=16, scale=0.25, impl="reference")) < 1e-5
