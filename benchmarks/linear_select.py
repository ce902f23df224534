"""Check-and-bench of the chunked causal linear attention (``linear.py``) and the fused selection (``select.py``).

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/linear_select.py [lchk] [lsweep] [lbench] [schk] [ssweep]
        [sbench] [--dv129] [--out DIR]

Sections (default: lchk lbench schk sbench): ``lchk`` / ``schk`` compare with float64 / PyTorch references on
fresh random inputs; ``lbench`` / ``sbench`` time them at N = 8K-128K (fla's ``chunk_linear_attn`` with 32
heads as the peer, when installed); ``lsweep`` / ``ssweep`` time tile candidates at N = 32K (configs passed
as arguments, the table untouched) and the selection without its top-k merge (the kernel launched here with
``MERGE=False``: wrong output, scoring time only). CUDA-event medians (``triton.testing.do_bench``) at B=1,
Hq=32, Hkv=2, D=128, bf16. ``--out DIR`` also writes the log to ``DIR/linear_select.log``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F
import workload
from triton.testing import do_bench
from workload import log

import spla_kernels.linear as L
import spla_kernels.select as S
from spla_kernels.config import LinearConfig, SelectConfig, arch_of, linear_config, select_config
from spla_lit.options import Selection

HQ, HKV, D = 32, 2, 128
ROWS: list[str] = []  # summary lines


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def feats(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return (F.elu(torch.randn(*shape, device="cuda")) + 1).to(dtype)


def report_compiled(*kernels) -> None:
    """Registers, spills and shared memory of every compiled variant of ``kernels`` (Triton's JIT cache)."""
    for k in kernels:
        for caches in k.device_caches.values():
            for ck in caches[0].values():
                log(f"  compiled {k.__name__}: regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                    f"shared={ck.metadata.shared} warps={ck.metadata.num_warps} stages={ck.metadata.num_stages}")


def linear_checks(dv129: bool) -> None:
    from spla_lit.ops import causal_linear_attention as cla

    base = linear_config(arch_of("cuda"), dtype=torch.bfloat16)
    for N in (8192, 65536):
        q, k, v = feats(1, N, HQ, D), feats(1, N, HKV, D), torch.randn(1, N, HKV, D, device="cuda").bfloat16()
        o = L.causal_linear_attention(q, k, v)
        ref = cla(q.double(), k.double(), v.double(), impl="reference")
        r32 = cla(q.float(), k.float(), v.float(), impl="reference")
        last = slice(N - 64, N)
        log(f"linear fwd bf16 N={N}: rel err vs f64 {rel(o, ref):.2e} (fp32 reference: {rel(r32, ref):.2e}); "
            f"last 64 tokens {rel(o[:, last], ref[:, last]):.2e}; nan={o.isnan().any().item()}")
        del ref, r32
    N = 8192
    cases = [(D, None), (D, torch.tensor([0, 1000, 1001, 5000, N], device="cuda", dtype=torch.int32))]
    if dv129:
        cases.append((D + 1, None))
    for dv, cu in cases:
        for split in (True, False):
            q, k = feats(1, N, HQ, D), feats(1, N, HKV, D)
            v = torch.randn(1, N, HKV, dv, device="cuda").bfloat16()
            if dv == D + 1:
                v[..., -1] = 1
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            o = L.causal_linear_attention(q, k, v, cu_seqlens=cu, config=replace(base, bwd_split=split))
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            ref = cla(q64, k64, v64, cu_seqlens=cu, impl="reference")
            gr = torch.autograd.grad(ref, (q64, k64, v64), do.double())
            log(f"linear bf16 N={N} Dv={dv} cu={cu is not None} bwd_split={split}: out {rel(o, ref):.2e} "
                f"dq {rel(g[0], gr[0]):.2e} dk {rel(g[1], gr[1]):.2e} dv {rel(g[2], gr[2]):.2e} "
                f"(bf16 rounding of the true grads: {rel(gr[0].bfloat16(), gr[0]):.2e}) "
                f"nan={any(x.isnan().any().item() for x in (o, *g))}")
    q, k, v = (torch.randn(1, N, h, D, device="cuda", requires_grad=True) for h in (HQ, HKV, HKV))
    o = L.causal_linear_attention(q, k, v)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = cla(q64, k64, v64, impl="reference")
    gr = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    log(f"linear fp32 N={N}: out {rel(o, ref):.2e} grads {[f'{rel(a, b):.2e}' for a, b in zip(g, gr)]}")
    report_compiled(L.chunk_out_kernel, L.chunk_dkdv_kernel, L.states_local_kernel)


def _linear_one(N: int, chunk_linear_attn) -> str:
    base = linear_config(arch_of("cuda"), dtype=torch.bfloat16)
    q, k = feats(1, N, HQ, D), feats(1, N, HKV, D)
    v = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
    t_f = bench(lambda: L.causal_linear_attention(q, k, v))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn(1, N, HQ, D, device="cuda")

    def fwd_bwd(config: LinearConfig = base):
        return torch.autograd.grad(L.causal_linear_attention(qg, kg, vg, config=config), (qg, kg, vg), do)

    res = {split: bench(lambda split=split: fwd_bwd(replace(base, bwd_split=split))) for split in (True, False)}
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fwd_bwd()
    peak = (torch.cuda.max_memory_allocated() - start) / 2**30
    line = (f"linear N={N}: ours fwd {t_f:.3f} ms, fwd+bwd {res[True]:.3f} ms (bwd no-split {res[False]:.3f}), "
            f"fwd+bwd peak extra {peak:.2f} GiB")
    if chunk_linear_attn is not None:
        q32, k32 = feats(1, N, HQ, D), feats(1, N, HQ, D)
        v32 = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
        f_f = bench(lambda: chunk_linear_attn(q32, k32, v32, normalize=False))
        for x in (q32, k32, v32):
            x.requires_grad_()
        do32 = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
        f_b = bench(lambda: torch.autograd.grad(chunk_linear_attn(q32, k32, v32, normalize=False)[0],
                                                (q32, k32, v32), do32))
        line += f" | fla chunk_linear_attn 32 heads fwd {f_f:.3f} ms, fwd+bwd {f_b:.3f} ms"
    return line


def linear_bench() -> None:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # noqa: BLE001
        chunk_linear_attn = None
        log(f"fla unavailable: {e}")
    for N in (8192, 32768, 65536, 131072):
        try:
            line = _linear_one(N, chunk_linear_attn)
        except Exception:  # noqa: BLE001 - one failing N must not lose the others
            line = f"linear N={N}: failed\n{traceback.format_exc()}"
        log(line)
        ROWS.append(line)
        torch.cuda.empty_cache()


def profile(fn, title: str) -> None:
    """CUDA time per kernel of ``fn`` (5 calls after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    log(f"-- profile {title} (5 calls)\n{prof.key_averages().table(sort_by='self_device_time_total', row_limit=14)}")


def _timed_sweep(configs: list, make, title: str):
    """Time ``make(config)`` for each config; return ``(ms, config)`` of the fastest, or None."""
    best = None
    for cfg in configs:
        try:
            t = bench(make(cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
            log(f"sweep {title} {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
            continue
        log(f"sweep {title} {cfg}: {t:.3f} ms")
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is not None:
        log(f"sweep {title}: best {best[1]} {best[0]:.3f} ms")
    return best


def linear_sweep() -> None:
    N = 32768
    base = linear_config(arch_of("cuda"), dtype=torch.bfloat16)
    q, k = feats(1, N, HQ, D), feats(1, N, HKV, D)
    v = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
    out = [replace(base, out_rows=r, out_warps=w, out_stages=s)
           for r, w, s in ((64, 4, 3), (64, 4, 2), (32, 4, 3), (128, 4, 2), (64, 8, 3))]
    best = _timed_sweep(out, lambda c: lambda: L.causal_linear_attention(q, k, v, config=c),
                        f"linear fwd N={N} (out_rows, out_warps, out_stages)")
    base = best[1] if best else base
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn(1, N, HQ, D, device="cuda")

    def fwd_bwd(c):
        return lambda: torch.autograd.grad(L.causal_linear_attention(qg, kg, vg, config=c), (qg, kg, vg), do)

    dkdv = [replace(base, dkdv_rows=r, dkdv_stages=s) for r, s in ((64, 2), (32, 2), (32, 3), (64, 1), (128, 1))]
    best = _timed_sweep(dkdv, fwd_bwd, f"linear fwd+bwd N={N} (dkdv_rows, dkdv_stages)")
    profile(fwd_bwd(best[1] if best else base), f"linear fwd+bwd N={N}")
    report_compiled(L.chunk_out_kernel, L.chunk_dkdv_kernel)


def _select_compare(q, k, selection: Selection, cu=None):
    from spla_lit.ops import block_scores, select_blocks

    got = S.select_blocks_fused(q, k, selection, cu_seqlens=cu)
    scores = block_scores(q, k, selection, cu_seqlens=cu)
    ref = select_blocks(scores, selection, cu_seqlens=cu)
    exact = (got == ref).all(-1)
    # Rows that differ: compare the reference scores of the two selections (equal up to rounding = a tie).
    s = scores.masked_fill(torch.isinf(scores), 0)  # forced/invisible blocks compare as equal

    def pick(idx):
        return torch.where(idx >= 0, s.gather(-1, idx.clamp(min=0).long()), 0).sort(-1).values

    gap = (pick(got) - pick(ref)).abs().amax(-1)
    return exact.float().mean().item(), gap.max().item(), (got >= 0).sum().item() == (ref >= 0).sum().item()


def select_checks() -> None:
    N = 8192
    for scorer, cov, red in (("taylor2", "diag", "lse"), ("taylor1", "diag", "lse"), ("taylor2", "lowrank", "max")):
        q = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
        k = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
        sel = Selection(block_size=64, topk=16, local_blocks=2, sink_blocks=1, scorer=scorer, covariance=cov,
                        rank=4, head_reduce=red)
        ex, gap, cnt = _select_compare(q, k, sel)
        log(f"select {scorer}/{cov}/{red} N={N}: rows identical {ex:.5f}, max |score gap| of differing picks "
            f"{gap:.2e}, same counts {cnt}")
    cu = torch.tensor([0, 100, 3000, 3001, N], device="cuda", dtype=torch.int32)
    q = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
    k = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
    ex, gap, cnt = _select_compare(q, k, Selection(block_size=64, topk=16), cu)
    log(f"select packed N={N}: rows identical {ex:.5f}, max gap {gap:.2e}, same counts {cnt}")


def _select_one(N: int) -> str:
    from spla_lit.ops import score_and_select

    q = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
    k = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
    base = select_config(arch_of("cuda"), dtype=q.dtype, head_dim=D)
    parts = []
    for scorer, cov, split in (("taylor2", "diag", True), ("taylor2", "diag", False), ("taylor1", "diag", True),
                               ("taylor2", "lowrank", True)):
        if cov == "lowrank" and N > 32768:
            continue
        sel = Selection(block_size=64, topk=16, sink_blocks=1, scorer=scorer, covariance=cov, rank=4)

        def fn(sel=sel, split=split):
            return S.select_blocks_fused(q, k, sel, config=replace(base, quad_split=split))

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
        parts.append(f"{scorer}/{cov}{'' if split else '/1dot'} {bench(fn):.3f} ms ({peak:.0f} MiB)")
    if N <= 32768:
        ref_sel = Selection(block_size=64, topk=16, sink_blocks=1)
        t_ref = bench(lambda: score_and_select(q, k, ref_sel, impl="reference"))
        parts.append(f"reference taylor2/diag {t_ref:.3f} ms")
    return f"select N={N}: " + ", ".join(parts)


def select_bench() -> None:
    for N in (8192, 32768, 65536, 131072):
        try:
            line = _select_one(N)
        except Exception:  # noqa: BLE001 - one failing N must not lose the others
            line = f"select N={N}: failed\n{traceback.format_exc()}"
        log(line)
        ROWS.append(line)
        torch.cuda.empty_cache()


def _select_scoring_only(q, k, selection: Selection, config: SelectConfig):
    """The selection kernel without its top-k merge (wrong output, for timing the scoring alone)."""
    launch = S._prepare(q, k, selection, None, config)
    return lambda: S.select_kernel[launch.grid](*launch.args, MERGE=False, **launch.meta)


def select_sweep() -> None:
    N = 32768
    q = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
    k = torch.randn(1, N, HKV, D, device="cuda").bfloat16()
    base = select_config(arch_of("cuda"), dtype=q.dtype, head_dim=D)
    sel = Selection(block_size=64, topk=16, sink_blocks=1)
    cands = [replace(base, rows=r, blocks_per_step=bn, warps=w, stages=s)
             for r, bn, w, s in ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (128, 32, 4, 1), (256, 32, 8, 1))]
    best = _timed_sweep(cands, lambda c: lambda: S.select_blocks_fused(q, k, sel, config=c),
                        f"select N={N} (rows, blocks_per_step, warps, stages)")
    cfg = best[1] if best else base
    parts = []
    for name, s in (("taylor2/diag", sel), ("taylor1", replace(sel, scorer="taylor1")),
                    ("taylor2/diag max", replace(sel, head_reduce="max"))):
        parts.append(f"{name} {bench(lambda s=s: S.select_blocks_fused(q, k, s, config=cfg)):.3f}")
        parts.append(f"{name} no-topk {bench(_select_scoring_only(q, k, s, cfg)):.3f}")
    one_dot = replace(cfg, quad_split=False)
    parts.append(f"taylor2/diag 1dot {bench(lambda: S.select_blocks_fused(q, k, sel, config=one_dot)):.3f}")
    log(f"select variants N={N} (ms): " + ", ".join(parts))
    report_compiled(S.select_kernel)


SECTIONS = dict(lchk=linear_checks, lsweep=linear_sweep, lbench=linear_bench, schk=select_checks,
                ssweep=select_sweep, sbench=select_bench)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", default=["lchk", "lbench", "schk", "sbench"], choices=list(SECTIONS))
    p.add_argument("--dv129", action="store_true", help="lchk also checks Dv = 129 (D + the normalizer column)")
    p.add_argument("--out", default="", help="folder for linear_select.log")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 1
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        workload.LOG_FILE = os.path.join(a.out, "linear_select.log.partial")
        open(workload.LOG_FILE, "w").close()
    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"{a.sections}")
    torch.manual_seed(0)
    for name in a.sections:
        t = time.time()
        try:
            if name == "lchk":
                linear_checks(a.dv129)
            else:
                SECTIONS[name]()
        except Exception:  # noqa: BLE001 - report, go on with the next section
            log(traceback.format_exc())
        log(f"[{name} took {time.time() - t:.1f}s]")
    log("== summary")
    for r in ROWS:
        log(r)
    if workload.LOG_FILE is not None:
        os.replace(workload.LOG_FILE, os.path.join(a.out, "linear_select.log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
