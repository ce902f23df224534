"""Shared helpers for the ops and kernel tests: random inputs and independent (dense, float64) references.

The references here deliberately avoid ``spla_lit.ops`` helpers (``selected_key_mask`` and friends), so a
bug in the bookkeeping of the ops cannot hide behind the same bug in the test.
"""

from __future__ import annotations

import math

import torch

from spla_lit.ops.utils import cdiv


def rand_qkv(B: int, N: int, Hq: int, Hkv: int, D: int, dtype: torch.dtype = torch.float32, seed: int = 0,
             Dv: int | None = None, requires_grad: bool = False):
    """Random ``q [B, N, Hq, D]``, ``k [B, N, Hkv, D]``, ``v [B, N, Hkv, Dv]`` from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, Dv, generator=g, dtype=torch.float64)
    out = tuple(x.to(dtype) for x in (q, k, v))
    if requires_grad:
        out = tuple(x.requires_grad_() for x in out)
    return out



def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, N, Hkv, D] -> [B, N, Hkv * G, D]; query head h reads KV head h // G."""
    return x.repeat_interleave(groups, dim=2)


def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def all_blocks_idx(B: int, Hkv: int, nQ: int, nK: int) -> torch.Tensor:
    """Every key block for every query (block): [B, Hkv, nQ, nK] int32 (future blocks masked by causality)."""
    return torch.arange(nK, dtype=torch.int32).expand(B, Hkv, nQ, nK).contiguous()


def random_block_idx(B: int, Hkv: int, N: int, block_size: int, topk: int, seed: int,
                     query_block: int = 1) -> torch.Tensor:
    """A random valid selection [B, Hkv, nQ, topk]: every block overlapping the query block (the diagonal)
    plus random visible blocks, ascending, -1 padded. Built in plain Python, independently of the ops."""
    g = torch.Generator().manual_seed(seed)
    nQ = cdiv(N, query_block)
    out = torch.full((B, Hkv, nQ, topk), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t in range(nQ):
                first_tok, last_tok = t * query_block, min((t + 1) * query_block, N) - 1
                forced = list(range(first_tok // block_size, last_tok // block_size + 1))
                assert len(forced) <= topk
                others = [c for c in range(last_tok // block_size + 1) if c not in forced]
                perm = torch.randperm(len(others), generator=g).tolist()
                n_extra = int(torch.randint(0, topk - len(forced) + 1, (1,), generator=g))
                chosen = sorted(forced + [others[p] for p in perm[:n_extra]])
                out[b, h, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def dense_selected_mask(block_idx: torch.Tensor, N: int, block_size: int, query_block: int = 1) -> torch.Tensor:
    """Bool [B, Hkv, N, N]: key j is in token i's selected blocks and j <= i (independent of the ops)."""
    tok = block_idx.long().repeat_interleave(query_block, dim=2)[:, :, :N]  # [B, Hkv, N, topk]
    key_block = torch.arange(N) // block_size  # [N]
    sel = (key_block[None, None, None, :, None] == tok[:, :, :, None, :]).any(-1)  # [B, Hkv, N, N]
    return sel & causal_mask(N)


def masked_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """Linear attention under a dense mask, float64: returns (numerator [B, N, Hq, Dv], normalizer [B, N, Hq]).

    ``num_i = sum_{j: mask_ij} (phi_q_i . phi_k_j) v_j``, ``den_i = sum_{j: mask_ij} phi_q_i . phi_k_j``.
    """
    Hq, Hkv = phi_q.shape[2], phi_k.shape[2]
    G = Hq // Hkv
    pq = phi_q.double()
    pk = repeat_kv(phi_k.double(), G)
    vv = repeat_kv(v.double(), G)
    m = mask.repeat_interleave(G, dim=1).double()  # [B, Hq, N, N]
    a = torch.einsum("bihf,bjhf->bhij", pq, pk) * m
    return torch.einsum("bhij,bjhd->bihd", a, vv), a.sum(-1).transpose(1, 2)


def dense_causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                           mask: torch.Tensor | None = None):
    """Softmax attention in float64 with heads repeated for GQA: (o [B, N, Hq, Dv], lse [B, Hq, N]).
    ``mask`` [B, Hkv, N, N] defaults to causal."""
    B, N, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qq, kk, vv = q.double(), repeat_kv(k.double(), G), repeat_kv(v.double(), G)
    s = scale * torch.einsum("bihd,bjhd->bhij", qq, kk)
    m = causal_mask(N)[None, None] if mask is None else mask.repeat_interleave(G, dim=1)
    s = s.masked_fill(~m, float("-inf"))
    lse = s.logsumexp(-1)
    o = torch.einsum("bhij,bjhd->bihd", torch.exp(s - lse[..., None]), vv)
    return o, lse


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 rtol: float | None = None, atol: float | None = None, msg: str = "") -> None:
    """Compare in float64 with tolerances chosen by the input dtype (bf16 ~2e-2 relative)."""
    defaults = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
                torch.float16: (5e-3, 5e-3)}
    r, a = defaults[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=r if rtol is None else rtol,
                               atol=a if atol is None else atol, msg=msg or None)


def log_sum_exp_list(xs: list[float]) -> float:
    m = max(xs)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))
