"""Model FLOPs of a training step and model FLOP utilisation (MFU).

Counted per sequence of ``N`` tokens, forward + backward (= 3 x forward for what has gradients):

* matmuls: ``6 * P * N``, ``P`` the weights of every ``nn.Linear`` (projections, MLP, RLA gate, LM head;
  not the embedding lookup);
* attention, per layer and query head (head dim ``D``, feature dim ``F`` of the RLA feature map), with
  ``K = sum_i keys_i`` the number of (query, key) pairs attended exactly:
  - dense causal: ``keys_i = i + 1``, so ``K = N(N+1)/2``; forward ``4 D K`` (``QK^T`` and ``PV``);
  - block-sparse (top-k blocks of ``bs`` tokens): ``keys_i = min(i // bs, topk - 1) * bs + i % bs + 1``
    (the partial diagonal block plus ``topk - 1`` full ones, fewer in a short prefix), ``K ~ N * topk * bs``;
    window mode uses ``topk = local_blocks + sink_blocks``;
  - SPLA (``rla.mode=subtract``): the sparse part, plus the causal linear-attention scan
    ``2 F (D+1) N`` per query head (read-out) and per KV head (state update), plus the selected-linear
    term ``2 (F + D + 1) K`` that subtracts the selected blocks; ``rla.mode=explicit`` instead reads the
    unselected pairs directly: ``2 (F + D + 1) (N(N+1)/2 - K)``;
  - linear attention: the scan only.
  The block scorer runs without gradients (forward only): ``2 D c`` per (query, causal block) pair and
  query head, ``c`` = 1 (taylor1), 2 (taylor2, diagonal covariance), ``D + 1`` (full), ``rank + 1``
  (low rank); ``oracle`` costs ``2 D N(N+1)/2``; random is free.

These are model FLOPs (what the maths needs), not hardware FLOPs: activation-checkpoint recomputation,
masked halves of diagonal blocks and padding are not counted, per the usual MFU convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense (non-sparse) bf16 tensor-core peak per device, FLOP/s. Matched in order against the device name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs (forward + backward) of one sequence."""

    matmul: float
    attention: float
    scorer: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.scorer


def causal_pairs(n: int) -> int:
    """``sum_i (i + 1)`` for ``i < n``: the (query, key) pairs of dense causal attention."""
    return n * (n + 1) // 2


def sparse_pairs(n: int, block_size: int, topk: int) -> int:
    """``sum_i keys_i`` with ``keys_i = min(i // bs, topk - 1) * bs + i % bs + 1`` (see the module doc)."""
    bs, t = block_size, topk
    full, rem = divmod(n, bs)
    # sum over full blocks b < full of min(b, t - 1), then the partial last block
    m = full * (full - 1) // 2 if full <= t else t * (t - 1) // 2 + (full - t) * (t - 1)
    whole_blocks = bs * bs * m + rem * bs * min(full, t - 1)
    return whole_blocks + full * bs * (bs + 1) // 2 + rem * (rem + 1) // 2


def query_block_pairs(n: int, block_size: int, query_block: int = 1) -> int:
    """(query, causal key block) pairs the scorer rates; one selection per query block of ``query_block``."""
    if query_block == 1:  # sum_i (i // bs + 1), in closed form
        full, rem = divmod(n, block_size)
        return block_size * full * (full - 1) // 2 + rem * full + n
    return sum((min(s + query_block, n) - 1) // block_size + 1 for s in range(0, n, query_block))


def _scorer_cost(scorer: nn.Module | None, d: int) -> float | None:
    """FLOPs per (query, block, head) of a ``BlockScorer``; None for the oracle (dense-like)."""
    if scorer is None or scorer.method == "random":
        return 0.0
    if scorer.method == "oracle":
        return None
    if scorer.method == "taylor1":
        return 2.0 * d
    return 2.0 * d * {"diag": 2, "full": d + 1, "lowrank": getattr(scorer, "rank", 1) + 1}.get(scorer.covariance, 2)


def attention_flops(attn: nn.Module, n: int) -> tuple[float, float]:
    """(forward attention FLOPs, forward scorer FLOPs) of one attention layer on one sequence of ``n``."""
    from ..layers.attention import DenseAttention, LinearAttention, SPLAAttention
    from ..ops.feature_maps import feature_dim

    hq, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if isinstance(attn, DenseAttention):
        return 4.0 * d * causal_pairs(n) * hq, 0.0
    if isinstance(attn, LinearAttention):
        return 2.0 * d * (d + 1) * n * (hq + hkv), 0.0
    if not isinstance(attn, SPLAAttention):
        raise TypeError(f"no FLOP formula for {type(attn).__name__}")
    sp = attn.sparse
    pairs = sparse_pairs(n, sp.block_size, sp.topk)
    fwd = 4.0 * d * pairs * hq
    rla = attn.rla
    if rla is not None:
        f = feature_dim(rla.feature_map_name, d)
        if rla.mode == "subtract":
            fwd += 2.0 * f * (d + 1) * n * (hq + hkv) + 2.0 * (f + d + 1) * pairs * hq
        else:
            fwd += 2.0 * (f + d + 1) * (causal_pairs(n) - pairs) * hq
    scorer = attn.scorer if sp.mode == "topk" else None
    cost = _scorer_cost(scorer, d)
    if cost is None:
        score = 2.0 * d * causal_pairs(n) * hq
    else:
        score = cost * query_block_pairs(n, sp.block_size, sp.query_block) * hq
    return fwd, score


def training_flops(net: nn.Module, seq_len: int) -> FlopCount:
    """Model FLOPs of a training step (forward + backward) on one sequence of ``seq_len`` tokens."""
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))
    attention = scorer = 0.0
    for block in net.layers:
        fwd, score = attention_flops(block.attn, seq_len)
        attention += 3.0 * fwd
        scorer += score  # no gradients through the selection
    return FlopCount(matmul=6.0 * weights * seq_len, attention=attention, scorer=scorer)


def peak_flops(device: torch.device, precision: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device``, or None when unknown (CPU, other GPUs, or a precision that is
    not bf16/fp16, whose peak differs)."""
    if device.type != "cuda":
        return None
    if precision is not None and not str(precision).startswith(("bf16", "16")):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None
