"""Linear-attention pieces: the causal scan, the selected part, the residual by subtraction and explicitly."""

from __future__ import annotations

import pytest
import torch
from reference import (
    all_blocks_idx,
    assert_close,
    causal_mask,
    cdiv,
    dense_selected_mask,
    masked_linear_attention,
    rand_qkv,
    random_block_idx,
)

from spla_lit.ops import (
    FEATURE_MAPS,
    Selection,
    causal_linear_attention,
    explicit_residual_linear_attention,
    feature_dim,
    feature_map,
    residual_linear_attention,
    score_and_select,
    selected_linear_attention,
)

elu1 = feature_map("elu1")


def _features(B, N, Hq, Hkv, F, dtype=torch.float32, seed=0, Dv=None, positive=True):
    q, k, v = rand_qkv(B, N, Hq, Hkv, F, dtype, seed=seed, Dv=Dv)
    if positive:
        q, k = elu1(q), elu1(k)
    return q, k, v


def _scaled_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute tolerance relative to the largest magnitude (the subtraction cancels large terms)."""
    rel = 2e-2 if dtype == torch.bfloat16 else 2e-6
    return rel * max(1.0, float(ref.abs().max()))


def _expected_residual(phi_q, phi_k, v, idx, block_size, query_block, mode, eps=1e-6):
    N = phi_q.shape[1]
    unsel = causal_mask(N) & ~dense_selected_mask(idx, N, block_size, query_block)
    num, den = masked_linear_attention(phi_q, phi_k, v, unsel)
    return _finish(num, den, mode, eps)


def _finish(num, den, mode, eps=1e-6):
    if mode == "plain":
        return num
    if mode == "normalizer":
        return torch.cat([num, den[..., None]], dim=-1)
    return num / (den[..., None].clamp_min(0) + eps)


# ---------------------------------------------------------------------------------------- causal scan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "chunk_size"), [(16, 4), (16, 5), (37, 8), (37, 64), (13, 1), (24, 24), (30, 7)])
def test_causal_linear_attention_matches_naive(N, chunk_size, dtype):
    Hq, Hkv = (4, 2) if N % 2 else (2, 2)
    q, k, v = _features(2, N, Hq, Hkv, 8, dtype, seed=N * 100 + chunk_size, Dv=5, positive=False)
    out = causal_linear_attention(q, k, v, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (2, N, Hq, 5)
    ref, _ = masked_linear_attention(q, k, v, causal_mask(N)[None, None].expand(2, Hkv, N, N))
    assert_close(out, ref, rtol=1e-5, atol=_scaled_atol(ref, torch.float32))


def test_causal_linear_attention_chunk_size_invariant():
    q, k, v = _features(1, 41, 4, 2, 8, seed=7)
    outs = [causal_linear_attention(q, k, v, chunk_size=c) for c in (1, 3, 8, 41, 100)]
    for o in outs[1:]:
        assert_close(o, outs[0], rtol=1e-5, atol=_scaled_atol(outs[0], torch.float32))


@pytest.mark.parametrize("lengths", [[5, 11, 16], [1, 20], [9]])
def test_causal_linear_attention_packed(lengths):
    N = sum(lengths)
    q, k, v = _features(1, N, 4, 2, 8, seed=N)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    out = causal_linear_attention(q, k, v, chunk_size=4, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = causal_linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], chunk_size=4)
        assert_close(out[:, s:e], sep, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- selected part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("query_block", "block_size", "topk"), [(1, 4, 3), (1, 8, 2), (4, 4, 2), (2, 4, 3),
                                                                  (8, 4, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selected_linear_attention_matches_dense_mask(query_block, block_size, topk, dtype, seed):
    B, N, Hq, Hkv = 2, 27, 4, 2
    q, k, v = _features(B, N, Hq, Hkv, 8, dtype, seed=seed + 10 * block_size, Dv=6, positive=False)
    idx = random_block_idx(B, Hkv, N, block_size, topk, seed=seed, query_block=query_block)
    out = selected_linear_attention(q, k, v, idx, block_size=block_size, query_block=query_block)
    assert out.dtype == torch.float32 and out.shape == (B, N, Hq, 6)
    ref, _ = masked_linear_attention(q, k, v, dense_selected_mask(idx, N, block_size, query_block))
    assert_close(out, ref, rtol=1e-5, atol=_scaled_atol(ref, torch.float32))


def test_selected_linear_attention_packed():
    lengths = [6, 13, 9]
    N, bs = sum(lengths), 4
    q, k, v = _features(1, N, 2, 1, 8, seed=11)
    cu = torch.tensor([0, 6, 19, 28], dtype=torch.int32)
    idx = torch.cat([random_block_idx(1, 1, n, bs, 2, seed=n) for n in lengths], dim=2)
    out = selected_linear_attention(q, k, v, idx, block_size=bs, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = selected_linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], idx[:, :, s:e], block_size=bs)
        assert_close(out[:, s:e], sep, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- residual


MODES = [("plain", dict(normalize=False)), ("normalized", dict(normalize=True)),
         ("normalizer", dict(return_normalizer=True)), ("normalizer", dict(normalize=True, return_normalizer=True))]


@pytest.mark.parametrize("fn", [residual_linear_attention, explicit_residual_linear_attention])
@pytest.mark.parametrize(("mode", "kwargs"), MODES)
@pytest.mark.parametrize(("B", "N", "Hq", "Hkv", "block_size", "query_block"),
                         [(2, 37, 4, 2, 8, 1), (1, 32, 2, 2, 4, 1), (1, 30, 4, 1, 4, 4), (2, 21, 2, 1, 4, 2)])
def test_all_blocks_selected_residual_is_exactly_zero(fn, mode, kwargs, B, N, Hq, Hkv, block_size, query_block):
    q, k, v = _features(B, N, Hq, Hkv, 8, seed=N + block_size)
    idx = all_blocks_idx(B, Hkv, cdiv(N, query_block), cdiv(N, block_size))
    r = fn(q, k, v, idx, block_size=block_size, query_block=query_block, **kwargs)
    assert r.shape == (B, N, Hq, 9 if mode == "normalizer" else 8)
    assert torch.count_nonzero(r) == 0
    # The -1 padded selection of every visible block (what select_blocks returns) also leaves nothing.
    if query_block == 1:
        idx2 = score_and_select(q, k, Selection(block_size=block_size, topk=cdiv(N, block_size) + 1))
        assert torch.count_nonzero(fn(q, k, v, idx2, block_size=block_size, **kwargs)) == 0


@pytest.mark.parametrize("fn", [residual_linear_attention, explicit_residual_linear_attention])
@pytest.mark.parametrize(("mode", "kwargs"), MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "N", "Hq", "Hkv", "block_size", "query_block", "topk"),
                         [(2, 37, 4, 2, 4, 1, 3), (1, 40, 2, 2, 8, 1, 2), (2, 30, 4, 1, 4, 4, 3),
                          (1, 26, 4, 2, 4, 2, 2), (1, 33, 2, 1, 2, 8, 5), (1, 13, 2, 1, 1, 1, 3)])
def test_residual_matches_explicit_masked_linear_attention(fn, mode, kwargs, dtype, B, N, Hq, Hkv, block_size,
                                                           query_block, topk):
    seed = N * 13 + block_size + query_block
    q, k, v = _features(B, N, Hq, Hkv, 8, dtype, seed=seed, Dv=6)
    idx = random_block_idx(B, Hkv, N, block_size, topk, seed=seed, query_block=query_block)
    r = fn(q, k, v, idx, block_size=block_size, query_block=query_block, **kwargs)
    assert r.dtype == torch.float32
    ref = _expected_residual(q, k, v, idx, block_size, query_block, mode)
    assert r.shape == ref.shape
    # bf16 inputs: both sides see the same bf16 values, the op accumulates in fp32.
    atol = _scaled_atol(ref, torch.float32) * (10 if dtype == torch.bfloat16 else 1)
    assert_close(r, ref, rtol=1e-4, atol=atol)
    # Tokens whose causal keys are all selected have an exactly zero residual.
    unsel_any = (causal_mask(N) & ~dense_selected_mask(idx, N, block_size, query_block)).any(-1)  # [B, Hkv, N]
    empty = ~unsel_any.repeat_interleave(Hq // Hkv, dim=1).transpose(1, 2)  # [B, N, Hq]
    assert empty.any()
    assert torch.count_nonzero(r[empty]) == 0


@pytest.mark.parametrize("fn", [residual_linear_attention, explicit_residual_linear_attention])
@pytest.mark.parametrize(("mode", "kwargs"), MODES)
def test_residual_single_unselected_key(fn, mode, kwargs):
    """Edge case: exactly one unselected causal key (block_size 1, every block but block 0 selected)."""
    N = 7
    q, k, v = _features(1, N, 2, 1, 4, seed=3)
    idx = torch.full((1, 1, N, N), -1, dtype=torch.int32)
    idx[0, 0, 0, 0] = 0
    for i in range(1, N):
        idx[0, 0, i, :i] = torch.arange(1, i + 1)
    r = fn(q, k, v, idx, block_size=1, **kwargs)
    ref = _expected_residual(q, k, v, idx, 1, 1, mode)
    assert_close(r, ref, rtol=1e-5, atol=_scaled_atol(ref, torch.float32))
    assert torch.count_nonzero(r[:, 0]) == 0
    assert (r[:, 1:].abs().amax(-1) > 0).all()


@pytest.mark.parametrize(("mode", "kwargs", "positive"),
                         [(m, kw, True) for m, kw in MODES] + [(m, kw, False) for m, kw in MODES if m != "normalized"])
def test_subtract_equals_explicit(mode, kwargs, positive):
    B, N, Hq, Hkv, bs = 2, 45, 4, 2, 4
    for seed in range(3):
        q, k, v = _features(B, N, Hq, Hkv, 8, seed=seed, positive=positive)
        idx = score_and_select(q, k, Selection(block_size=bs, topk=3, scorer="taylor2"))
        a = residual_linear_attention(q, k, v, idx, block_size=bs, **kwargs)
        b = explicit_residual_linear_attention(q, k, v, idx, block_size=bs, **kwargs)
        assert_close(a, b, rtol=1e-4, atol=_scaled_atol(b, torch.float32))


@pytest.mark.parametrize("fn", [residual_linear_attention, explicit_residual_linear_attention])
@pytest.mark.parametrize("kwargs", [dict(normalize=False), dict(normalize=True), dict(return_normalizer=True)])
def test_residual_packed_equals_separate(fn, kwargs):
    lengths = [11, 4, 17]
    N, bs = sum(lengths), 4
    q, k, v = _features(1, N, 4, 2, 8, seed=21)
    cu = torch.tensor([0, 11, 15, 32])
    idx = torch.cat([random_block_idx(1, 2, n, bs, 2, seed=n) for n in lengths], dim=2)
    out = fn(q, k, v, idx, block_size=bs, cu_seqlens=cu, **kwargs)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sep = fn(q[:, s:e], k[:, s:e], v[:, s:e], idx[:, :, s:e], block_size=bs, **kwargs)
        assert_close(out[:, s:e], sep, rtol=1e-5, atol=1e-5)
    # And the packed residual never reads across sequence boundaries: compare with the dense reference.
    mask = torch.zeros(1, 2, N, N, dtype=torch.bool)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        unsel = causal_mask(e - s) & ~dense_selected_mask(idx[:, :, s:e], e - s, bs)
        mask[:, :, s:e, s:e] = unsel
    num, den = masked_linear_attention(q, k, v, mask)
    mode = "normalizer" if kwargs.get("return_normalizer") else ("normalized" if kwargs["normalize"] else "plain")
    ref = _finish(num, den, mode)
    assert_close(out, ref, rtol=1e-4, atol=_scaled_atol(ref, torch.float32))


# ---------------------------------------------------------------------------------------- gradients


def _grad_inputs(N, Hq, Hkv, seed):
    q, k, v = rand_qkv(1, N, Hq, Hkv, 4, torch.float64, seed=seed, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize(("N", "chunk_size"), [(9, 4), (12, 5)])
def test_gradcheck_causal_linear_attention(N, chunk_size):
    q, k, v = _grad_inputs(N, 2, 1, N)
    f = lambda q, k, v: causal_linear_attention(elu1(q), elu1(k), v, chunk_size=chunk_size)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(("N", "block_size", "query_block"), [(10, 3, 1), (12, 2, 4)])
def test_gradcheck_selected_linear_attention(N, block_size, query_block):
    q, k, v = _grad_inputs(N, 2, 1, N)
    idx = random_block_idx(1, 1, N, block_size, 3, seed=N, query_block=query_block)
    f = lambda q, k, v: selected_linear_attention(q, k, v, idx, block_size=block_size, query_block=query_block)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [residual_linear_attention, explicit_residual_linear_attention])
@pytest.mark.parametrize("kwargs", [dict(normalize=False), dict(normalize=True), dict(return_normalizer=True)])
@pytest.mark.parametrize(("N", "block_size", "Hq", "Hkv"), [(11, 2, 2, 1), (8, 4, 2, 2)])
def test_gradcheck_residual(fn, kwargs, N, block_size, Hq, Hkv):
    q, k, v = _grad_inputs(N, Hq, Hkv, N + block_size)
    idx = random_block_idx(1, Hkv, N, block_size, 2, seed=N)

    def f(q, k, v):
        return fn(elu1(q), elu1(k), v, idx, block_size=block_size, **kwargs)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_feature_maps_shape_dtype_sign(name, dtype):
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = feature_map(name)(x)
    assert y.dtype == dtype
    assert y.shape == (2, 5, 3, feature_dim(name, 4))
    if name in ("elu1", "relu", "softmax"):
        assert (y >= 0).all()
    if name == "taylor":  # features can be negative, their dot products cannot: 1 + s + s^2/2 > 0
        assert ((y.double() @ y.double().transpose(-1, -2)) > 0).all()
    expected = {"elu1": torch.nn.functional.elu(x.double()) + 1, "relu": x.double().clamp_min(0),
                "identity": x.double(), "softmax": torch.softmax(x.double(), -1)}
    if name in expected:
        tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(y.double(), expected[name], rtol=tol, atol=tol)


def test_taylor_feature_map_estimates_exp():
    """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(D)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(7, 8, generator=g, dtype=torch.float64), torch.randn(7, 8, generator=g, dtype=torch.float64)
    phi = feature_map("taylor")
    s = (q * k).sum(-1) / 8**0.5
    torch.testing.assert_close((phi(q) * phi(k)).sum(-1), 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


def test_softmax_feature_map_is_float64_accurate():
    x = torch.randn(4, 6, 2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(feature_map("softmax")(x), torch.softmax(x, -1), rtol=1e-12, atol=1e-12)


def test_selected_linear_attention_prefix_is_causal_to_rounding():
    """Tiles are padded to the widest union in the sequence, so later selections may regroup the float sums of
    earlier tokens (masked terms contribute exact zeros): prefix outputs agree to rounding, not bit for bit."""
    N, bs, i = 40, 4, 19
    q, k, v = rand_qkv(1, N, 4, 2, 8, seed=0)
    g = torch.Generator().manual_seed(1)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, i + 1:] = 3 * torch.randn(x[:, i + 1:].shape, generator=g)
    idx, idx2 = (score_and_select(a, b, Selection(block_size=bs, topk=3)) for a, b in ((q, k), (q2, k2)))
    assert torch.equal(idx[:, :, : i + 1], idx2[:, :, : i + 1])  # selection itself is causal
    relu = feature_map("relu")
    s1 = selected_linear_attention(relu(q), relu(k), v, idx, block_size=bs)
    s2 = selected_linear_attention(relu(q2), relu(k2), v2, idx2, block_size=bs)
    torch.testing.assert_close(s1[:, : i + 1], s2[:, : i + 1], rtol=1e-5, atol=1e-5 * float(s1.abs().max()))
