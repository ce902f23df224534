"""The FLOP counts behind throughput and MFU (``spla_lit/training/flops.py``) follow the attention variant."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from hydra_utils import make_cfg

from spla_lit.training import flops


def test_flop_counts_follow_the_attention_variant():
    n = 1024
    models = {"dense": ["model=dense"], "sparse": ["model=spla", "rla=none"], "spla": ["model=spla"],
              "linear": ["model=linear"]}
    cfgs = {name: make_cfg([*models[name], "sparse.block_size=64", "sparse.topk=4", "model.d_model=64",
                            "model.n_heads=2", "model.n_kv_heads=1"])
            for name in models}
    nets = {name: instantiate(cfg.model) for name, cfg in cfgs.items()}
    count = {name: flops.training_flops(net, n) for name, net in nets.items()}
    hq, d = 2, 32
    # dense causal: N(N+1)/2 pairs, QK^T and PV, forward + backward
    assert count["dense"].attention == 3 * 4 * d * (n * (n + 1) // 2) * hq * 2  # 2 layers
    # block-sparse: about N * topk * block_size pairs, less in the causal prefix
    pairs = flops.sparse_pairs(n, 64, 4)
    assert n * 3 * 64 < pairs < n * 4 * 64
    assert count["sparse"].attention == 3 * 4 * d * pairs * hq * 2
    assert flops.sparse_pairs(n, 64, n) == n * (n + 1) // 2  # every block selected: dense
    # SPLA adds the linear scan and the selected-linear term; linear attention is the scan alone
    scan = 2 * d * (d + 1) * n * (hq + 1)  # state update per KV head, read-out per query head
    selected = 2 * (2 * d + 1) * pairs * hq
    assert count["spla"].attention == count["sparse"].attention + 3 * (scan + selected) * 2
    assert count["linear"].attention == 3 * scan * 2
    assert count["linear"].scorer == 0 < count["spla"].scorer
    # matmuls: 6 x weights x tokens, the same for every variant but SPLA's gate
    assert count["dense"].matmul == count["linear"].matmul == count["sparse"].matmul < count["spla"].matmul
    weights = sum(m.weight.numel() for m in nets["dense"].modules() if isinstance(m, torch.nn.Linear))
    assert count["dense"].matmul == 6 * weights * n
    assert flops.peak_flops(torch.device("cpu")) is None
