"""Decode-time attention: the next tokens of each row against a KV cache (``docs/spla.md`` §4, "In decoding").

A cache row holds the keys and values of its first ``L`` tokens, the statistics of their key blocks and, for
layers with a residual, the linear-attention state ``S = sum_j phi(k_j) [v_j, 1]^T``. The functions here take
the new tokens' queries (already written into the cache, with the statistics and the state updated) and their
positions, and compute what the training ops compute for those tokens, reading only what a decode step needs:

* :func:`decode_select`: scores every block from its statistics (mean key; variance, covariance or top
  eigenpairs), never from the keys; a query's own, partial block is its forced local block; selection by
  ``select_blocks`` with the same forced local / sink rules as training.
* :func:`decode_sparse_attention`: exact attention over the selected blocks and the selected-linear term from
  the same K/V tiles. The keys and values of unselected blocks are never read.
* :func:`decode_linear_attention`: ``phi(q)^T S`` from the state (minus the chunk's later tokens, for a chunk).
* :func:`spla_decode`: the whole SPLA step, combined by the training op's own combine arithmetic.
* :func:`dense_decode`: dense causal attention on the cache (the dense baseline, SDPA).

Every function takes a chunk of ``T >= 1`` tokens per row (prefill of a prompt continuing a non-empty cache,
or one decode token); positions ``[B, T]`` may differ between rows (ragged batches). On CUDA the one-token
SPLA step runs Triton kernels (``spla_kernels.decode_select_blocks`` and
``spla_kernels.decode_sparse_with_selected_linear``, same signatures as the references here).
"""

from __future__ import annotations

import math

import torch

from ..options import COMBINES, FEATURE_MAPS, IMPLS, RLA_MODES, Combine, FeatureMap, Impl, RLAMode, Selection
from ._checks import check_bshd, check_choice, check_selection
from ._dispatch import run_kernel, use_triton
from .feature_maps import feature_map as get_feature_map
from .linear_attention import _append_ones, _finish_residual
from .scoring import _oracle_log_mass, reduce_heads, stats_log_mass
from .selection import _fusable, select_blocks
from .spla import SPLAAux, _check_combine_args, _combine
from .utils import acc_dtype, cdiv, group_heads

# Gathered (query, key) pairs per reference call: chunks of a long prompt are processed this many at a time.
_GATHER_BUDGET = 1 << 22


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[int, int, int, int, int, int]:
    """q [B, T, Hq, D] against k_cache [B, M, Hkv, D], v_cache [B, M, Hkv, Dv] and positions int [B, T];
    returns ``(B, T, Hq, Hkv, D, M)``."""
    check_bshd("q", q)
    check_bshd("k_cache", k_cache)
    check_bshd("v_cache", v_cache)
    B, T, Hq, D = q.shape
    M, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % Hkv:
        raise ValueError(f"k_cache must be [B, M, Hkv, D] with B = {B}, D = {D} and Hq = {Hq} a multiple of Hkv, "
                         f"got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache must be [B, M, Hkv, Dv] = {list(k_cache.shape[:3])} + [Dv], "
                         f"got {tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("positions", positions)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_positions(positions, B, T)
    return B, T, Hq, Hkv, D, M


def _check_positions(positions: object, B: int, T: int) -> None:
    if (not isinstance(positions, torch.Tensor) or positions.is_floating_point()
            or tuple(positions.shape) != (B, T)):
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be an integer [B, T] = [{B}, {T}] tensor, got {got}")


def _chunks(T: int, per_token: int):
    """Slices of the T new tokens small enough that a gather of ``per_token`` keys each fits the budget."""
    step = max(1, _GATHER_BUDGET // max(1, per_token))
    return [slice(t, min(T, t + step)) for t in range(0, T, step)]


# ------------------------------------------------------------------------------------------------ selection


def decode_block_scores(q: torch.Tensor, mean: torch.Tensor | None, second, positions: torch.Tensor,
                        selection: Selection, *, k_cache: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Block scores of new query tokens from the cached block statistics: float32 [B, Hkv, T, nK].

    Args:
        q: [B, T, Hq, D] queries (after RoPE) at ``positions`` int [B, T].
        mean: [B, Hkv, nK, D] mean key of every block; ``second``: the block's variance [B, Hkv, nK, D]
            (``covariance="diag"``), covariance [B, Hkv, nK, D, D] (``full``) or top eigenpairs ``(U [B, Hkv, nK,
            D, r], lam [B, Hkv, nK, r])`` (``lowrank``); None for ``taylor1``. Only the blocks before a query's
            own block are used (complete, ``block_size`` tokens): their scores equal the training scorer's.
        selection: the layer's :class:`~spla_lit.options.Selection` (scorer, head reduction, scale).
        k_cache: [B, M, Hkv, D], read by ``scorer="oracle"`` only (the exact block mass reads every key).
        generator: RNG of ``scorer="random"``.

    Returns:
        Scores as ``block_scores`` defines them, ``-inf`` for the blocks a query cannot see (after its own).
    """
    sel = check_selection(selection)
    B, T, Hq, D = check_bshd("q", q).shape
    _check_positions(positions, B, T)
    scale = D**-0.5 if sel.scale is None else sel.scale
    if mean is not None:
        Hkv, nK = mean.shape[1], mean.shape[2]
    elif k_cache is not None:
        Hkv, nK = k_cache.shape[2], cdiv(k_cache.shape[1], sel.block_size)
    else:
        raise ValueError("decode_block_scores needs the block statistics (mean) or k_cache")
    with torch.no_grad():
        q = q.detach()
        if sel.scorer == "random":
            s = torch.rand(B, Hkv, T, nK, generator=generator, device=q.device, dtype=torch.float32)
        else:
            if sel.scorer == "oracle":
                if k_cache is None:
                    raise ValueError("scorer='oracle' needs k_cache: the exact block mass reads every cached key")
                lm = _oracle_log_mass(q, k_cache, block_size=sel.block_size, scale=scale, positions=positions)
            else:
                covariance = sel.covariance if sel.scorer == "taylor2" else None
                if mean is None or (covariance is not None and second is None):
                    raise ValueError(f"scorer={sel.scorer!r} needs the block statistics (mean and, with "
                                     f"covariance={covariance!r}, its second moments)")
                # Complete blocks only are scored (the partial one is forced): log|b| = log(block_size).
                lm = stats_log_mass(group_heads(q, Hkv), math.log(sel.block_size), mean, second, scale=scale,
                                    covariance=covariance)
            s = reduce_heads(lm, sel.head_reduce)
        visible = torch.arange(nK, device=q.device) <= (positions.long() // sel.block_size)[..., None]
        return s.float().masked_fill(~visible[:, None], float("-inf"))


def decode_select(q: torch.Tensor, mean: torch.Tensor | None, second, positions: torch.Tensor,
                  selection: Selection, *, num_blocks: int | None = None, k_cache: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, impl: Impl = "auto") -> torch.Tensor:
    """The key blocks each new token attends to exactly: int32 [B, Hkv, T, selection.k], global block indices,
    ascending, -1 padded (as ``score_and_select`` of training selects for the same tokens).

    Scores from the statistics (:func:`decode_block_scores`), then ``select_blocks`` at ``positions``: a token's
    own (partial) block and the ``local_blocks - 1`` before it are forced, the first ``sink_blocks`` too.
    ``mode="window"`` keeps the forced blocks only and reads no statistics. ``num_blocks``: width of the block
    axis (the cache's capacity in blocks; default: the statistics' or the keys'). On CUDA, one token per row
    and a fusable scorer (taylor1, taylor2 diag / lowrank): the Triton kernel ``decode_select_blocks``.
    """
    sel = check_selection(selection)
    check_choice("impl", impl, IMPLS)
    B, T = q.shape[:2]
    if mean is None and k_cache is None:
        raise ValueError("decode_select needs the block statistics (mean) or k_cache")
    Hkv = mean.shape[1] if mean is not None else k_cache.shape[2]
    if num_blocks is None:
        num_blocks = mean.shape[2] if mean is not None else cdiv(k_cache.shape[1], sel.block_size)
    if sel.mode == "window":
        scores = torch.full((B, Hkv, T, num_blocks), float("-inf"), device=q.device)
        return select_blocks(scores, sel, positions=positions)
    if T == 1 and _fusable(sel) and mean is not None and use_triton(impl, "decode_select_blocks", q, mean):
        out = run_kernel(impl, "decode_select_blocks", q, mean, second, positions, sel)
        if out is not None:
            return out
    scores = decode_block_scores(q, mean, second, positions, sel, k_cache=k_cache, generator=generator)
    return select_blocks(scores, sel, positions=positions)


# ------------------------------------------------------------------------------------------ attention parts


def _gather_blocks(block_idx: torch.Tensor, positions: torch.Tensor, block_size: int, M: int):
    """Cache rows of the selected blocks: (row index [B, Hkv, T, k * bs] into ``[B * M * Hkv]``-flattened
    per-head rows, validity [B, Hkv, T, k * bs]). Invalid entries (padding, keys after the query, past the
    cache) point at the query's own row, which its forced block always holds: nothing unselected is read."""
    B, Hkv, T, k = block_idx.shape
    blk = block_idx.long()
    pos = (blk[..., None] * block_size + torch.arange(block_size, device=blk.device)).flatten(-2)
    own = positions.long()[:, None, :, None]  # [B, 1, T, 1]
    valid = (blk >= 0).repeat_interleave(block_size, -1) & (pos <= own) & (pos < M)
    pos = torch.where(valid, pos, own)
    b = torch.arange(B, device=blk.device)[:, None, None, None]
    h = torch.arange(Hkv, device=blk.device)[None, :, None, None]
    return (b * M + pos) * Hkv + h, valid


def decode_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_idx: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    phi_q: torch.Tensor | None = None,
    feature_map: FeatureMap = "elu1",
    with_normalizer: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact attention of new tokens over their selected cached blocks, and the selected-linear term.

    Args:
        q: [B, T, Hq, D] at ``positions`` int [B, T]; k_cache [B, M, Hkv, D], v_cache [B, M, Hkv, Dv] hold every
            token up to each query (the new ones included).
        block_idx: int [B, Hkv, T, k] global block indices (from :func:`decode_select`), -1 padded.
        phi_q: [B, T, Hq, F] features of the queries: also compute ``sum_{j sel, j <= i} (phi_q . phi(k_j))
            [v_j, 1]`` with ``phi = feature_map`` applied to the same gathered key tiles; None: skip it.
        with_normalizer: append the normalizer column (``[v_j, 1]``) to the selected-linear term.

    Returns:
        ``(o_sparse [B, T, Hq, Dv] in q's dtype, lse float32 [B, Hq, T], selected-linear float32 [B, T, Hq, Dv
        (+1)] or None, counts int [B, Hkv, T])``, counts the selected causal keys of each token. Reads the keys
        and values of the selected blocks only. On CUDA with T == 1: the Triton kernel
        ``decode_sparse_with_selected_linear`` (flash-decoding over the selected blocks).
    """
    B, T, Hq, Hkv, D, M = _check_cache(q, k_cache, v_cache, positions)
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    if not isinstance(block_idx, torch.Tensor) or tuple(block_idx.shape[:3]) != (B, Hkv, T) or block_idx.dim() != 4:
        raise ValueError(f"block_idx must be int [B, Hkv, T, k] = [{B}, {Hkv}, {T}, k]")
    scale = D**-0.5 if scale is None else scale
    if T == 1 and use_triton(impl, "decode_sparse_with_selected_linear", q, k_cache, v_cache):
        out = run_kernel(impl, "decode_sparse_with_selected_linear", q, k_cache, v_cache, block_idx, positions,
                         block_size=block_size, scale=scale, phi_q=phi_q, feature_map=feature_map,
                         with_normalizer=with_normalizer)
        if out is not None:
            return out
    dt = acc_dtype(q)
    Dv = v_cache.shape[-1]
    phi = get_feature_map(feature_map)
    kflat, vflat = k_cache.reshape(-1, D), v_cache.reshape(-1, Dv)
    outs, lses, sels, counts = [], [], [], []
    for c in _chunks(T, block_idx.shape[-1] * block_size * Hq):
        rows, valid = _gather_blocks(block_idx[:, :, c], positions[:, c], block_size, M)
        kg, vg = kflat[rows], vflat[rows]  # [B, Hkv, t, n, D]: the selected blocks' tiles
        qh = group_heads(q[:, c], Hkv, dt).transpose(2, 3)  # [B, Hkv, t, G, D]
        s = scale * (qh @ kg.to(dt).transpose(-1, -2))  # [B, Hkv, t, G, n]
        s = torch.where(valid[:, :, :, None], s, float("-inf"))  # where: an invalid slot may hold anything
        lse = s.logsumexp(-1)
        vz = torch.where(valid[..., None], vg.to(dt), 0.0)
        outs.append(torch.exp(s - lse[..., None]) @ vz)
        lses.append(lse)
        counts.append(valid.sum(-1))
        if phi_q is not None:
            pk = torch.where(valid[..., None], phi(kg).to(dt), 0.0)
            pq = group_heads(phi_q[:, c], Hkv, dt).transpose(2, 3)
            a = pq @ pk.transpose(-1, -2)  # [B, Hkv, t, G, n]
            sels.append(a @ (_append_ones(vz) if with_normalizer else vz))  # invalid slots: a == 0
    o = torch.cat(outs, 2)  # [B, Hkv, T, G, Dv]

    def heads_last(x):  # [B, Hkv, T, G, C] -> [B, T, Hq, C]
        return x.permute(0, 2, 1, 3, 4).reshape(B, T, Hq, x.shape[-1])

    lse = torch.cat(lses, 2).permute(0, 1, 3, 2).reshape(B, Hq, T)
    sel = heads_last(torch.cat(sels, 2)) if phi_q is not None else None
    return heads_last(o).to(q.dtype), lse.float() if dt != torch.float64 else lse, sel, torch.cat(counts, 2)


def decode_linear_attention(phi_q: torch.Tensor, state: torch.Tensor, *, phi_k: torch.Tensor | None = None,
                            v: torch.Tensor | None = None) -> torch.Tensor:
    """``phi(q_i)^T S_i`` for new tokens from the state after them: [B, T, Hq, Dv'] in the state's dtype.

    ``state`` [B, Hkv, F, Dv'] (float32) is ``sum_j phi(k_j) v_j^T`` over every cached token, the T new ones
    included; ``phi_q`` [B, T, Hq, F]. For a chunk (T > 1) token t subtracts the chunk's later tokens, ``S_t = S -
    sum_{u > t} phi(k_u) v_u^T``, from their ``phi_k`` [B, T, Hkv, F] and ``v`` [B, T, Hkv, Dv'] (with the
    normalizer's ones column when the state has one); one token needs neither.
    """
    B, T, Hq, F = check_bshd("phi_q", phi_q).shape
    if not isinstance(state, torch.Tensor) or state.dim() != 4 or state.shape[0] != B or state.shape[2] != F:
        raise ValueError(f"state must be [B, Hkv, F, Dv'] with B = {B}, F = {F}")
    Hkv = state.shape[1]
    dt = state.dtype
    qh = group_heads(phi_q, Hkv, dt)  # [B, Hkv, G, T, F]
    out = qh @ state[:, :, None]  # [B, Hkv, G, T, Dv']
    if T > 1:
        if phi_k is None or v is None or tuple(phi_k.shape) != (B, T, Hkv, F) or tuple(v.shape) != (
                B, T, Hkv, state.shape[-1]):
            raise ValueError(f"a chunk of T = {T} tokens needs their phi_k [B, T, Hkv, F] = {[B, T, Hkv, F]} and v "
                             f"[B, T, Hkv, Dv'] = {[B, T, Hkv, state.shape[-1]]}")
        kh, vh = phi_k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)  # [B, Hkv, T, *]
        later = torch.ones(T, T, dtype=torch.bool, device=phi_q.device).triu(1)
        a = torch.where(later, qh @ kh[:, :, None].transpose(-1, -2), 0.0)
        out = out - a @ vh[:, :, None]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, -1)


def _rows_at(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``cache[b, positions[b, t]]``: [B, T, H, C] from a cache [B, M, H, C] (the new tokens, read back)."""
    return cache[torch.arange(cache.shape[0], device=cache.device)[:, None], positions.long()]


def decode_explicit_residual(phi_q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_idx: torch.Tensor, positions: torch.Tensor, *, block_size: int,
                             feature_map: FeatureMap = "elu1", with_normalizer: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual read directly from every unselected causal cached key (``rla="explicit"``, the O(L) check
    and cost reference): ``(sum_{j <= i unselected} (phi_q_i . phi(k_j)) [v_j, 1] float32 [B, T, Hq, Dv (+1)],
    has-unselected bool [B, Hkv, T])``. Reads every block."""
    B, T, Hq, _ = check_bshd("phi_q", phi_q).shape
    M, Hkv = k_cache.shape[1], k_cache.shape[2]
    _check_positions(positions, B, T)
    dt = acc_dtype(phi_q)
    key_block = torch.arange(M, device=phi_q.device) // block_size
    chosen = (block_idx.long()[..., None] == key_block).any(-2)  # [B, Hkv, T, M]
    causal = torch.arange(M, device=phi_q.device) <= positions.long()[:, None, :, None]  # [B, 1, T, M]
    keep = causal & ~chosen
    seen = causal.any(2)[..., None]  # [B, 1, M, 1]: written keys (past every row's length: anything)
    vv = v_cache.to(dt)
    pk = torch.where(seen, get_feature_map(feature_map)(k_cache).to(dt).transpose(1, 2), 0.0)  # [B, Hkv, M, F]
    vv = torch.where(seen, (_append_ones(vv) if with_normalizer else vv).transpose(1, 2), 0.0)
    a = torch.where(keep[:, :, None], group_heads(phi_q, Hkv, dt) @ pk[:, :, None].transpose(-1, -2), 0.0)
    r = (a @ vv[:, :, None]).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, -1)
    return r, keep.any(-1)


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor | None,
                 *, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention of new tokens over the cache (SDPA, grouped-query heads): [B, T, Hq, Dv].

    ``positions`` int [B, T]: key j is visible to a query iff ``j <= position``. None: every cached key (one
    token per row whose cache holds exactly its prefix: SDPA's flash kernel with ``enable_gqa``). With a mask the
    G query heads of a KV head are folded into the query axis (SDPA has no GQA kernel with a mask and would
    expand K/V to every query head). Reads the whole cache given: pass it sliced to the longest row.
    """
    B, T, Hq, D = q.shape
    Hkv, M, Dv = k_cache.shape[2], k_cache.shape[1], v_cache.shape[-1]
    kh, vh = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if positions is None:
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kh, vh, scale=scale, enable_gqa=True)
        return o.transpose(1, 2)
    _check_positions(positions, B, T)
    G = Hq // Hkv
    qh = q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)  # rows (g, t)
    mask = torch.arange(M, device=q.device) <= positions[..., None]  # [B, T, M]
    mask = mask[:, None, None].expand(B, 1, G, T, M).reshape(B, 1, G * T, M)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.reshape(B, Hkv, G, T, Dv).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv)


# ------------------------------------------------------------------------------------------------ the step


def spla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    selection: Selection,
    *,
    block_stats: tuple | None = None,
    state: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,
    phi_k: torch.Tensor | None = None,
    feature_map: FeatureMap = "elu1",
    rla: RLAMode = "subtract",
    normalize: bool = True,
    combine: Combine = "add",
    gate: torch.Tensor | float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    block_idx: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: Impl = "auto",
    return_aux: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SPLAAux]:
    """SPLA for the new tokens of a KV cache: what :func:`~spla_lit.ops.spla_attention` computes for them.

    Args:
        q: [B, T, Hq, D] the new tokens' queries (after RoPE), at ``positions`` int [B, T].
        k_cache, v_cache: [B, M, Hkv, D | Dv], every row's tokens, the new ones already written.
        selection: the layer's :class:`~spla_lit.options.Selection`.
        block_stats: ``(mean, second)`` of every cached block (:func:`decode_block_scores`), the new tokens
            included; unused by ``mode="window"`` and the oracle / random scorers.
        state: float32 [B, Hkv, F, Dv + 1], ``sum_j phi(k_j) [v_j, 1]^T`` over every cached token (the new ones
            included); ``rla="subtract"`` reads it, the others do not.
        phi_q: [B, T, Hq, F]; phi_k: [B, T, Hkv, F] the new tokens' features (phi_k: the chunk correction of
            :func:`decode_linear_attention`, needed when T > 1); None: ``feature_map`` of q and the new keys.
        feature_map: the map the features came from, applied to the cached keys of the selected blocks.
        rla, normalize, combine, gate, norm_weight, norm_eps, block_idx, generator, impl, return_aux: as for
            ``spla_attention`` (``block_idx`` [B, Hkv, T, k] holds global block indices here).

    Returns:
        o [B, T, Hq, Dv] in q's dtype (and an :class:`~spla_lit.ops.SPLAAux` with ``return_aux``). Reads the
        statistics, the state and the selected blocks' keys and values, never an unselected block
        (``rla="explicit"`` and ``scorer="oracle"`` excepted: they read every block by definition).
    """
    B, T, Hq, Hkv, D, M = _check_cache(q, k_cache, v_cache, positions)
    sel = check_selection(selection)
    check_choice("rla", rla, RLA_MODES)
    check_choice("combine", combine, COMBINES)
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_choice("impl", impl, IMPLS)
    if sel.query_block != 1:
        raise ValueError("selection.query_block must be 1 to decode: a shared query-block selection is not a "
                         "function of the past alone")
    Dv = v_cache.shape[-1]
    if rla != "none":
        _check_combine_args((B, T, Hq, Dv), combine, gate, norm_weight)
        if rla == "subtract" and (state is None or tuple(state.shape[:2]) != (B, Hkv)
                                  or state.shape[-1] != Dv + 1):
            raise ValueError(f"rla='subtract' needs the linear state [B, Hkv, F, Dv + 1] = [{B}, {Hkv}, F, {Dv + 1}]")
    mean, second = block_stats if block_stats is not None else (None, None)
    if block_idx is None:
        block_idx = decode_select(q, mean, second, positions, sel, num_blocks=cdiv(M, sel.block_size),
                                  k_cache=k_cache, generator=generator, impl=impl)
    joint = combine == "joint" and rla != "none"
    if rla != "none" and phi_q is None:
        phi_q = get_feature_map(feature_map)(q)
    with_den = normalize or joint
    residual = None
    if rla == "subtract" and T == 1 and use_triton(impl, "decode_sparse_with_selected_linear", q, k_cache, v_cache):
        # One kernel also finishes the residual (phi(q)^T S - selected-linear, emptiness, normalizer) where the
        # splits are merged: the torch epilogue below is a dozen tiny kernels, most of a short step.
        scale = D**-0.5 if sel.scale is None else sel.scale
        fused = run_kernel(impl, "decode_sparse_with_selected_linear", q, k_cache, v_cache, block_idx, positions,
                           block_size=sel.block_size, scale=scale, phi_q=phi_q, feature_map=feature_map,
                           with_normalizer=with_den, state=state, normalize=normalize and not joint)
        if fused is not None:
            o_sparse, lse, residual, counts = fused
    if residual is None:
        o_sparse, lse, sel_lin, counts = decode_sparse_attention(
            q, k_cache, v_cache, block_idx, positions, block_size=sel.block_size, scale=sel.scale,
            phi_q=phi_q if rla == "subtract" else None, feature_map=feature_map, with_normalizer=with_den, impl=impl)
    if rla == "subtract" and residual is None:
        chunk = {}
        if T > 1:  # the chunk's later tokens are subtracted from the state (decode_linear_attention)
            chunk["phi_k"] = get_feature_map(feature_map)(_rows_at(k_cache, positions)) if phi_k is None else phi_k
            chunk["v"] = _append_ones(_rows_at(v_cache, positions))
        glob = decode_linear_attention(phi_q, state, **chunk)  # the state carries the normalizer column
        glob = glob if with_den else glob[..., :Dv]
        nonempty = counts < positions.long()[:, None] + 1
        residual = _finish_residual(glob - sel_lin, nonempty, normalize and not joint, 1e-6)
    elif rla == "explicit":
        r, nonempty = decode_explicit_residual(phi_q, k_cache, v_cache, block_idx, positions,
                                               block_size=sel.block_size, feature_map=feature_map,
                                               with_normalizer=with_den)
        residual = _finish_residual(r, nonempty, normalize and not joint, 1e-6)
    if residual is None:
        out, extra = o_sparse, None
    else:
        out, extra = _combine(o_sparse, residual, combine, lse, gate, norm_weight, norm_eps, impl=impl)
    if not return_aux:
        return out
    return out, SPLAAux(block_idx=block_idx, o_sparse=o_sparse, lse=lse, residual=residual)
