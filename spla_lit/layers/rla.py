"""The residual linear attention component (config group ``rla/``): its options and its parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.feature_maps import feature_map as get_feature_map
from ..options import COMBINES, FEATURE_MAPS, POSITIVE_FEATURE_MAPS, RLA_MODES, check_choice
from .norm import RMSNorm


class ResidualLinearAttention(nn.Module):
    """Linear attention over the unselected causal keys, added to the sparse output by ``spla_attention``.

    ``mode="subtract"``: global causal linear attention minus the selected blocks' part (never reads
    the unselected blocks); ``mode="explicit"``: reads them directly (O(N^2), check and cost reference).
    No residual at all is ``rla=none``: the layer then has no such component.

    ``combine="add"``: ``o = o_sparse + gate(x) * norm(r)``, with a per-token, per-head gate projected
    from the layer input and initialised to zero, so the layer starts as pure sparse attention (a
    converted dense checkpoint keeps its function). ``combine="joint"``: one softmax-like normalisation
    over both parts, reading ``phi(q) . phi(k)`` as an estimate of ``exp(s)``.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, mode: str = "subtract",
                 feature_map: str = "elu1", normalize: bool = True, combine: str = "add", norm: bool = True,
                 layer_idx: int = 0) -> None:
        super().__init__()
        self.mode = check_choice("rla.mode", mode, RLA_MODES)
        if mode == "none":
            raise ValueError("rla.mode: 'none' is spelled rla=none (no residual component), not rla.mode=none")
        self.feature_map_name = check_choice("rla.feature_map", feature_map, FEATURE_MAPS)
        self.combine = check_choice("rla.combine", combine, COMBINES)
        needs_positive = normalize or combine == "joint"
        if needs_positive and feature_map not in POSITIVE_FEATURE_MAPS:
            raise ValueError(f"rla.feature_map={feature_map} can be negative: it needs rla.normalize=false "
                             "and rla.combine=add")
        self.phi = get_feature_map(feature_map)
        self.normalize = normalize
        if combine == "add":
            self.gate = nn.Linear(d_model, n_heads)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            self.gate.zero_init = True  # the model's weight init leaves it at zero
            self.norm = RMSNorm(head_dim) if norm else nn.Identity()

    def op_inputs(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> dict[str, Any]:
        """The residual's keyword arguments of ``spla_attention`` for layer input x [B, N, d_model] and the
        projected q [B, N, Hq, D], k [B, N, Hkv, D]: features, gate(x) [B, N, Hq] and the norm's weight."""
        # recompute_features: the op's kernels recompute phi from q and k in the backward instead of keeping it
        inputs: dict[str, Any] = dict(phi_q=self.phi(q), phi_k=self.phi(k), feature_map=self.feature_map_name,
                                      recompute_features=True, rla=self.mode, normalize=self.normalize,
                                      combine=self.combine)
        if self.combine == "add":
            inputs["gate"] = self.gate(x)
            if isinstance(self.norm, RMSNorm):
                inputs.update(norm_weight=self.norm.weight, norm_eps=self.norm.eps)
        return inputs

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, feature_map={self.feature_map_name}, normalize={self.normalize}, "
                f"combine={self.combine}")
