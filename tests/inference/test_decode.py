"""Decoding with a KV cache equals the full forward pass, for every attention variant.

Prefill then token by token, and prompts prefilled in several chunks: the logits equal those of one forward over
the whole sequence (float32, relative 1e-4), block sizes 4 and 8, sink blocks 0 and 1, lengths crossing block
boundaries. ``scorer=random`` and ``query_block > 1`` are left out: their training-time selections are not a
function of the past alone. A decode step reads no unselected block (their K/V are NaN-poisoned); chunks are
causal; the cache's statistics and states equal those computed from scratch.
"""

from __future__ import annotations

import pytest
import torch
from inference_helpers import VOCAB, rel_err, tiny_model

from spla_lit import ops
from spla_lit.ops.utils import cdiv

SPLA_VARIANTS = {
    "taylor2": ["model=spla"],
    "taylor2-full": ["model=spla", "scorer.covariance=full"],
    "taylor2-lowrank": ["model=spla", "scorer.covariance=lowrank", "scorer.rank=3"],
    "taylor2-max": ["model=spla", "scorer.head_reduce=max"],
    "taylor1": ["model=spla", "scorer=taylor1"],
    "oracle": ["model=spla", "scorer=oracle"],
    "no-rla": ["model=spla", "rla=none"],
    "explicit": ["model=spla", "rla=explicit"],
    "explicit-joint": ["model=spla", "rla=explicit", "rla.combine=joint"],
    "joint": ["model=spla", "rla.combine=joint"],
    "unnormalized": ["model=spla", "rla.normalize=false", "rla.norm=false"],
    "taylor-features": ["model=spla", "rla.feature_map=taylor"],
    "relu-features": ["model=spla", "rla.feature_map=relu", "rla.normalize=false"],  # normalized relu: den ~ 0
    "window": ["model=spla", "sparse=window", "sparse.local_blocks=2"],
    "window-no-rla": ["model=spla", "sparse=window", "sparse.local_blocks=2", "rla=none"],
    "local2": ["model=spla", "sparse.local_blocks=2", "sparse.topk=4"],
}
CASES = ([pytest.param(["model=dense"], 4, 0, id="dense"), pytest.param(["model=linear"], 4, 0, id="linear")]
         + [pytest.param(o, bs, sink, id=f"{name}-bs{bs}-sink{sink}") for name, o in SPLA_VARIANTS.items()
            for bs in (4, 8) for sink in (0, 1)])
N = 41  # crosses block boundaries at both block sizes; 5 to 11 blocks against topk 3 (+ sink)


def _decode(net, x, chunks):
    """Logits of feeding x [B, N] to a fresh cache in chunks of the given sizes (the rest one token at a time)."""
    cache = net.new_cache(x.shape[0], x.shape[1] + 3)
    out, t = [], 0
    for size in [*chunks, *[1] * x.shape[1]]:
        if t >= x.shape[1]:
            break
        out.append(net(x[:, t:t + size], cache=cache))
        t += size
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("overrides,block_size,sink", CASES)
@torch.no_grad()
def test_decode_equals_full_forward(overrides, block_size, sink):
    net = tiny_model(overrides, block_size=block_size, sink=sink)
    x = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(1))
    full = net(x)
    token_by_token, cache = _decode(net, x, [7])  # a prompt of 7, then one token at a time
    assert rel_err(token_by_token, full) < 1e-4
    assert cache.lengths_list() == [N, N] and cache.lengths.tolist() == [N, N]
    chunked, _ = _decode(net, x, [5, block_size + 3, 1, 2 * block_size, 6])  # chunks off the block grid
    assert rel_err(chunked, full) < 1e-4


@torch.no_grad()
def test_selection_leaves_blocks_out_so_the_residual_matters():
    """The variants above select fewer blocks than there are, and the residual changes the output."""
    net = tiny_model(["model=spla"])
    x = torch.randint(0, VOCAB, (1, N))
    sel = net.layers[0].attn.selection
    assert cdiv(N, sel.block_size) > sel.topk
    plain = tiny_model(["model=spla", "rla=none"])
    plain.load_state_dict(net.state_dict(), strict=False)
    assert rel_err(plain(x), net(x)) > 1e-3


def _layer_selections(monkeypatch):
    """Record the selection of every ``ops.spla_decode`` call."""
    seen = []
    original = ops.spla_decode

    def recording(*args, **kwargs):
        out, aux = original(*args, **{**kwargs, "return_aux": True})
        seen.append(aux.block_idx)
        return out

    monkeypatch.setattr(ops, "spla_decode", recording)
    return seen


NO_READ = ["taylor2", "taylor2-full", "taylor2-lowrank", "taylor1", "no-rla", "joint", "window", "unnormalized"]


@pytest.mark.parametrize("name", NO_READ)
@pytest.mark.parametrize("block_size", [4, 8])
@torch.no_grad()
def test_decode_step_never_reads_unselected_blocks(monkeypatch, name, block_size):
    """Overwrite the K/V of every unselected block (and the unwritten tail) with NaN: same finite output."""
    net = tiny_model(SPLA_VARIANTS[name], block_size=block_size, sink=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (2, 6 * block_size + 3), generator=g)
    nxt = torch.randint(0, VOCAB, (2, 1), generator=g)
    cache = net.new_cache(2, x.shape[1] + 4)
    net(x, cache=cache)
    saved = [{n: t.clone() for n, t in layer.tensors().items()} for layer in cache.layers]
    lengths = (cache.lengths.clone(), cache.host_lengths.clone())
    seen = _layer_selections(monkeypatch)
    ref = net(nxt, cache=cache)
    assert len(seen) == len(net.layers)
    cache.lengths.copy_(lengths[0])
    cache.host_lengths.copy_(lengths[1])
    bs, M = block_size, cache.max_seq_len
    for layer, tensors, block_idx in zip(cache.layers, saved, seen):
        for n, t in tensors.items():
            getattr(layer, n).copy_(t)
        nK = cdiv(M, bs)
        keep = torch.zeros(2, layer.spec.kv_heads, nK + 1, dtype=torch.bool)
        keep.scatter_(-1, torch.where(block_idx[:, :, 0] < 0, nK, block_idx[:, :, 0]).long(), True)
        unread = (~keep[..., :nK]).repeat_interleave(bs, -1)[..., :M].transpose(1, 2)  # [B, M, Hkv]
        unread |= (torch.arange(M) > x.shape[1])[None, :, None]  # past the new token: never written
        assert unread.any()
        layer.k[unread] = float("nan")
        layer.v[unread] = float("nan")
    seen.clear()
    out = net(nxt, cache=cache)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["taylor2", "taylor2-full", "taylor2-lowrank", "taylor1", "joint"])
@torch.no_grad()
def test_cache_statistics_and_states_equal_from_scratch(name):
    """Block moments of the complete blocks, the running sums of the partial one and the linear state equal what
    ``ops.block_key_stats`` and a direct sum compute from the cached keys, for rows of different lengths."""
    net = tiny_model(SPLA_VARIANTS[name], block_size=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, VOCAB, (2, 30), generator=g)
    cache = net.new_cache(2, 40)
    net(x[:1, :9], cache=cache.rows(0, 1))  # row 0: a prompt of 9, then chunks and single tokens
    net(x[1:, :14], cache=cache.rows(1, 2))  # row 1: a prompt of 14
    net(x[:, 14:20], cache=cache)
    for t in range(20, 23):
        net(x[:, t:t + 1], cache=cache)
    assert cache.lengths_list() == [18, 23]
    for attn, layer in zip((b.attn for b in net.layers), cache.layers):
        sel, spec = attn.selection, layer.spec
        for row, n in enumerate(cache.lengths_list()):
            k = layer.k[row:row + 1, :n]
            full = n // sel.block_size
            cov = spec.covariance
            count, mean, second = ops.block_key_stats(k, sel.block_size, cov, spec.rank)
            torch.testing.assert_close(layer.mean[row, :, :full], mean[0, :, :full], rtol=1e-5, atol=1e-5)
            if cov == "diag":
                torch.testing.assert_close(layer.var[row, :, :full], second[0, :, :full], rtol=1e-4, atol=1e-5)
                partial = k[0, full * sel.block_size:].transpose(0, 1)  # [Hkv, n % bs, D]
                torch.testing.assert_close(layer.run_sq[row], partial.square().sum(1), rtol=1e-5, atol=1e-5)
            elif cov == "full":
                torch.testing.assert_close(layer.cov[row, :, :full], second[0, :, :full], rtol=1e-4, atol=1e-5)
            elif cov == "lowrank":
                U, lam = second
                got = layer.eig_vecs[row, :, :full] * layer.eig_vals[row, :, :full, None]
                want = U[0, :, :full] * lam[0, :, :full, None]
                torch.testing.assert_close(got @ layer.eig_vecs[row, :, :full].transpose(-1, -2),
                                           want @ U[0, :, :full].transpose(-1, -2), rtol=1e-4, atol=1e-4)
            partial = k[0, full * sel.block_size:].transpose(0, 1)
            torch.testing.assert_close(layer.run_sum[row], partial.sum(1), rtol=1e-5, atol=1e-5)
            if layer.state is not None:
                phi = ops.feature_map(attn.rla.feature_map_name)
                v = layer.v[row, :n]
                v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
                want = torch.einsum("nhf,nhe->hfe", phi(k[0]), v1)
                torch.testing.assert_close(layer.state[row], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [["model=spla"], ["model=spla", "rla.combine=joint"], ["model=dense"],
                                       ["model=linear"], ["model=spla", "scorer=taylor1", "rla=none"]],
                         ids=lambda o: ",".join(o))
@torch.no_grad()
def test_chunk_decoding_is_causal(overrides):
    """Within a chunk continuing a cache, changing later tokens leaves earlier logits unchanged (the chunk's later
    blocks, statistics and state never reach an earlier token)."""
    net = tiny_model(overrides)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB, (2, 30), generator=g)
    cache = net.new_cache(2, 30)
    net(x[:, :6], cache=cache)
    saved = [t.clone() for layer in cache.layers for t in layer.tensors().values()]
    ref = net(x[:, 6:], cache=cache)
    for i in (0, 5, 13):
        cache.lengths.fill_(6)
        cache.host_lengths.fill_(6)
        for t, s in zip((t for layer in cache.layers for t in layer.tensors().values()), saved):
            t.copy_(s)
        y = x[:, 6:].clone()
        y[:, i + 1:] = torch.randint(0, VOCAB, y[:, i + 1:].shape, generator=g)
        out = net(y, cache=cache)
        torch.testing.assert_close(out[:, :i + 1], ref[:, :i + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[:, i + 1:], ref[:, i + 1:])


@torch.no_grad()
def test_random_scorer_decodes():
    """scorer=random is left out of the equality tests (its training selection is not a function of the past),
    but it decodes: the prompt's logits are the full forward's, and decode steps draw their own blocks."""
    net = tiny_model(["model=spla", "scorer=random"])
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    logits, cache = _decode(net, x, [20])
    assert torch.isfinite(logits).all() and cache.lengths_list() == [30, 30]
    assert rel_err(logits[:, :20], net(x[:, :20])) < 1e-5
    assert net.generate(x, 4).shape == (2, 4)
