"""Residual linear attention components (config group ``rla/``): how the unselected tail is read."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.feature_maps import FEATURE_MAPS, POSITIVE_FEATURE_MAPS
from ..options import COMBINES, check_choice
from .norm import RMSNorm

RLA_MODES = ("subtract", "explicit")


class ResidualLinearAttention(nn.Module):
    """Adds linear attention over the unselected causal keys to the sparse output.

    ``mode="subtract"``: global causal linear attention minus the selected blocks' part (never reads
    the unselected blocks); ``mode="explicit"``: reads them directly (O(N^2), check and cost reference).

    ``combine="add"``: ``o = o_sparse + gate(x) * norm(r)``, with a per-token, per-head gate projected
    from the layer input and initialised to zero, so the layer starts as pure sparse attention (a
    converted dense checkpoint keeps its function). ``combine="joint"``: one softmax-like normalisation
    over both parts, reading ``phi(q) . phi(k)`` as an estimate of ``exp(s)``.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, mode: str = "subtract",
                 feature_map: str = "elu1", normalize: bool = True, combine: str = "add", norm: bool = True,
                 layer_idx: int = 0, impl: str = "auto") -> None:
        super().__init__()
        self.mode = check_choice("rla.mode", mode, RLA_MODES)
        self.feature_map_name = check_choice("rla.feature_map", feature_map, tuple(FEATURE_MAPS))
        self.combine = check_choice("rla.combine", combine, COMBINES)
        needs_positive = normalize or combine == "joint"
        if needs_positive and feature_map not in POSITIVE_FEATURE_MAPS:
            raise ValueError(f"rla.feature_map={feature_map} can be negative: it needs rla.normalize=false "
                             "and rla.combine=add")
        self.phi = FEATURE_MAPS[feature_map]
        self.normalize, self.impl = normalize, impl
        if combine == "add":
            self.gate = nn.Linear(d_model, n_heads)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            self.gate.zero_init = True  # the model's weight init leaves it at zero
            self.norm = RMSNorm(head_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                sparse: nn.Module, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """x [B, N, d_model]; q [B, N, Hq, D]; k, v [B, N, Hkv, D] -> (o [B, N, Hq, D], detached stats)."""
        phi_q, phi_k = self.phi(q), self.phi(k)
        geometry = dict(block_size=sparse.block_size, query_block=sparse.query_block, cu_seqlens=cu_seqlens)
        joint = self.combine == "joint"
        if self.mode == "subtract":
            o_sparse, lse, r = ops.sparse_attention_with_residual(
                q, k, v, phi_q, phi_k, block_idx, normalize=self.normalize, return_normalizer=joint,
                return_lse=joint, impl=self.impl, **geometry)
        else:
            o_sparse, lse = sparse(q, k, v, block_idx, cu_seqlens, return_lse=joint)
            r = ops.explicit_residual_linear_attention(phi_q, phi_k, v, block_idx, normalize=self.normalize,
                                                       return_normalizer=joint, **geometry)
        if joint:
            out = ops.combine_joint(o_sparse, lse, r)
            extra = out.float() - o_sparse.float()
            stats = {}
        else:
            gate = self.gate(x).float()  # [B, N, Hq]
            extra = gate[..., None] * self.norm(r)
            out = (o_sparse.float() + extra).to(o_sparse.dtype)
            stats = {"rla/gate_abs": gate.detach().abs().mean()}
        with torch.no_grad():
            share = extra.norm() / (o_sparse.float().norm() + extra.norm() + 1e-12)
        stats["rla/residual_share"] = share.detach()
        return out, stats

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, feature_map={self.feature_map_name}, normalize={self.normalize}, "
                f"combine={self.combine}")
