"""Block scoring: estimate each key block's attention mass for each query (block).

``taylor2`` is the second-order (cumulant) estimate of ``docs/spla.md`` §1::

    log m_b(q) ~= log|b| + scale * q.mu_b + scale^2 / 2 * q^T Sigma_b q

``taylor1`` drops the covariance term (mean-pooled keys, the first-order ablation), ``oracle`` is the
exact block log-mass ``logsumexp_{j in b, j <= i} s_ij`` and ``random`` draws uniform scores.
Scores are reduced over the ``G`` query heads that share a KV head (log-sum-exp by default), so a
group shares one selection.
"""

from __future__ import annotations

import torch

from ..options import Selection
from ._checks import check_cu_seqlens, check_positive_int, check_qk, check_selection
from .blocks import visible_blocks
from .utils import cdiv, group_heads


def _pad_blocks(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, Hkv, N, D] -> blocks [B, Hkv, nK, bs, D] (zero padded) and the valid-token mask [nK, bs]."""
    B, H, N, D = k.shape
    nK = cdiv(N, block_size)
    pad = nK * block_size - N
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, nK, block_size, D)
    valid = (torch.arange(nK * block_size, device=k.device) < N).view(nK, block_size)
    return kb, valid


def block_key_stats(k: torch.Tensor, block_size: int, covariance: str | None = "diag", rank: int = 4):
    """Per-block key statistics. ``k`` is [B, N, Hkv, D] (any float dtype).

    Returns ``(count [nK], mean [B, Hkv, nK, D], second)`` in float32 (float64 for float64 input), where
    ``second`` is the per-dimension variance [B, Hkv, nK, D] (``diag``), the covariance
    [B, Hkv, nK, D, D] (``full``), a pair ``(U [B, Hkv, nK, D, r], lam [B, Hkv, nK, r])`` of the top-r
    eigenpairs (``lowrank``), or None. Statistics are population moments over the block's real tokens.
    """
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    kh = k.to(dt).transpose(1, 2)  # [B, Hkv, N, D]
    kb, valid = _pad_blocks(kh, block_size)
    count = valid.sum(-1).to(dt)  # [nK]
    w = valid.to(dt)[None, None, :, :, None]
    mean = (kb * w).sum(3) / count[:, None]
    if covariance is None:
        return count, mean, None
    centered = (kb - mean[:, :, :, None]) * w
    if covariance == "diag":
        return count, mean, centered.square().sum(3) / count[:, None]
    cov = torch.einsum("bhksd,bhkse->bhkde", centered, centered) / count[:, None, None]
    if covariance == "full":
        return count, mean, cov
    lam, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    r = min(rank, cov.shape[-1])
    return count, mean, (vecs[..., -r:], lam[..., -r:].clamp_min(0))


def _taylor_log_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float, order: int,
                     covariance: str, rank: int) -> torch.Tensor:
    """Per-token, per-head estimated log-mass [B, Hkv, G, N, nK] (no causal masking)."""
    Hkv = k.shape[2]
    qh = group_heads(q, Hkv)  # [B, Hkv, G, N, D]
    count, mean, second = block_key_stats(k, block_size, covariance if order == 2 else None, rank)
    if order == 2 and covariance == "full":
        # q^T Sigma_b q = mean_{j in b} ((k_j - mu_b) . q)^2, exact and O(N^2 D) rather than O(N nK D^2).
        kh = k.to(qh.dtype).transpose(1, 2)
        kb, valid = _pad_blocks(kh, block_size)
        centered = (kb - mean[:, :, :, None]) * valid.to(qh.dtype)[None, None, :, :, None]
        proj = torch.einsum("bhgnd,bhksd->bhgnks", qh, centered)
        lm = stats_log_mass(qh, count.log(), mean, None, scale=scale, covariance=None)
        quad = proj.square().sum(-1) / count
        return lm + 0.5 * scale * scale * quad
    return stats_log_mass(qh, count.log(), mean, second, scale=scale, covariance=covariance if order == 2 else None)


def stats_log_mass(qh: torch.Tensor, log_count: torch.Tensor, mean: torch.Tensor, second, *, scale: float,
                   covariance: str | None) -> torch.Tensor:
    """The Taylor log-mass of every block from its statistics (``docs/spla.md`` §1), [B, Hkv, G, N, nK].

    ``qh`` [B, Hkv, G, N, D] grouped queries; ``log_count`` [nK] (or broadcastable to [B, Hkv, 1, 1, nK]);
    ``mean`` [B, Hkv, nK, D]; ``second`` as :func:`block_key_stats` returns it for ``covariance`` (diag: the
    variance; full: the covariance [B, Hkv, nK, D, D]; lowrank: ``(U, lam)``); ``covariance=None``: taylor1.
    Shared by the training scorer and the KV-cache decode path (which keeps the statistics, not the keys).
    """
    lm = log_count + scale * torch.einsum("bhgnd,bhkd->bhgnk", qh, mean.to(qh.dtype))
    if covariance is None:
        return lm
    if covariance == "diag":
        quad = torch.einsum("bhgnd,bhkd->bhgnk", qh.square(), second.to(qh.dtype))
    elif covariance == "lowrank":
        U, lam = second
        proj = torch.einsum("bhgnd,bhkdr->bhgnkr", qh, U.to(qh.dtype))
        quad = (proj.square() * lam.to(qh.dtype)[:, :, None, None]).sum(-1)
    else:
        quad = torch.einsum("bhgnd,bhkde,bhgne->bhgnk", qh, second.to(qh.dtype), qh)
    return lm + 0.5 * scale * scale * quad


def reduce_heads(lm: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """[B, Hkv, G, nQ, nK] per-head log-masses -> [B, Hkv, nQ, nK]: the G query heads of a KV head share one
    selection (``lse``: their total mass, ``max`` or ``mean``)."""
    if head_reduce == "lse":
        return lm.logsumexp(2)
    if head_reduce == "max":
        return lm.amax(2)
    return lm.mean(2)


def _oracle_log_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Exact causal block log-mass logsumexp_{j in b, j <= i} s_ij, [B, Hkv, G, N, nK] for q [B, N, Hq, D] and
    k [B, M, Hkv, D]. Query i sits at token i (M == N), or at ``positions[b, i]`` (int [B, N]: a KV cache's
    new tokens against its M cached keys)."""
    Hkv = k.shape[2]
    qh = group_heads(q, Hkv)
    kh = k.to(qh.dtype).transpose(1, 2)
    N, M = q.shape[1], k.shape[1]
    s = scale * torch.einsum("bhgnd,bhmd->bhgnm", qh, kh)
    if positions is None:
        causal = torch.ones(N, M, dtype=torch.bool, device=q.device).tril()
    else:
        causal = (torch.arange(M, device=q.device) <= positions[..., None])[:, None, None]  # [B, 1, 1, N, M]
    # where, not an additive mask: keys past a row's length may hold anything (a cache's unwritten tail).
    s = torch.where(causal, s, float("-inf"))
    nK = cdiv(M, block_size)
    s = torch.nn.functional.pad(s, (0, nK * block_size - M), value=float("-inf"))
    return s.view(*s.shape[:-1], nK, block_size).logsumexp(-1)


def _reduce_query_blocks(lm: torch.Tensor, query_block: int, *, log_mean_exp: bool) -> torch.Tensor:
    """[..., N, nK] -> [..., nQ, nK]: combine the per-token log-masses of each query block."""
    if query_block == 1:
        return lm
    N = lm.shape[-2]
    nQ = cdiv(N, query_block)
    pad = nQ * query_block - N
    counts = torch.full((nQ,), float(query_block), dtype=lm.dtype, device=lm.device)
    counts[-1] -= pad
    if log_mean_exp:
        # The oracle's block mass may be -inf for a query whose keys are all in the future: sum masses.
        x = torch.nn.functional.pad(lm, (0, 0, 0, pad), value=float("-inf"))
        x = x.view(*lm.shape[:-2], nQ, query_block, lm.shape[-1]).logsumexp(-2)
        return x - counts.log()[:, None]
    # Mean log-mass: the linear aggregation of docs/spla.md §1, cheap in a kernel.
    x = torch.nn.functional.pad(lm, (0, 0, 0, pad))
    return x.view(*lm.shape[:-2], nQ, query_block, lm.shape[-1]).sum(-2) / counts[:, None]


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Selection,
    *,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every key block for every query (block) with ``selection``'s scorer.

    Args:
        q: [B, N, Hq, D]; k: [B, N, Hkv, D], ``Hq % Hkv == 0``.
        selection: reads ``block_size``, ``query_block`` (1 keeps selection causal at token level; > 1 shares
            one selection computed from all queries of the block, so later queries steer what earlier ones
            see: a speed option, not causal), ``scorer`` (``taylor2`` | ``taylor1`` | ``random`` | ``oracle``),
            ``covariance`` and ``rank`` (taylor2), ``head_reduce`` (how the G query heads of a KV head are
            combined: ``lse``, their total mass, ``max`` or ``mean``) and ``scale``.
        generator: RNG for ``random``.
        cu_seqlens: int [S + 1] boundaries of packed sequences (B == 1, query_block == 1): blocks restart
            at each sequence start and scores cover only the token's own sequence.

    Returns:
        float32 [B, Hkv, nQ, nK]: estimated log attention mass; ``-inf`` where the block is not
        causally visible. Packed: [1, Hkv, N, max_s nK_s] with local block indices. Not differentiable.
    """
    B, N, Hq, Hkv, D = check_qk(q, k)
    sel = check_selection(selection)
    if cu_seqlens is not None:
        segments = check_cu_seqlens(cu_seqlens, batch=B, n=N, query_block=sel.query_block)
        parts = [block_scores(q[:, s:e], k[:, s:e], sel, generator=generator) for s, e in segments]
        width = max(p.shape[-1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=float("-inf")) for p in parts]
        return torch.cat(parts, dim=2)
    bs, qb = sel.block_size, sel.query_block
    scale = D**-0.5 if sel.scale is None else sel.scale
    nK, nQ = cdiv(N, bs), cdiv(N, qb)
    visible = visible_blocks(nQ, nK, qb, bs, q.device)
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        if sel.scorer == "random":
            s = torch.rand(B, Hkv, nQ, nK, generator=generator, device=q.device, dtype=torch.float32)
        else:
            if sel.scorer == "oracle":
                lm = _oracle_log_mass(q, k, block_size=bs, scale=scale)
            else:
                lm = _taylor_log_mass(q, k, block_size=bs, scale=scale, order=1 if sel.scorer == "taylor1" else 2,
                                      covariance=sel.covariance, rank=sel.rank)
            lm = _reduce_query_blocks(lm, qb, log_mean_exp=sel.scorer == "oracle")
            s = reduce_heads(lm, sel.head_reduce)
        s = s.float().masked_fill(~visible, float("-inf"))
    return s


def exact_block_log_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                         scale: float | None = None) -> torch.Tensor:
    """Per-head exact causal block log-mass [B, Hq, N, nK] (float32), for fidelity metrics."""
    B, N, Hq, Hkv, D = check_qk(q, k)
    check_positive_int("block_size", block_size)
    scale = D**-0.5 if scale is None else scale
    with torch.no_grad():
        lm = _oracle_log_mass(q.detach(), k.detach(), block_size=block_size, scale=scale)
    return lm.reshape(B, Hq, N, -1).float()

