"""What the kernel path keeps for the backward, and that keeping less changes no number.

``feature_map=`` on the fused sparse kernel and on the residual (and ``recompute_features`` on the op): the
backward recomputes ``phi_q = feature_map(q)`` / ``phi_k = feature_map(k)`` from q and k (kept anyway) instead of
keeping the features. Gradients must be bit-identical to keeping them, and the saved storages must no longer
include phi_q. Tiny shapes under the Triton interpreter; buffers poisoned.
"""

import pytest
import torch
from reference import random_block_idx

import spla_kernels.linear as lin
import spla_kernels.residual as res
import spla_kernels.sparse as sp
from spla_lit import ops
from spla_lit.ops.feature_maps import feature_map
from spla_lit.ops.linear_attention import has_unselected_keys

POISONED = (lin, res, sp)


def saved_storages(fn) -> dict[int, tuple[tuple[int, ...], torch.dtype]]:
    """data_ptr -> (shape, dtype) of every storage autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def _inputs(seed=0, N=70, Hq=4, Hkv=2, D=16, cu=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, N, h, D, generator=g).bfloat16().requires_grad_() for h in (Hq, Hkv, Hkv))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    if cu is None:
        idx = random_block_idx(1, Hkv, N, 8, 3, seed=seed)
    else:
        idx = torch.cat([random_block_idx(1, Hkv, e - s, 8, 3, seed=s) for s, e in zip(cu[:-1], cu[1:])], dim=2)
    return q, k, v, idx, cu_t


@pytest.mark.parametrize("fmap", ["elu1", "relu"])
def test_kernels_recompute_features_same_gradients_less_saved(fmap):
    q, k, v, idx, cu = _inputs(cu=[0, 29, 70])
    phi = feature_map(fmap)
    g = torch.Generator().manual_seed(1)
    results, saved = [], []
    for recompute in (None, fmap):
        pq, pk = phi(q), phi(k)

        def run(pq=pq, pk=pk, recompute=recompute):
            o, lse, sel = sp.sparse_attention_with_selected_linear(q, k, v, pq, pk, idx, block_size=8, query_block=1,
                                                                   scale=0.25, with_normalizer=True, cu_seqlens=cu,
                                                                   feature_map=recompute)
            nonempty = has_unselected_keys(idx, q.shape[1], 8, 1, cu)
            r = res.subtract_residual(pq, pk, v, sel, nonempty, normalize=True, cu_seqlens=cu,
                                      feature_map=recompute, q=q, k=k)
            return o, r

        saved.append(saved_storages(run))
        o, r = run()
        do, dr = torch.randn(o.shape, generator=g).bfloat16(), torch.randn(r.shape, generator=g)
        g.manual_seed(1)
        results.append((o, r, torch.autograd.grad((o, r), (q, k, v), (do, dr))))
    (o0, r0, g0), (o1, r1, g1) = results
    assert torch.equal(o0, o1) and torch.equal(r0, r1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # kept [1, 70, 4, 16] bf16 tensors: q, phi_q and o_sparse without recompute; q and o_sparse with
    assert [sum(s == ((1, 70, 4, 16), torch.bfloat16) for s in kept.values()) for kept in saved] == [3, 2]


def test_spla_attention_recomputes_its_own_features():
    q, k, v, _, _ = _inputs(seed=3, N=64)
    sel = ops.Selection(block_size=8, topk=3)
    g = torch.Generator().manual_seed(2)
    gate = torch.rand(1, 64, 4, generator=g)
    outs = []
    for recompute in (False, None, True):
        kw = dict(gate=gate, impl="triton", recompute_features=recompute)
        out = ops.spla_attention(q, k, v, sel, **kw)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        kept = saved_storages(lambda kw=kw: ops.spla_attention(q, k, v, sel, **kw))
        n_big = sum(s == ((1, 64, 4, 16), torch.bfloat16) for s in kept.values())
        outs.append((out, grads, n_big))
    for out, grads, _ in outs[1:]:
        assert torch.equal(out, outs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, outs[0][1]))
    # kept [1, 64, 4, 16] bf16 tensors: q, phi_q, o_sparse without recompute; q, o_sparse with (default here)
    assert [n for _, _, n in outs] == [3, 2, 2]
    # Given features with the promise: the same numbers
    phi = feature_map("elu1")
    out = ops.spla_attention(q, k, v, sel, phi_q=phi(q), phi_k=phi(k), gate=gate, impl="triton",
                             recompute_features=True)
    assert torch.equal(out, outs[0][0])
    with pytest.raises(ValueError, match="recompute_features"):
        ops.spla_attention(q, k, v, sel, impl="triton", recompute_features="yes")
