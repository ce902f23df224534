"""Selection fidelity of SPLA layers, as torchmetrics ``Metric`` classes.

For one layer with queries ``q`` [B, N, Hq, D], keys / values ``k, v`` [B, N, Hkv, D] and its selection
``sel(i)`` (the blocks token ``i`` attends exactly; forced local / sink blocks included):

``recall`` (:class:`BlockRecall`)
    Share of the oracle's *free* picks that the layer's scorer also picked. The oracle ranks blocks by
    their exact causal attention mass (summed over the query heads of a KV head, as the ``lse`` head
    reduction does) and selects with the layer's geometry (``topk``, forced blocks). Forced blocks are
    left out of both sides, since any scorer gets them. Micro-averaged over (row, KV head, batch);
    1 when nothing is left to choose (every visible block fits in ``topk``).
``mass_share`` (:class:`AttentionMassShare`)
    Exact softmax attention mass inside the selected blocks, ``m_sel(i) = sum_{j in sel(i), j <= i}
    softmax_i(s)_j``, averaged over tokens and query heads. ``oracle_mass_share`` is the same for the
    oracle's selection (what a perfect scorer reaches with this ``topk``).
``sparse_err``, ``layer_err``, ``residual_err`` (:class:`ResidualError`)
    With the same q, k, v: ``o_dense`` (dense causal softmax attention), ``o_sparse`` (exact attention
    on the selected blocks only) and ``o_layer`` (what the layer output: ``o_sparse`` plus its residual,
    before the output projection). Dense attention splits exactly as
    ``o_dense = m_sel o_sparse + (1 - m_sel) o_unsel`` (``o_unsel``: softmax average over the unselected
    keys), so the exact contribution of the unselected blocks is ``t* = o_dense - o_sparse``, and the
    residual's contribution is ``t = o_layer - o_sparse``. Then (sums over tokens, heads and channels)::

        sparse_err   = ||o_sparse - o_dense|| / ||o_dense||    what dropping the tail costs
        layer_err    = ||o_layer  - o_dense|| / ||o_dense||    what SPLA's output misses
        residual_err = ||t - t*|| / ||t*|| = ||o_layer - o_dense|| / ||o_sparse - o_dense||

    ``residual_err`` < 1: the residual moves the output toward dense attention; = 1: it adds nothing
    (no residual, or a zero gate); > 1: it moves it away; 0: it is exactly the unselected blocks'
    softmax contribution. NaN when ``sparse_err`` is below ``1e-5`` (the selection covers every key:
    there is no tail to estimate). Note ``combine=add`` learns a gate and an RMSNorm on the residual,
    so it need not approximate ``t*`` to help the model; this measures whether it does.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from .. import ops
from ..ops.blocks import forced_blocks, token_block_idx
from ..options import Selection
from .capture import LayerCapture

FIDELITY_KEYS = ("recall", "mass_share", "oracle_mass_share", "sparse_err", "layer_err", "residual_err")
# sparse_err below this: the tail is empty (to rounding) and residual_err is undefined
EMPTY_TAIL = 1e-5


def selection_mask(block_idx: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Bool [..., num_blocks]: which blocks each row of ``block_idx`` [..., topk] (-1 padded) selects."""
    idx = block_idx.long()
    mask = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, num_blocks, idx), True)  # padding lands in the spare column
    return mask[..., :num_blocks]


class BlockRecall(Metric):
    """Share of the oracle's free (non-forced) block picks that the selection also made (see module doc)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, selected: torch.Tensor, oracle: torch.Tensor, num_blocks: int,
               forced: torch.Tensor | None = None) -> None:
        """selected, oracle: int [B, Hkv, R, topk] (same rows); forced: bool [R, num_blocks] or None."""
        if selected.shape[:-1] != oracle.shape[:-1]:
            raise ValueError(f"selected {tuple(selected.shape)} and oracle {tuple(oracle.shape)} differ in rows")
        s, o = selection_mask(selected, num_blocks), selection_mask(oracle, num_blocks)
        if forced is not None:
            free = ~forced.to(s.device)
            s, o = s & free, o & free
        self.hits += (s & o).sum()
        self.total += o.sum()

    def compute(self) -> torch.Tensor:
        if self.total == 0:  # nothing to choose anywhere: vacuous
            return torch.ones((), dtype=torch.float64, device=self.total.device)
        return self.hits / self.total


class AttentionMassShare(Metric):
    """Mean exact softmax attention mass inside the selected blocks (see module doc)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("share_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, block_log_mass: torch.Tensor, selected: torch.Tensor, query_block: int = 1) -> None:
        """block_log_mass: [B, Hq, N, nK] exact causal log-mass per block (``ops.exact_block_log_mass``);
        selected: int [B, Hkv, nQ, topk] with ``nQ = ceil(N / query_block)``."""
        B, Hq, N, nK = block_log_mass.shape
        Hkv = selected.shape[1]
        if Hq % Hkv:
            raise ValueError(f"query heads ({Hq}) are not a multiple of the selection's KV heads ({Hkv})")
        tok = token_block_idx(selected, N, query_block)  # [B, Hkv, N, topk]
        mask = selection_mask(tok, nK).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, N, nK]
        lm = block_log_mass.double()
        share = torch.exp(lm.masked_fill(~mask, float("-inf")).logsumexp(-1) - lm.logsumexp(-1))
        self.share_sum += share.sum()
        self.count += share.numel()

    def compute(self) -> torch.Tensor:
        return self.share_sum / self.count.clamp_min(1)


class ResidualError(Metric):
    """``sparse_err``, ``layer_err`` and ``residual_err`` of one layer (see module doc); compute returns a dict."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("layer_sq", "sparse_sq", "dense_sq"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, o_dense: torch.Tensor, o_sparse: torch.Tensor, o_layer: torch.Tensor) -> None:
        """All [B, N, Hq, D] (any float dtype), for the same q, k, v."""
        if not o_dense.shape == o_sparse.shape == o_layer.shape:
            raise ValueError(f"shapes differ: o_dense {tuple(o_dense.shape)}, o_sparse {tuple(o_sparse.shape)}, "
                             f"o_layer {tuple(o_layer.shape)}")
        d = o_dense.double()
        self.layer_sq += (o_layer.double() - d).square().sum()
        self.sparse_sq += (o_sparse.double() - d).square().sum()
        self.dense_sq += d.square().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        dense = self.dense_sq.clamp_min(1e-300)
        sparse_err = (self.sparse_sq / dense).sqrt()
        layer_err = (self.layer_sq / dense).sqrt()
        if sparse_err < EMPTY_TAIL:
            residual_err = torch.full_like(sparse_err, float("nan"))
        else:
            residual_err = (self.layer_sq / self.sparse_sq).sqrt()
        return {"sparse_err": sparse_err, "layer_err": layer_err, "residual_err": residual_err}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal softmax attention in float32, GQA: q [B, N, Hq, D], k, v [B, N, Hkv, D] -> [B, N, Hq, D]."""
    G = q.shape[2] // k.shape[2]
    qh = q.float().transpose(1, 2)
    kh = k.float().transpose(1, 2).repeat_interleave(G, dim=1)
    vh = v.float().transpose(1, 2).repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)


def oracle_selection(q: torch.Tensor, k: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The oracle's selection [B, Hkv, nQ, selection.k] with the geometry of ``selection`` (exact block mass,
    heads reduced by log-sum-exp, PyTorch reference; a window's oracle is the window itself)."""
    oracle = replace(selection, mode="topk", topk=selection.k, scorer="oracle", head_reduce="lse")
    return ops.score_and_select(q, k, oracle, impl="reference")


class LayerFidelity(nn.Module):
    """The fidelity metrics of one SPLA layer, updated from :class:`~spla_lit.eval.capture.LayerCapture`."""

    def __init__(self) -> None:
        super().__init__()
        self.recall = BlockRecall()
        self.mass_share = AttentionMassShare()
        self.oracle_mass_share = AttentionMassShare()
        self.residual = ResidualError()

    @torch.no_grad()
    def update(self, cap: LayerCapture) -> None:
        if cap.cu_seqlens is not None:
            raise ValueError("selection fidelity needs unpacked batches (cu_seqlens=None)")
        sel = cap.selection
        q, k, v = cap.q, cap.k, cap.v
        N = q.shape[1]
        nK, nQ = -(-N // sel.block_size), -(-N // sel.query_block)
        oracle = oracle_selection(q, k, sel)
        forced = forced_blocks(nQ, nK, sel.query_block, sel.block_size, sel.local_blocks, sel.sink_blocks, q.device)
        self.recall.update(cap.block_idx, oracle, nK, forced)
        log_mass = ops.exact_block_log_mass(q, k, block_size=sel.block_size)
        self.mass_share.update(log_mass, cap.block_idx, sel.query_block)
        self.oracle_mass_share.update(log_mass, oracle, sel.query_block)
        # o_sparse as the layer computed it (same dtype and path), so a layer without residual gives
        # residual_err == 1 exactly
        self.residual.update(dense_attention(q, k, v), cap.o_sparse, cap.out)

    def compute(self) -> dict[str, float]:
        out = {"recall": self.recall.compute(), "mass_share": self.mass_share.compute(),
               "oracle_mass_share": self.oracle_mass_share.compute(), **self.residual.compute()}
        return {key: float(out[key]) for key in FIDELITY_KEYS}


class SelectionFidelityMetrics(nn.Module):
    """Per-layer :class:`LayerFidelity`, fed with a list of captures; ``compute()`` ->
    ``{"layers": {layer: {metric: value}}, "mean": {metric: mean over layers (NaNs skipped)}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()

    def update(self, captures: list[LayerCapture]) -> None:
        for cap in captures:
            key = str(cap.layer)
            if key not in self.layers:
                self.layers[key] = LayerFidelity().to(cap.q.device)
            self.layers[key].update(cap)

    def compute(self) -> dict[str, dict]:
        layers = {int(k): m.compute() for k, m in self.layers.items()}
        mean = {}
        for key in FIDELITY_KEYS:
            values = [v[key] for v in layers.values() if not math.isnan(v[key])]
            mean[key] = sum(values) / len(values) if values else float("nan")
        return {"layers": dict(sorted(layers.items())), "mean": mean}
