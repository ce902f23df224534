"""Accuracy of SPLA's residual linear attention by subtraction on the kernel path (GPU).

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/residual_accuracy.py --n 8192 32768 65536 131072 [--rows 64]
    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/residual_accuracy.py --op [--op-n 4096]

Default: for each N, bf16 q, k, v (the kernel benchmark's "real-looking" inputs, workload.py), a taylor2
selection (blocks of 64, top-16), and the residual ``phi(q_i)^T S_i - sum_{j in sel(i), j <= i}
phi(q_i).phi(k_j) v_j`` from the ops (Triton on CUDA), compared on sampled rows with the explicit complement
computed in float64 over exactly the unselected causal keys. Prints ||r - ref|| / ||ref|| per N,
unnormalized and normalized.

``--op``: the whole SPLA op on the kernel path against its PyTorch reference on one selection at ``--op-n``
(combine add / add unnormalized / joint): residual, output and input gradients, relative errors and
finiteness; exits 1 if one is off. The residual's error there is set by the fused sparse kernel's selected
part (it multiplies v by the linear scores rounded once to bf16 while its normalizer sums them in float32),
so it is largest at short N, where about half of the causal keys are selected.
"""

from __future__ import annotations

import argparse
import sys

import torch
from workload import BS, SELECTION, TOPK, make_inputs

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


def select(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The benchmark's taylor2 selection (the fused kernel on CUDA)."""
    from spla_kernels.select import select_blocks_fused

    return select_blocks_fused(q, k, SELECTION)


def long_context(ns: list[int], n_rows: int) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 inputs, blocks of {BS}, top-{TOPK}, "
          "elu+1")
    print("| N | rows | rel. error (unnormalized) | rel. error (normalized) | unselected share of keys |")
    print("| --- | --- | --- | --- | --- |")
    for n in ns:
        q, k, v = make_inputs(n, "cuda", seed=1)
        idx = select(q, k)
        phi_q, phi_k = ops.feature_map("elu1")(q), ops.feature_map("elu1")(k)
        g = torch.Generator().manual_seed(n)
        rows = torch.cat([torch.randint(n // 2, n, (n_rows - 4,), generator=g), torch.arange(n - 4, n)]).sort()[0]
        errs = []
        for normalize in (False, True):
            r = ops.residual_linear_attention(phi_q, phi_k, v, idx, block_size=BS, normalize=normalize)
            ref = explicit_complement(phi_q, phi_k, v, idx, rows, BS, normalize)
            got = r[0, rows].double()
            assert torch.isfinite(got).all(), "NaN/inf in the residual"
            errs.append(float((got - ref).norm() / ref.norm()))
        share = 1 - TOPK * BS / (rows.double().mean().item() + 1)
        print(f"| {n} | {len(rows)} | {errs[0]:.2e} | {errs[1]:.2e} | {share:.3f} |", flush=True)
        del q, k, v, phi_q, phi_k, idx
        torch.cuda.empty_cache()


def op_against_reference(n: int) -> bool:
    """The whole SPLA op, kernels vs PyTorch reference, on one selection (see the module docstring)."""
    q, k, v = make_inputs(n, "cuda", seed=3)
    idx = select(q, k)
    gate = torch.rand(1, n, q.shape[2], device=q.device)
    ok = True
    for combine, normalize in (("add", True), ("add", False), ("joint", True)):
        outs = []
        for impl in ("reference", "triton"):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            o, aux = ops.spla_attention(*leaves, SELECTION, block_idx=idx, combine=combine, normalize=normalize,
                                        gate=gate if combine == "add" else None, impl=impl, return_aux=True)
            dout = torch.randn(o.shape, generator=torch.Generator(device=o.device).manual_seed(0), device=o.device)
            grads = torch.autograd.grad((o.float() * dout).sum() + aux.residual.sum(), leaves)
            outs.append((aux.residual.detach(), o.detach(), grads))
        (r0, o0, g0), (r1, o1, g1) = outs

        def rel(a, b):
            return float((a.double() - b.double()).norm() / b.double().norm())

        errs = [rel(r1, r0), rel(o1, o0)] + [rel(a, b) for a, b in zip(g1, g0)]
        fin = all(torch.isfinite(x).all().item() for x in (r1, o1, *g1))
        good = fin and errs[0] < 1e-2 and errs[1] < 1e-2 and max(errs[2:]) < 3e-2
        ok &= good
        print(f"op check N={n} combine={combine} normalize={normalize}: residual {errs[0]:.2e} out "
              f"{errs[1]:.2e} dq/dk/dv {errs[2]:.2e} {errs[3]:.2e} {errs[4]:.2e} finite={fin} "
              f"{'PASS' if good else 'FAIL'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--rows", type=int, default=64, help="sampled query rows per N (the last 4 always in)")
    p.add_argument("--op", action="store_true", help="the whole op, kernels vs reference, instead")
    p.add_argument("--op-n", type=int, default=4096)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if a.op:
        return 0 if op_against_reference(a.op_n) else 1
    long_context(a.n, a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
