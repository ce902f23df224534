"""Triton decode kernels (kernels/spla_kernels/decode.py) against the PyTorch references of ``spla_lit.ops.decode``,
on CPU via TRITON_INTERPRET=1, at tiny shapes (forward only: decoding has no backward).

Buffers the kernels allocate start NaN-poisoned (an unwritten element fails); the cached K/V of unselected blocks
and past each row's length are NaN too (the kernels must not read them); splits over blocks vary.
"""

from __future__ import annotations

import os
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from poison import PoisonTorch  # noqa: E402

import spla_kernels.decode as K  # noqa: E402
from spla_lit import ops  # noqa: E402
from spla_lit.options import Selection  # noqa: E402

B, HKV, D, BS = 2, 2, 16, 4


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(K, "torch", PoisonTorch())


def _stats(g, nK, covariance, rank=3):
    mean = torch.randn(B, HKV, nK, D, generator=g)
    if covariance == "diag":
        return mean, torch.rand(B, HKV, nK, D, generator=g) * 2
    if covariance == "lowrank":
        U = torch.linalg.qr(torch.randn(B, HKV, nK, D, D, generator=g))[0][..., :rank]
        return mean, (U, torch.rand(B, HKV, nK, rank, generator=g) * 3)
    return mean, None


@pytest.mark.parametrize("scorer,covariance,reduce", [("taylor2", "diag", "lse"), ("taylor2", "lowrank", "max"),
                                                      ("taylor1", "diag", "mean"), ("taylor2", "diag", "max")])
@pytest.mark.parametrize("sink,local", [(0, 1), (1, 2)])
def test_select_matches_reference(monkeypatch, scorer, covariance, reduce, sink, local):
    # several steps and splits over the 40 blocks
    monkeypatch.setattr(K, "CONFIG", replace(K.CONFIG, score_blocks=16))
    g = torch.Generator().manual_seed(0)
    nK = 40
    mean, second = _stats(g, nK, covariance if scorer == "taylor2" else None)
    q = torch.randn(B, 1, 4 * HKV, D, generator=g)
    sel = Selection(block_size=BS, topk=5 + sink, local_blocks=local, sink_blocks=sink, scorer=scorer,
                    covariance=covariance, head_reduce=reduce)
    for pos in ([[3], [150]], [[37], [101]]):  # a row inside its first block; rows far apart
        positions = torch.tensor(pos)
        ref = ops.decode_select(q, mean, second, positions, sel, impl="reference")
        got = ops.decode_select(q, mean, second, positions, sel, impl="triton")
        assert got.dtype == torch.int32 and got.shape == (B, HKV, 1, sel.topk)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scorer,covariance,reduce", [("taylor2", "diag", "lse"), ("taylor2", "lowrank", "max"),
                                                      ("taylor1", "diag", "mean")])
def test_select_half_precision_statistics_match_the_exact_reference(monkeypatch, dtype, scorer, covariance, reduce):
    """Half-precision q and statistics take the tensor-core products (bfloat16 with q^2 split in two parts,
    tf32x3 for float16): the selection equals the float64 reference of the same values, over many blocks in
    several tiles per split and several splits."""
    # blocks scored 16 per step; 4 "SMs" / 4 rows: one split, 2 rows: two
    monkeypatch.setattr(K, "CONFIG", replace(K.CONFIG, score_blocks=16, programs_per_sm=1))
    g = torch.Generator().manual_seed(5)
    nK = 150
    mean, second = _stats(g, nK, covariance if scorer == "taylor2" else None)
    mean = mean.to(dtype)
    if covariance == "lowrank" and second is not None:
        second = (second[0].to(dtype), second[1])
    elif second is not None:
        second = second.to(dtype)
    q = (torch.randn(B, 1, 4 * HKV, D, generator=g) * 1.5).to(dtype)
    sel = Selection(block_size=BS, topk=7, local_blocks=2, sink_blocks=1, scorer=scorer, covariance=covariance,
                    head_reduce=reduce)

    def f64(x):
        return tuple(f64(t) for t in x) if isinstance(x, tuple) else None if x is None else x.double()

    for pos, rows in (([[599], [433]], B), ([[599], [433]], 1)):
        positions = torch.tensor(pos[:rows])
        ref = ops.decode_select(q[:rows].double(), f64(mean)[:rows], _rows(f64(second), rows), positions, sel,
                                impl="reference")
        got = ops.decode_select(q[:rows], mean[:rows], _rows(second, rows), positions, sel, impl="triton")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _rows(x, n):
    return tuple(t[:n] for t in x) if isinstance(x, tuple) else None if x is None else x[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_ties_keep_the_lower_block_index(monkeypatch, dtype):
    """Blocks with equal statistics score exactly equal: the lower block index wins, in a tile, across the tiles
    of a split and across splits (the kernel's rule; torch.topk of the reference breaks ties its own way)."""
    monkeypatch.setattr(K, "CONFIG", replace(K.CONFIG, score_blocks=16))
    g = torch.Generator().manual_seed(6)
    nK = 100
    mean, var = _stats(g, nK, "diag")
    mean[:, :, 30:] = mean[:, :, 10:11]  # blocks 10 and 30..99 tie; 0..9 and 11..29 random
    var[:, :, 30:] = var[:, :, 10:11]
    mean[:, 0] = mean[:, 0, :1]  # KV head 0: every block ties
    var[:, 0] = var[:, 0, :1]
    mean, var = mean.to(dtype), var.to(dtype)
    q = torch.randn(B, 1, 4 * HKV, D, generator=g).to(dtype)
    q[:, :, 4:] *= 0.3  # head 1's tied score among its top blocks
    positions = torch.tensor([[399], [250]])
    for topk in (5, 12):
        sel = Selection(block_size=BS, topk=topk, local_blocks=1, sink_blocks=0)
        scores = ops.decode_block_scores(q.double(), mean.double(), var.double(), positions, sel)
        got = ops.decode_select(q, mean, var, positions, sel, impl="triton")
        for b in range(B):
            for h in range(HKV):
                s = scores[b, h, 0].tolist()
                s[int(positions[b, 0]) // BS] = float("inf")  # the own (local) block is forced
                want = sorted(sorted(range(nK), key=lambda j: (-s[j], j))[:topk])
                assert got[b, h, 0].tolist() == want, (topk, b, h)
        assert got[:, 0, 0, :-1].tolist() == [list(range(topk - 1))] * B  # head 0: the first blocks, then local


def test_select_declines_what_it_does_not_score():
    q = torch.randn(1, 1, 2, D)
    mean = torch.randn(1, 1, 3, D)
    with pytest.raises(NotImplementedError):
        K.decode_select_blocks(q, mean, torch.randn(1, 1, 3, D, D), torch.tensor([[9]]),
                               Selection(block_size=BS, topk=2, covariance="full"))
    with pytest.raises(NotImplementedError):
        K.decode_select_blocks(q, mean, None, torch.tensor([[9]]), Selection(block_size=BS, topk=2, scorer="oracle"))


def _cache(g, M, dtype):
    k = torch.randn(B, M, HKV, D, generator=g).to(dtype)
    v = torch.randn(B, M, HKV, D, generator=g).to(dtype)
    return k, v


def _poison_unselected(k, v, block_idx, positions):
    """NaN in every cached K/V row a one-token step must not read: unselected blocks and past the position."""
    M = k.shape[1]
    k, v = k.clone(), v.clone()
    blk = torch.arange(M) // BS
    for b in range(B):
        for h in range(HKV):
            chosen = set(block_idx[b, h, 0].tolist()) - {-1}
            bad = torch.tensor([int(x) not in chosen for x in blk]) | (torch.arange(M) > positions[b, 0])
            k[b, bad, h] = float("nan")
            v[b, bad, h] = float("nan")
    return k, v


@pytest.mark.parametrize("feature_map,normalizer", [("elu1", True), ("relu", False), ("softmax", True),
                                                    ("identity", False), (None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_step_matches_reference_and_reads_only_selected_blocks(monkeypatch, feature_map, normalizer, dtype):
    # 3 splits of the 6 selected blocks, which the combine reads in two rounds
    monkeypatch.setattr(K, "CONFIG", replace(K.CONFIG, programs_per_sm=3, combine_splits=2))
    g = torch.Generator().manual_seed(1)
    M, Hq = 64, 4 * HKV
    k, v = _cache(g, M, dtype)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype)
    positions = torch.tensor([[45], [21]])
    sel = Selection(block_size=BS, topk=6, sink_blocks=1)
    mean, second = _stats(g, M // BS, "diag")
    block_idx = ops.decode_select(q, mean, second, positions, sel, impl="reference")
    block_idx[1, 1, 0, -1] = -1  # a padded slot
    phi_q = None if feature_map is None else ops.feature_map(feature_map)(q)
    kw = dict(block_size=BS, scale=D**-0.5, phi_q=phi_q, feature_map=feature_map or "elu1",
              with_normalizer=normalizer)
    ref = ops.decode_sparse_attention(q, k, v, block_idx, positions, impl="reference", **kw)
    kp, vp = _poison_unselected(k, v, block_idx, positions)
    got = ops.decode_sparse_attention(q, kp, vp, block_idx, positions, impl="triton", **kw)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("o", "lse", "sel", "counts"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a.float()).all(), name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # relative to the largest entry: the selected-linear sums are large and cancel
        torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel * float(b.float().abs().max()), msg=name)


@pytest.mark.parametrize("rla,combine,normalize", [("subtract", "add", True), ("subtract", "joint", True),
                                                   ("none", "add", True), ("subtract", "add", False)])
@pytest.mark.parametrize("pos", [[[40], [17]], [[40], [9]]], ids=["partial", "all-selected"])
def test_spla_decode_step_triton_equals_reference(monkeypatch, rla, combine, normalize, pos):
    """The whole one-token step (selection, sparse part, selected-linear, state, combine) on both paths; the
    Triton one finishes the residual in the sparse kernel's combine (a row of 3 blocks, all selected, has an
    empty residual)."""
    fused = []
    kernel = K.decode_sparse_with_selected_linear
    monkeypatch.setattr(K, "decode_sparse_with_selected_linear",
                        lambda *a, **kw: fused.append(kw.get("state") is not None) or kernel(*a, **kw))
    g = torch.Generator().manual_seed(2)
    M, Hq, F = 48, 2 * HKV, D
    k, v = _cache(g, M, torch.float32)
    q = torch.randn(B, 1, Hq, D, generator=g)
    positions = torch.tensor(pos)
    mean, second = _stats(g, M // BS, "diag")
    state = torch.rand(B, HKV, F, D + 1, generator=g) * 5
    sel = Selection(block_size=BS, topk=3)
    kw = dict(block_stats=(mean, second), rla=rla, combine=combine, normalize=normalize)
    if rla != "none":
        kw.update(state=state, phi_q=ops.feature_map("elu1")(q))
        if combine == "add":
            kw.update(gate=torch.rand(B, 1, Hq, generator=g), norm_weight=torch.rand(D, generator=g) + 0.5)
    ref = ops.spla_decode(q, k, v, positions, sel, impl="reference", **kw)
    got = ops.spla_decode(q, k, v, positions, sel, impl="triton", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert fused == [rla == "subtract"]


@torch.no_grad()
def test_model_decoding_on_the_triton_path_equals_the_reference_forward():
    """Prefill (training kernels) then decode steps (decode kernels) of a tiny model == its reference forward."""
    from hydra.utils import instantiate
    from hydra_utils import make_cfg

    cfg = make_cfg(["model.d_model=32", "model.n_layers=2", "data.vocab_size=64", "sparse.block_size=4",
                    "sparse.topk=3", "sparse.sink_blocks=1", "impl=triton"])
    torch.manual_seed(0)
    net = instantiate(cfg.model).eval()
    for p in net.parameters():
        p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(3))
    for m in net.modules():
        if hasattr(m, "impl"):
            m.impl = "reference"
    full = net(x)
    for m in net.modules():
        if hasattr(m, "impl"):
            m.impl = "triton"
    cache = net.new_cache(2, 14)
    out = torch.cat([net(x[:, :11], cache=cache)] + [net(x[:, t:t + 1], cache=cache) for t in range(11, 14)], 1)
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()))


@pytest.mark.parametrize("spec_kw", [dict(block_size=BS, covariance="diag", state_dim=D),
                                     dict(block_size=BS, covariance=None), dict(), dict(keys=False, state_dim=D)],
                         ids=["spla-diag", "taylor1-no-rla", "dense", "linear"])
@torch.no_grad()
def test_append_kernel_matches_reference(monkeypatch, spec_kw):
    """One token per row (rows at different lengths, one completing its block): every cache tensor equal."""
    from spla_lit.inference.cache import KVCache, LayerCacheSpec

    calls = []
    kernel = K.decode_append
    monkeypatch.setattr(K, "decode_append", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    g = torch.Generator().manual_seed(4)
    caches = [KVCache([LayerCacheSpec(kv_heads=HKV, head_dim=D, value_dim=D, **spec_kw)], B, 24) for _ in range(2)]
    first = [torch.randn(1, n, HKV, D, generator=g) for n in (7, 10)]
    new = [torch.randn(B, 1, HKV, D, generator=g) for _ in range(2)]
    phi = ops.feature_map("elu1")
    for cache in caches:
        for b, kv in enumerate(first):  # ragged rows by the reference path
            rows = cache.rows(b, b + 1)
            rows.begin(kv.shape[1])
            rows.layers[0].append(kv, kv * 0.5, phi(kv), impl="reference")
            rows.advance(kv.shape[1])
    for cache, impl in zip(caches, ("reference", "triton")):
        cache.begin(1)
        cache.layers[0].append(new[0], new[1], phi(new[0]), impl=impl)
        cache.advance(1)
    assert calls == [1]
    ref, got = caches[0].layers[0].tensors(), caches[1].layers[0].tensors()
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
