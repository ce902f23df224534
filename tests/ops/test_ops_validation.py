"""Argument validation: every op raises ValueError naming the bad argument, before computing anything.

"Before computing anything" is checked with a TorchFunctionMode that fails the test as soon as an op calls a
heavy torch function (matmul, einsum, logsumexp, SDPA, topk, cumsum, eigh, softmax, exp) before raising.
"""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch
from reference import rand_qkv, random_block_idx
from torch.overrides import TorchFunctionMode

from spla_lit.ops import (
    Selection,
    block_scores,
    block_sparse_attention,
    causal_linear_attention,
    exact_block_log_mass,
    explicit_residual_linear_attention,
    feature_dim,
    feature_map,
    residual_linear_attention,
    score_and_select,
    select_blocks,
    selected_linear_attention,
    spla_attention,
)

B, N, HQ, HKV, D, BS = 1, 16, 4, 2, 8, 4
Q, K, V = rand_qkv(B, N, HQ, HKV, D, seed=0)
IDX = random_block_idx(B, HKV, N, BS, 3, seed=0)
Q2, K2, V2 = rand_qkv(2, N, HQ, HKV, D, seed=1)
IDX2 = random_block_idx(2, HKV, N, BS, 3, seed=1)

HEAVY = {"einsum", "matmul", "__matmul__", "__rmatmul__", "bmm", "logsumexp", "scaled_dot_product_attention",
         "topk", "cumsum", "eigh", "softmax", "exp", "linear"}


class _NoHeavyCompute(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HEAVY:
            raise AssertionError(f"computed {name} before validating the arguments")
        return func(*args, **(kwargs or {}))


# op name -> (function, positional argument names, default keyword arguments). A "selection" argument is built
# from the Selection fields among a case's overrides (on top of block_size=BS, topk=3), inside the checked call.
OPS = {
    "block_scores": (block_scores, ["q", "k", "selection"], {}),
    "score_and_select": (score_and_select, ["q", "k", "selection"], {}),
    "exact_block_log_mass": (exact_block_log_mass, ["q", "k"], dict(block_size=BS)),
    "block_sparse_attention": (block_sparse_attention, ["q", "k", "v", "block_idx"], dict(block_size=BS)),
    "causal_linear_attention": (causal_linear_attention, ["phi_q", "phi_k", "v"], {}),
    "selected_linear_attention": (selected_linear_attention, ["phi_q", "phi_k", "v", "block_idx"],
                                  dict(block_size=BS)),
    "residual_linear_attention": (residual_linear_attention, ["phi_q", "phi_k", "v", "block_idx"],
                                  dict(block_size=BS)),
    "explicit_residual_linear_attention": (explicit_residual_linear_attention, ["phi_q", "phi_k", "v", "block_idx"],
                                           dict(block_size=BS)),
    "spla_attention": (spla_attention, ["q", "k", "v", "selection"], {}),
}
SELECTION_FIELDS = {f.name for f in fields(Selection)}
DEFAULT_TENSORS = {"q": Q, "k": K, "v": V, "phi_q": Q, "phi_k": K, "block_idx": IDX}
BATCH2_TENSORS = {"q": Q2, "k": K2, "v": V2, "phi_q": Q2, "phi_k": K2, "block_idx": IDX2}


def _call(op, batch2=False, **overrides):
    fn, pos, kw = OPS[op]
    tensors = BATCH2_TENSORS if batch2 else DEFAULT_TENSORS
    if "selection" in pos and "selection" not in overrides:
        picked = {f: overrides.pop(f) for f in list(overrides) if f in SELECTION_FIELDS}
        overrides["selection"] = Selection(**({"block_size": BS, "topk": 3} | picked))
    args = [overrides.pop(p, tensors.get(p)) for p in pos]
    return fn(*args, **{**kw, **overrides})


def _assert_raises_naming(fn, name, also=None):
    with _NoHeavyCompute(), pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg), f"{name!r} not named in: {msg}"
    if also is not None:
        assert re.search(also, msg), f"{also!r} not in: {msg}"


def test_valid_calls_succeed():
    """The baseline the cases below perturb is itself valid (each case changes one thing)."""
    for op in OPS:
        out = _call(op)
        assert isinstance(out, torch.Tensor) and torch.isfinite(out.float()).any()
    selection = Selection(block_size=BS, topk=3)
    assert select_blocks(block_scores(Q, K, selection), selection).shape == (B, HKV, N, 3)


def _ops_with(arg):
    return [op for op, (_, pos, kw) in OPS.items()
            if arg in pos or arg in kw or ("selection" in pos and arg in SELECTION_FIELDS)]


def _first_two(op):
    pos = OPS[op][1]
    return pos[0], pos[1]


# ------------------------------------------------------------------------------------------ tensors


def _tensor_cases():
    cases = []
    for op in OPS:
        a, b = _first_two(op)
        cases += [
            (op, a, {a: Q[0]}, "4-D"),  # wrong rank
            (op, b, {b: K[None]}, "4-D"),
            (op, a, {a: Q.tolist()}, None),  # not a tensor
            (op, b, {b: K[..., :4]}, "head dim"),  # mismatched head dims
            (op, a, {a: Q[:, :, :3]}, "multiple"),  # Hq = 3 not a multiple of Hkv = 2
            (op, a, {a: Q.long()}, "float"),  # non-float dtype
            (op, a, {a: Q.bool()}, "float"),
            (op, b, {b: K.double()}, "dtype"),  # mismatched dtypes
            (op, b, {b: K[:, :15]}, None),  # mismatched sequence lengths
            (op, b, {b: K2}, None),  # mismatched batch
            (op, a, {a: Q[:, :0]}, "N = 0"),  # empty sequence
        ]
        if "v" in OPS[op][1]:
            cases += [
                (op, "v", {"v": V[0]}, "4-D"),
                (op, "v", {"v": V.bfloat16()}, "dtype"),
                (op, "v", {"v": V.int()}, "float"),
                (op, "v", {"v": V[:, :, :1]}, None),  # Hv != Hkv
                (op, "v", {"v": V[:, :12]}, None),
            ]
    return cases


@pytest.mark.parametrize(("op", "name", "overrides", "also"), _tensor_cases(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_bad_tensors(op, name, overrides, also):
    _assert_raises_naming(lambda: _call(op, **overrides), name, also)


# ------------------------------------------------------------------------------------------ scalars, choices


def _scalar_cases():
    cases = []
    for op in _ops_with("block_size"):
        for bad in (0, -4, 2.0, True, None):
            cases.append((op, "block_size", {"block_size": bad}))
    for op in [o for o in OPS if o not in ("causal_linear_attention", "exact_block_log_mass")]:
        cases += [(op, "query_block", {"query_block": 0}), (op, "query_block", {"query_block": -1}),
                  (op, "query_block", {"query_block": 3})]  # 3 and block_size 4 do not divide one another
    for op in ("block_scores", "score_and_select", "spla_attention"):
        cases += [(op, "scorer", {"scorer": "taylor3"}), (op, "covariance", {"covariance": "dense"}),
                  (op, "head_reduce", {"head_reduce": "sum"}), (op, "rank", {"rank": 0})]
    cases += [("spla_attention", "feature_map", {"feature_map": "cosine"}),
              ("spla_attention", "rla", {"rla": "implicit"}),
              ("spla_attention", "combine", {"combine": "concat"}),
              ("spla_attention", "gate", {"gate": torch.zeros(B, N, HKV)})]
    for op in ("block_scores", "score_and_select", "spla_attention"):
        cases += [(op, "selection", {"selection": {"block_size": BS}}), (op, "mode", {"mode": "sliding"})]
    for op in ("score_and_select", "block_sparse_attention", "causal_linear_attention", "selected_linear_attention",
               "residual_linear_attention", "spla_attention"):
        cases.append((op, "impl", {"impl": "cuda"}))
    return cases


@pytest.mark.parametrize(("op", "name", "overrides"), _scalar_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_bad_scalars_and_choices(op, name, overrides):
    _assert_raises_naming(lambda: _call(op, **overrides), name)


@pytest.mark.parametrize("op", ["score_and_select", "spla_attention"])
@pytest.mark.parametrize(("name", "bad"), [("topk", 0), ("topk", -2), ("local_blocks", 0), ("sink_blocks", -1)])
def test_bad_selection_args_raise(op, name, bad):
    """The error itself (computed or not)."""
    with pytest.raises(ValueError, match=name):
        _call(op, **{name: bad})


@pytest.mark.parametrize("op", ["score_and_select", "spla_attention"])
@pytest.mark.parametrize(("name", "bad"), [("topk", 0), ("local_blocks", 0), ("sink_blocks", -1)])
def test_bad_selection_args_raise_before_scoring(op, name, bad):
    _assert_raises_naming(lambda: _call(op, **{name: bad}), name)


@pytest.mark.parametrize(("name", "bad"), [("topk", 0), ("topk", -1), ("topk", 2.5), ("local_blocks", 0),
                                           ("sink_blocks", -1), ("block_size", 0), ("query_block", 0)])
def test_select_blocks_bad_scalars(name, bad):
    scores = block_scores(Q, K, Selection(block_size=BS))
    kw = {"topk": 3, "block_size": BS, name: bad}
    _assert_raises_naming(lambda: select_blocks(scores, Selection(**kw)), name)


@pytest.mark.parametrize("scores", [torch.zeros(2, 16, 4), [[0.0]], None])
def test_select_blocks_bad_scores(scores):
    _assert_raises_naming(lambda: select_blocks(scores, Selection(topk=3, block_size=BS)), "scores")


@pytest.mark.parametrize("fn", [lambda: feature_map("cosine"), lambda: feature_dim("cosine", 8)])
def test_unknown_feature_map(fn):
    _assert_raises_naming(fn, "feature_map")


@pytest.mark.parametrize("bad", [0, -3])
def test_causal_linear_attention_bad_chunk_size(bad):
    _assert_raises_naming(lambda: causal_linear_attention(Q, K, V, chunk_size=bad), "chunk_size")


# ------------------------------------------------------------------------------------------ block_idx


def _block_idx_cases():
    bad = {
        "3d": IDX[0],
        "wrong_hkv": IDX[:, :1],
        "wrong_nq": IDX[:, :, :15],
        "wrong_batch": IDX2,
        "float": IDX.float(),
        "int16": IDX.to(torch.int16),
        "list": IDX.tolist(),
    }
    ops = ["block_sparse_attention", "selected_linear_attention", "residual_linear_attention",
           "explicit_residual_linear_attention", "spla_attention"]
    return [(op, key, val) for op in ops for key, val in bad.items()]


@pytest.mark.parametrize(("op", "case", "bad"), _block_idx_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_bad_block_idx(op, case, bad):
    _assert_raises_naming(lambda: _call(op, block_idx=bad), "block_idx")


def test_block_idx_for_query_blocks_must_have_nq_rows():
    """With query_block 4 a selection has ceil(N / 4) rows; a per-token selection is rejected."""
    _assert_raises_naming(lambda: block_sparse_attention(Q, K, V, IDX, block_size=BS, query_block=4), "block_idx")


# ------------------------------------------------------------------------------------------ cu_seqlens


CU_BAD = {
    "not_from_0": torch.tensor([1, 5, 16]),
    "not_to_N": torch.tensor([0, 5, 15]),
    "past_N": torch.tensor([0, 5, 17]),
    "not_increasing": torch.tensor([0, 5, 5, 16]),
    "float": torch.tensor([0.0, 5.0, 16.0]),
    "2d": torch.tensor([[0, 5, 16]]),
    "single": torch.tensor([0]),
    "list": [0, 5, 16],
}
CU_OPS = ["block_scores", "score_and_select", "block_sparse_attention", "causal_linear_attention",
          "selected_linear_attention", "residual_linear_attention", "explicit_residual_linear_attention",
          "spla_attention"]


@pytest.mark.parametrize("case", list(CU_BAD))
@pytest.mark.parametrize("op", CU_OPS)
def test_bad_cu_seqlens(op, case):
    _assert_raises_naming(lambda: _call(op, cu_seqlens=CU_BAD[case]), "cu_seqlens")


@pytest.mark.parametrize("op", CU_OPS)
def test_cu_seqlens_needs_batch_one(op):
    _assert_raises_naming(lambda: _call(op, batch2=True, cu_seqlens=torch.tensor([0, 5, 16])), "cu_seqlens", "B")


@pytest.mark.parametrize("op", [o for o in CU_OPS if o != "causal_linear_attention"])
def test_cu_seqlens_needs_token_selection(op):
    idx4 = random_block_idx(B, HKV, N, BS, 3, seed=0, query_block=4)
    extra = {"block_idx": idx4} if "block_idx" in OPS[op][1] else {}
    _assert_raises_naming(lambda: _call(op, cu_seqlens=torch.tensor([0, 8, 16]), query_block=4, **extra),
                          "cu_seqlens", "query_block")


@pytest.mark.parametrize("case", ["not_from_0", "not_to_N", "not_increasing"])
def test_select_blocks_bad_cu_seqlens(case):
    scores = block_scores(Q, K, Selection(block_size=BS))
    _assert_raises_naming(lambda: select_blocks(scores, Selection(topk=3, block_size=BS), cu_seqlens=CU_BAD[case]),
                          "cu_seqlens")


def test_guard_catches_computation():
    """The no-computation guard is not vacuous: a valid call does trip it."""
    with _NoHeavyCompute(), pytest.raises(AssertionError, match="before validating"):
        block_sparse_attention(Q, K, V, IDX, block_size=BS)
