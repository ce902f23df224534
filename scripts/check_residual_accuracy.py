"""Accuracy of the residual linear attention by subtraction at long context (GPU).

    python scripts/check_residual_accuracy.py --n 8192 32768 65536 131072 [--rows 64]

For each N: bf16 q, k, v ("real-looking" inputs of the kernel benchmark), a taylor2 selection (blocks of 64,
top-16), and the residual ``phi(q_i)^T S_i - sum_{j in sel(i), j <= i} phi(q_i).phi(k_j) v_j`` from the ops
(Triton on CUDA); compared on sampled rows with the explicit complement computed in float64 over exactly the
unselected causal keys. Prints ||r - ref|| / ||ref|| per N, unnormalized and normalized.
"""

from __future__ import annotations

import argparse

import torch

from spla_kernels.bench import make_inputs
from spla_lit import ops


def explicit_complement(phi_q, phi_k, v, idx, rows, block_size, normalize):
    """float64 residual of the given query rows over the unselected causal keys: [len(rows), Hq, D]."""
    _, N, Hq, F = phi_q.shape
    Hkv = phi_k.shape[2]
    G = Hq // Hkv
    key_block = torch.arange(N, device=phi_q.device) // block_size
    out = []
    for i in rows.tolist():
        per_head = []
        for h in range(Hkv):
            sel = idx[0, h, i][idx[0, h, i] >= 0].long()
            keep = (torch.arange(N, device=phi_q.device) <= i) & ~torch.isin(key_block, sel)
            pk, vv = phi_k[0, keep, h].double(), v[0, keep, h].double()
            a = phi_q[0, i, h * G:(h + 1) * G].double() @ pk.T  # [G, n_unselected]
            num = a @ vv
            per_head.append(num / (a.sum(-1, keepdim=True) + 1e-6) if normalize else num)
        out.append(torch.cat(per_head, 0))
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 inputs, blocks of 64, top-16, elu+1")
    print("| N | rows | rel. error (unnormalized) | rel. error (normalized) | unselected share of keys |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.n:
        q, k, v = make_inputs(n, seed=1)
        idx = ops.score_and_select(q, k, ops.Selection(block_size=64, topk=16))
        phi_q, phi_k = ops.feature_map("elu1")(q), ops.feature_map("elu1")(k)
        g = torch.Generator().manual_seed(n)
        rows = torch.cat([torch.randint(n // 2, n, (args.rows - 4,), generator=g), torch.arange(n - 4, n)]).sort()[0]
        errs = []
        for normalize in (False, True):
            r = ops.residual_linear_attention(phi_q, phi_k, v, idx, block_size=64, normalize=normalize)
            ref = explicit_complement(phi_q, phi_k, v, idx, rows, 64, normalize)
            got = r[0, rows].double()
            assert torch.isfinite(got).all(), "NaN/inf in the residual"
            errs.append(float((got - ref).norm() / ref.norm()))
        share = 1 - 16 * 64 / (rows.double().mean().item() + 1)
        print(f"| {n} | {len(rows)} | {errs[0]:.2e} | {errs[1]:.2e} | {share:.3f} |", flush=True)
        del q, k, v, phi_q, phi_k, idx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
