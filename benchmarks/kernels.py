"""Benchmark of the SPLA kernels against dense SDPA, fla NSA, FlexAttention and fla linear attention (GPU).

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/kernels.py [--n 65536 131072] [--rows nsa,sdpa,sparse,...]
        [--modes fwd,fwdbwd] [--check [--check-level quick]] [--sweep 65536] [--configs JSON]
        [--flex-min-n 65536] [--deadline S] [--out DIR]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/kernels python benchmarks/kernels.py --device cpu --n 256 \
        --rows sparse,fused,linear,select,spla    # smoke test of the script: tiny shape, times mean nothing

Each N runs in its own process (a crash in one kernel loses that N only). ``--out DIR`` writes the table to
``DIR/kernels.md`` and the log to ``DIR/kernels.log`` (``.partial`` until the run ends). ``--sweep N`` times
tile candidates of the sparse kernels and prints the winners as JSON, which ``--configs`` takes back: they
apply to the ``sparse``, ``sparse_rand`` and ``fused`` rows (``spla`` runs the op as shipped, with the
per-device tile table).

Setup (workload.py): B=1, Hq=32, Hkv=2, D=128, bf16, blocks of 64, top-16 blocks per token (diagonal
included). Selections come from the fused taylor2 selection on "real-looking" inputs or are drawn at
random (``_rand`` rows). Times are medians of CUDA-event timings (``triton.testing.do_bench``); memory is
``torch.cuda.max_memory_allocated`` during one call. For fused, sparse and spla fwd+bwd a per-stage
breakdown is read with ``torch.profiler`` from the kernels' ``record_function`` ranges. Rows that fail or run
out of memory are reported and skipped. Peers need fla (``fla-core``, ``flash-linear-attention``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import workload
from timing import event_ms
from workload import BS, HKV, HQ, SCALE, TOPK, B, D, G, chunked_select, log, make_inputs, real_selection

from spla_kernels.config import SparseConfig

DEV = "cuda"  # --device cpu (with TRITON_INTERPRET=1) runs the machinery at tiny sizes, for a smoke test
ALL_ROWS = ("sdpa", "nsa", "nsa_rand", "flex", "fla_linear", "sparse", "sparse_rand", "fused", "select", "spla",
            "linear")


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ timing


def bench(fn: Callable[[], object], slow: bool = False) -> tuple[float, float]:
    """(median ms, peak GB of one call). The first call warms up (compilation) outside the timing.
    ``slow`` (calls of a second or more): the median of three event-timed calls instead of do_bench."""
    import triton

    if DEV != "cuda":  # smoke test: one timed call, no memory figure
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, 0.0
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if slow:
        times = sorted(event_ms(fn) for _ in range(3))
        return times[1], torch.cuda.max_memory_allocated() / 2**30
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
    return ms, peak


def fwd_bwd(fwd: Callable[[], object], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """fn running the forward and the backward of every float output against fixed random gradients."""
    grads = {}

    def run():
        out = fwd()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if not grads:
            grads.update({i: torch.randn_like(o) for i, o in enumerate(outs)})
        torch.autograd.grad(outs, inputs, [grads[i] for i in range(len(outs))], allow_unused=True)

    return run


def sparse_flops(idx: torch.Tensor, n: int, query_block: int = 1) -> float:
    """Forward FLOPs of softmax attention over the selection: 4 * D * (selected causal keys) per query head."""
    from spla_lit.ops import selected_causal_counts

    keys = selected_causal_counts(idx, n, BS, query_block).double().sum().item()  # per KV head, summed
    return 4.0 * D * keys * G


def breakdown(fn: Callable[[], object], label: str) -> None:
    """Time per stage of one call of ``fn``, read with torch.profiler from the kernels' ``record_function``
    ranges (``spla_kernels.*``): on CUDA the GPU span of each range and of the whole call (CUDA events), as
    the ranges' GPU-side annotations give them (the kernels they launched, when a profiler build has none);
    in the smoke test, CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    _sync()
    try:
        with profile(activities=acts) as prof:
            if DEV == "cuda":
                total = event_ms(fn)
            else:
                t0 = time.perf_counter()
                fn()
                total = (time.perf_counter() - t0) * 1e3
    except Exception as e:  # noqa: BLE001 - the breakdown is extra information, never the run's failure
        log(f"breakdown {label}: profiler failed: {type(e).__name__}: {e}"[:300])
        return
    ours = [e for e in prof.events() if e.name.startswith("spla_kernels.")]
    gpu_spans = [e for e in ours if e.device_type == DeviceType.CUDA]
    if DEV == "cuda" and gpu_spans:
        what, times = "GPU spans", [(e.name, e.device_time) for e in gpu_spans]
    elif DEV == "cuda":
        what, times = "GPU time of the kernels launched", [(e.name, e.device_time_total) for e in ours]
    else:
        what, times = "CPU time", [(e.name, e.cpu_time_total) for e in ours if e.device_type == DeviceType.CPU]
    stages: dict[str, float] = {}
    for name, us in times:
        stages[name] = stages.get(name, 0.0) + us / 1e3
    parts = ", ".join(f"{name.removeprefix('spla_kernels.')} {ms:.2f}" for name, ms in stages.items())
    log(f"breakdown {label} ({what}, ms): total {total:.2f} = [{parts}] + other {total - sum(stages.values()):.2f}")


# -------------------------------------------------------------------------------------------------- rows


def row_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:  # flash with GQA if this torch has it, else K/V repeated to the query heads
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            F.scaled_dot_product_attention(*(x[:, :128].transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                           enable_gqa=True)
        gqa = True
    except RuntimeError:
        log("sdpa: flash has no GQA here; K/V repeated to 32 heads")
        gqa = False
        k, v = (x.repeat_interleave(G, 2) for x in (k, v))
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))

    def f():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)

    return f, [qt, kt, vt]


def row_nsa(q, k, v, idx):
    from fla.ops.nsa.parallel import ParallelNSAFunction

    bi = idx.permute(0, 2, 1, 3).contiguous()  # [B, N, Hkv, S], -1 padding is skipped by fla
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    return (lambda: ParallelNSAFunction.apply(qq, kk, vv, bi, TOPK, BS, SCALE, None)), [qq, kk, vv]


def row_flex(q, k, v, idx_qb):
    """FlexAttention with one selection per 64-query block (diagonal block causal, the rest full)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n = q.shape[1]
    nK = -(-n // BS)
    t = torch.arange(idx_qb.shape[2], device=q.device)[:, None]
    valid = (idx_qb >= 0) & (idx_qb != t)
    srt = torch.where(valid, idx_qb, nK).sort(-1).values
    full_num = valid.sum(-1, dtype=torch.int32)
    full_idx = F.pad(torch.where(srt == nK, 0, srt), (0, nK - TOPK)).to(torch.int32)
    part_num = torch.ones_like(full_num)
    part_idx = F.pad(t.expand(*idx_qb.shape[:3], 1).to(torch.int32), (0, nK - 1))

    def rep(x):
        return x.repeat_interleave(G, dim=1).contiguous()

    bm = BlockMask.from_kv_blocks(rep(part_num), rep(part_idx), rep(full_num), rep(full_idx), BLOCK_SIZE=BS,
                                  mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(n, n))
    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    # Flex's default 128-row tiles do not divide 64-token blocks.
    opts = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
            "bwd_BLOCK_N2": 64}
    return (lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=opts)), [qt, kt, vt]


def row_fla_linear(q, k, v):
    from fla.ops.linear_attn import chunk_linear_attn

    qq = (F.elu(q.float()) + 1).to(q.dtype).detach().requires_grad_()
    kk = (F.elu(k.float()) + 1).to(q.dtype).repeat_interleave(G, 2).detach().requires_grad_()
    vv = v.repeat_interleave(G, 2).detach().requires_grad_()
    return (lambda: chunk_linear_attn(qq, kk, vv)[0]), [qq, kk, vv]


def row_sparse(q, k, v, idx, config: SparseConfig | None = None):
    from spla_kernels.sparse import block_sparse_attention

    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    return (lambda: block_sparse_attention(qq, kk, vv, idx, block_size=BS, query_block=1, scale=SCALE,
                                           config=config)[0], [qq, kk, vv])


def row_fused(q, k, v, idx, config: SparseConfig | None = None):
    from spla_kernels.sparse import sparse_attention_with_selected_linear

    pq, pk = ((F.elu(x.float()) + 1).to(x.dtype).detach().requires_grad_() for x in (q, k))
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    return (lambda: sparse_attention_with_selected_linear(qq, kk, vv, pq, pk, idx, block_size=BS, query_block=1,
                                                          scale=SCALE, with_normalizer=True, config=config)[::2],
            [qq, kk, vv, pq, pk])


def row_linear(q, k, v):
    """The global linear attention of SPLA's residual: elu + 1 features, the value with its ones column."""
    from spla_kernels.linear import causal_linear_attention

    pq, pk = ((F.elu(x.float()) + 1).to(x.dtype).detach().requires_grad_() for x in (q, k))
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1).detach().requires_grad_()
    return (lambda: causal_linear_attention(pq, pk, v1)), [pq, pk, v1]


def row_select(q, k, v):
    return (lambda: real_selection(q, k)[0]), []


def spla_op(q, k, v, block_idx=None):
    """The full SPLA op as the model runs it (``spla_lit.ops.spla_attention``: selection, fused sparse +
    selected-linear, residual, combine) with the benchmark's selection. The one call of the ops API here."""
    from spla_lit.ops import Selection, spla_attention

    return spla_attention(q, k, v, Selection(block_size=BS, topk=TOPK), block_idx=block_idx)


def row_spla(q, k, v):
    """The full SPLA op: scoring + selection + fused sparse/selected-linear + global linear + combine."""
    from spla_lit.ops._dispatch import kernel

    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    if DEV == "cuda" and kernel("select_blocks_fused") is not None:
        return (lambda: spla_op(qq, kk, vv)), [qq, kk, vv]

    def f():  # no fused selection kernel: the chunked scorer stands in (the reference is O(N * nK * G) memory)
        return spla_op(qq, kk, vv, block_idx=chunked_select(qq.detach(), kk.detach()))

    return f, [qq, kk, vv]


# ------------------------------------------------------------------------------------------------ checks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rows_reference(q, k, v, pq, pk, idx, rows, do, dsel):
    """float64 o, lse, sel, dq, dphi_q for the query tokens ``rows`` (every head), by gathering their blocks."""
    out = {n: [] for n in ("o", "lse", "sel", "dq", "dpq")}
    n = q.shape[1]
    for h in range(HKV):
        blk = idx[0, h, rows].long()  # [R, topk]
        pos = (blk.clamp(min=0)[..., None] * BS + torch.arange(BS, device=q.device)).flatten(1)  # [R, K]
        keep = (blk.repeat_interleave(BS, 1) >= 0) & (pos <= rows[:, None]) & (pos < n)
        pos = pos.clamp(max=n - 1)
        kg, vg, pkg = (x[0, :, h].double()[pos] for x in (k, v, pk))  # [R, K, D]
        hs = slice(h * G, (h + 1) * G)
        qr, pqr, dor = (x[0, rows, hs].double() for x in (q, pq, do))  # [R, G, D]
        dsr = dsel[0, rows, hs].double()
        s = SCALE * qr @ kg.transpose(1, 2)  # [R, G, K]
        s = s.masked_fill(~keep[:, None], float("-inf"))
        lse = s.logsumexp(-1)
        p = torch.exp(s - lse[..., None])
        o = p @ vg
        a = (pqr @ pkg.transpose(1, 2)) * keep[:, None]
        sel = torch.cat([a @ vg, a.sum(-1, keepdim=True)], -1)
        dp = dor @ vg.transpose(1, 2)
        delta = (dor * o).sum(-1, keepdim=True)
        dq = SCALE * (p * (dp - delta)) @ kg
        da = (dsr[..., :D] @ vg.transpose(1, 2) + dsr[..., D:]) * keep[:, None]
        dpq = da @ pkg
        for name, x in zip(("o", "lse", "sel", "dq", "dpq"), (o, lse, sel, dq, dpq)):
            out[name].append(x)
    return {name: torch.cat(x, 1) for name, x in out.items()}


def check(n: int, random: bool, n_rows: int = 256, full: bool = False, seed: int = 0) -> bool:
    """Fused kernel vs float64 on ``n_rows`` random query rows (o, lse, sel, dq, dphi_q), or vs the dense
    float64 reference (every output and every gradient) with ``full``."""
    from spla_kernels.sparse import sparse_attention_with_selected_linear
    from spla_lit import ops

    q, k, v = make_inputs(n, DEV, seed=seed + n)
    idx = chunked_select(q, k, random=random, seed=seed)
    pq, pk = ((F.elu(x.float()) + 1).to(x.dtype) for x in (q, k))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, pq, pk)]
    o, lse, sel = sparse_attention_with_selected_linear(*leaves, idx, block_size=BS, query_block=1, scale=SCALE,
                                                        with_normalizer=True)
    g = torch.Generator(device=DEV).manual_seed(seed)
    do = torch.randn(o.shape, device=DEV, generator=g).to(o.dtype)
    dsel = torch.randn(sel.shape, device=DEV, generator=g)
    grads = torch.autograd.grad([o, sel], leaves, [do, dsel])
    errs = {}
    if full:
        ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, pq, pk)]
        ro, rl = ops.block_sparse_attention(*ref_leaves[:3], idx, block_size=BS, scale=SCALE, return_lse=True,
                                            impl="reference")
        v1 = torch.cat([ref_leaves[2], torch.ones_like(ref_leaves[2][..., :1])], -1)
        rs = ops.selected_linear_attention(ref_leaves[3], ref_leaves[4], v1, idx, block_size=BS, impl="reference")
        rg = torch.autograd.grad([ro, rs], ref_leaves, [do.double(), dsel.double()])
        for name, a, b in zip(("o", "lse", "sel", "dq", "dk", "dv", "dphi_q", "dphi_k"),
                              (o, lse, sel, *grads), (ro, rl, rs, *rg)):
            errs[name] = _rel(a, b)
    else:
        rows = torch.randperm(n, device=DEV, generator=g)[:n_rows].sort().values
        ref = rows_reference(q, k, v, pq, pk, idx, rows, do, dsel)
        errs["o"] = _rel(o[0, rows], ref["o"])
        errs["lse"] = _rel(lse[0][:, rows].t(), ref["lse"])
        errs["sel"] = _rel(sel[0, rows], ref["sel"])
        errs["dq"] = _rel(grads[0][0, rows], ref["dq"])
        errs["dphi_q"] = _rel(grads[3][0, rows], ref["dpq"])
        for name, x in zip(("dk", "dv", "dphi_k"), (grads[1], grads[2], grads[4])):
            errs[name + "_finite"] = 0.0 if torch.isfinite(x).all() else float("nan")
    ok = all(e <= 1e-2 for e in errs.values())  # NaN compares False
    log(f"check N={n} {'random' if random else 'scored'} {'dense-ref' if full else f'{n_rows} rows'}: "
        + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + ("  PASS" if ok else "  FAIL"))
    return ok


def check_small_shapes(shapes=((1000, 4, 4, 64, None), (1500, 8, 2, 128, [0, 300, 1201, 1500]))) -> bool:
    """G=1, partial blocks, D=64, packed sequences: against the float64 references (all outputs, all grads)."""
    from spla_kernels.sparse import sparse_attention_with_selected_linear
    from spla_lit import ops

    ok = True
    for (n, hq, hkv, d, cu) in shapes:
        g = torch.Generator().manual_seed(n)
        x = [torch.randn(1, n, h, d, generator=g).to(DEV, torch.bfloat16) for h in (hq, hkv, hkv)]
        pq, pk = (F.elu(t.float()).add(1).bfloat16() for t in x[:2])
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
        segs = [(0, n)] if cu is None else list(zip(cu[:-1], cu[1:]))
        idx = torch.cat([chunked_select(x[0][:, s:e], x[1][:, s:e], random=True, seed=s) for s, e in segs], 2)
        leaves = [t.detach().requires_grad_() for t in (*x, pq, pk)]
        out = sparse_attention_with_selected_linear(*leaves, idx, block_size=BS, query_block=1, scale=d**-0.5,
                                                    with_normalizer=True, cu_seqlens=cu_t)
        ups = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
        grads = torch.autograd.grad(out, leaves, ups)
        rl = [t.detach().double().requires_grad_() for t in (*x, pq, pk)]
        ro, rlse = ops.block_sparse_attention(*rl[:3], idx, block_size=BS, scale=d**-0.5, return_lse=True,
                                              cu_seqlens=cu_t, impl="reference")
        v1 = torch.cat([rl[2], torch.ones_like(rl[2][..., :1])], -1)
        rs = ops.selected_linear_attention(rl[3], rl[4], v1, idx, block_size=BS, cu_seqlens=cu_t, impl="reference")
        rg = torch.autograd.grad([ro, rlse, rs], rl, [u.double() for u in ups])
        errs = {name: _rel(a, b) for name, a, b in zip(("o", "lse", "sel", "dq", "dk", "dv", "dphi_q", "dphi_k"),
                                                     (*out, *grads), (ro, rlse, rs, *rg))}
        good = all(e <= 1e-2 for e in errs.values())
        ok &= good
        log(f"check N={n} Hq={hq} Hkv={hkv} D={d} cu={cu}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            + ("  PASS" if good else "  FAIL"))
    return ok


# ------------------------------------------------------------------------------------------------- sweep


def _timed(fn: Callable[[], object]) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _try_configs(base: SparseConfig, field_sets: list[dict], make: Callable[[SparseConfig], Callable[[], object]],
                 label: str) -> SparseConfig:
    """Time ``make(config)()`` for ``base`` with each field override; return the fastest config."""
    best = None
    for fields in field_sets:
        cfg = replace(base, **fields)
        try:
            ms = _timed(make(cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
            log(f"sweep {label} {fields}: failed {type(e).__name__}: {e}"[:300])
            continue
        log(f"sweep {label} {fields}: {ms:.2f} ms")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return base if best is None else best[1]


def sweep(n: int, configs: dict[str, SparseConfig]) -> dict[str, SparseConfig]:
    """Tile sweep at N = n for the softmax-only and the fused kernels; returns the fastest configs."""
    q, k, v = make_inputs(n, DEV)
    idx, _ = real_selection(q, k)
    found = {}
    for mode, row in (("fused", row_fused), ("sparse", row_sparse)):

        def fwd(cfg, row=row):
            fn, _ = row(q, k, v, idx, cfg)

            def f():
                with torch.no_grad():
                    fn()

            return f

        def fb(cfg, row=row):
            return fwd_bwd(*row(q, k, v, idx, cfg))

        if mode == "fused":
            fwd_t, dq_t, dkv_t = [(16, 4, 2), (16, 4, 3), (64, 4, 1)], [(16, 4, 2), (16, 4, 3)], [(16, 4, 2),
                                                                                              (16, 4, 3), (32, 4, 1)]
        else:
            fwd_t, dq_t, dkv_t = [(16, 4, 2), (32, 4, 2), (64, 4, 2), (128, 8, 2)], [(16, 4, 2), (64, 4, 2)], [
                (16, 4, 2), (32, 4, 1)]
        cfg = configs[mode]
        cfg = _try_configs(cfg, [dict(fwd_rows=r, fwd_warps=w, fwd_stages=s) for r, w, s in fwd_t], fwd, f"{mode} fwd")
        cfg = _try_configs(cfg, [dict(dq_rows=r, dq_warps=w, dq_stages=s) for r, w, s in dq_t], fb,
                           f"{mode} fwd+bwd")
        cfg = _try_configs(cfg, [dict(dkv_rows=r, dkv_warps=w, dkv_stages=s) for r, w, s in dkv_t], fb,
                           f"{mode} fwd+bwd")
        if mode == "fused":
            cfg = _try_configs(cfg, [dict(window=w) for w in (2048, 1024, 4096)], fb, f"{mode} fwd+bwd")
        log(f"sweep: {mode} uses {cfg}")
        breakdown(fb(cfg), f"{mode} fwd+bwd N={n}")
        found[mode] = cfg
    _free()
    return found


# -------------------------------------------------------------------------------------------------- main


def union_stats(idx: torch.Tensor, n: int) -> str:
    from spla_kernels.sparse_index import query_groups, token_units

    tu, _ = token_units(idx, n, BS, 1, None)
    parts = []
    for bq in (1, 2, 4, 8):
        parts.append(f"bq={bq}: {query_groups(tu, bq).count.float().mean().item():.1f}")
    return f"mean union of selected blocks per query group (topk={TOPK}): " + ", ".join(parts)


def run_rows(n: int, rows: list[str], modes: list[str], deadline: float, flex_min_n: int,
             configs: dict[str, SparseConfig]) -> list[dict]:
    """Every row at one N (in this process)."""
    results = []
    q, k, v = make_inputs(n, DEV)
    t0 = time.perf_counter()
    idx, how = real_selection(q, k)
    _sync()
    log(f"N={n}: selection by {how} in {time.perf_counter() - t0:.2f} s; {union_stats(idx, n)}")
    idx_rand = chunked_select(q, k, random=True, seed=1)
    flops = {"sparse": sparse_flops(idx, n), "sparse_rand": sparse_flops(idx_rand, n)}
    flops["nsa"], flops["nsa_rand"] = flops["sparse"], flops["sparse_rand"]
    flops["fused"] = 2 * flops["sparse"]
    flops["sdpa"] = 4.0 * D * HQ * n * (n + 1) / 2
    for name in rows:
        if time.monotonic() > deadline:
            log(f"deadline reached: N={n} {name} and later rows are skipped")
            break
        if name == "flex" and n < flex_min_n:
            continue
        try:
            if name == "sdpa":
                fn, ins = row_sdpa(q, k, v)
            elif name in ("nsa", "nsa_rand"):
                fn, ins = row_nsa(q, k, v, idx if name == "nsa" else idx_rand)
            elif name == "flex":
                idx_qb = chunked_select(q, k, query_block=BS)
                flops["flex"] = sparse_flops(idx_qb, n, BS)
                fn, ins = row_flex(q, k, v, idx_qb)
            elif name == "fla_linear":
                fn, ins = row_fla_linear(q, k, v)
            elif name in ("sparse", "sparse_rand"):
                fn, ins = row_sparse(q, k, v, idx if name == "sparse" else idx_rand, configs.get("sparse"))
            elif name == "fused":
                fn, ins = row_fused(q, k, v, idx, configs.get("fused"))
            elif name == "linear":
                fn, ins = row_linear(q, k, v)
            elif name == "select":
                fn, ins = row_select(q, k, v)
            elif name == "spla":
                fn, ins = row_spla(q, k, v)
            else:
                raise ValueError(f"unknown row {name}")
        except Exception as e:  # noqa: BLE001 - a peer that is not installed is skipped
            log(f"N={n} {name}: setup failed: {type(e).__name__}: {e}"[:400])
            continue
        for mode in modes:
            if mode == "fwdbwd" and not ins:
                continue
            slow = name == "sdpa" and n >= 65536
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        ms, peak = bench(fn, slow)
                else:
                    ms, peak = bench(fwd_bwd(fn, ins), slow)
                    if name in ("fused", "spla", "sparse"):
                        breakdown(fwd_bwd(fn, ins), f"{name} fwd+bwd N={n}")
            except torch.cuda.OutOfMemoryError:
                log(f"N={n} {name} {mode}: out of memory")
                _free()
                continue
            except Exception as e:  # noqa: BLE001
                log(f"N={n} {name} {mode}: failed: {type(e).__name__}: {e}"[:400])
                traceback.print_exc(limit=3)
                _free()
                continue
            fl = flops.get(name)
            tf = None if fl is None else fl * (1 if mode == "fwd" else 3.5) / ms / 1e9
            results.append(dict(n=n, row=name, mode=mode, ms=ms, tflops=tf, peak=peak))
            log(f"N={n} {name:12s} {mode:7s} {ms:9.3f} ms  "
                + (f"{tf:6.0f} TFLOP/s  " if tf else "") + f"peak {peak:6.2f} GB")
        del fn, ins
        _free()
    return results


def markdown(results: list[dict], device: str) -> str:
    ms = {(r["n"], r["row"], r["mode"]): r["ms"] for r in results}
    lines = [f"Device: {device}; torch {torch.__version__}; B={B} Hq={HQ} Hkv={HKV} D={D} bf16, blocks of {BS}, "
             f"top-{TOPK} per token; medians of CUDA-event timings.", "",
             "| N | row | mode | ms | vs NSA | vs SDPA | vs Flex | TFLOP/s | peak GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r["n"], ALL_ROWS.index(r["row"]), r["mode"])):
        key = (r["n"], r["mode"])

        def ratio(peer: str, r=r, key=key) -> str:
            p = ms.get((key[0], peer, key[1]))
            return f"{p / r['ms']:.2f}x" if p else "-"

        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        lines.append(f"| {r['n']} | {r['row']} | {r['mode']} | {r['ms']:.3f} | {ratio('nsa')} | {ratio('sdpa')} | "
                     f"{ratio('flex')} | {tf} | {r['peak']:.2f} |")
    lines += ["", "Ratios are peer time / row time (above 1: the row is faster). TFLOP/s counts the useful FLOPs",
              "of the selection (fwd+bwd = 3.5x fwd); fused = sparse + selected-linear (2x)."]
    return "\n".join(lines) + "\n"


def _configs_json(configs: dict[str, SparseConfig]) -> str:
    return json.dumps({m: asdict(c) for m, c in configs.items()})


def _child(n: int, a: argparse.Namespace, deadline_s: float, configs: dict[str, SparseConfig]) -> list[dict]:
    """Run one N in a subprocess, so that a crash (an illegal address in some kernel) loses that N only."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child-json", path, "--device", a.device, "--n", str(n),
           "--rows", a.rows, "--modes", a.modes, "--deadline", str(max(1.0, deadline_s)),
           "--flex-min-n", str(a.flex_min_n)]
    if configs:
        cmd += ["--configs", _configs_json(configs)]
    if workload.LOG_FILE is not None:
        cmd += ["--log-file", workload.LOG_FILE]
    try:
        r = subprocess.run(cmd, timeout=max(10.0, deadline_s + 90))
        if r.returncode:
            log(f"N={n}: child exited with {r.returncode}")
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        log(f"N={n}: child failed: {type(e).__name__}: {e}"[:300])
        return []
    finally:
        os.unlink(path)


def open_log(out: str, name: str) -> str:
    """Start the log (``out/name``, emptied, when ``out`` is given) with the device and the command line; returns
    the device's name."""
    if out:
        os.makedirs(out, exist_ok=True)
        workload.LOG_FILE = os.path.join(out, name)
        open(workload.LOG_FILE, "w").close()
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test)"
    log(f"device {device}, torch {torch.__version__}; {' '.join(sys.argv)}")
    return device


def _write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name (never a half-written file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _use_tiny_shape() -> None:
    """The CPU smoke test's shape (``workload.use_tiny_shape``), in this module's constants too."""
    global B, HQ, HKV, D, BS, TOPK, G, SCALE
    workload.use_tiny_shape()
    B, HQ, HKV, D, BS, TOPK, G, SCALE = (workload.B, workload.HQ, workload.HKV, workload.D, workload.BS,
                                         workload.TOPK, workload.G, workload.SCALE)


def main(argv: list[str] | None = None) -> int:
    global DEV
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list from {','.join(ALL_ROWS)}")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list from fwd,fwdbwd")
    p.add_argument("--check", action="store_true", help="correctness against float64 first")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--check-level", choices=("quick", "full"), default="full",
                   help="quick: the benchmark's shape at N=2048 against the dense float64 reference only")
    p.add_argument("--sweep", type=int, default=0, help="tile sweep of the sparse kernels at this N first")
    p.add_argument("--out", default="", help="folder for kernels.md (the table) and kernels.log")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds after start past which no new row starts (the table is still written)")
    p.add_argument("--flex-min-n", type=int, default=0, help="FlexAttention rows only from this N (compile time)")
    p.add_argument("--configs", default="", help="JSON {'sparse'|'fused': SparseConfig fields} for the direct rows")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke test of the script under TRITON_INTERPRET=1 (tiny shape; times mean nothing)")
    p.add_argument("--child-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--log-file", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    DEV = a.device
    rows = [r for r in a.rows.split(",") if r]
    modes = [m for m in a.modes.split(",") if m]
    bad = [r for r in rows if r not in ALL_ROWS] + [m for m in modes if m not in ("fwd", "fwdbwd")]
    if bad:
        p.error(f"unknown rows / modes: {', '.join(bad)}")
    if DEV == "cuda" and not torch.cuda.is_available():
        log("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        return 1
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        log("--device cpu needs TRITON_INTERPRET=1 (the kernels run in Triton's interpreter)")
        return 1
    if DEV == "cpu":
        _use_tiny_shape()
    configs = {m: SparseConfig(**c) for m, c in json.loads(a.configs).items()} if a.configs else {}
    start = time.monotonic()
    deadline = start + a.deadline
    if a.child_json:
        workload.LOG_FILE = a.log_file or None
        res = []
        try:
            res = run_rows(a.n[0], rows, modes, deadline, a.flex_min_n, configs)
        finally:
            _write(a.child_json, json.dumps(res))
        return 0
    device = open_log(a.out, "kernels.log.partial")
    ok = True
    if a.check or a.check_only:
        checks = [lambda: check(2048, True, full=True)]
        if a.check_level == "full":
            checks += [check_small_shapes, lambda: check(65536, False), lambda: check(131072, False, 128)]
        for fn in checks:
            try:
                ok &= fn()
            except Exception as e:  # noqa: BLE001
                ok = False
                log(f"check failed: {type(e).__name__}: {e}"[:400])
                traceback.print_exc(limit=4)
        log("CHECKS " + ("PASSED" if ok else "FAILED"))
    if not a.check_only:
        if a.sweep:
            from spla_kernels.config import arch_of, sparse_config

            arch = arch_of(DEV)
            base = {m: configs.get(m) or sparse_config(arch, fused=m == "fused", dtype=torch.bfloat16, dim=D)
                    for m in ("sparse", "fused")}
            configs = sweep(a.sweep, base)
            log(f"configs (--configs): {_configs_json(configs)}")
        _free()
        results: list[dict] = []
        for n in a.n:
            left = deadline - time.monotonic()
            if left <= 0:
                log(f"deadline reached: N={n} and later are skipped")
                break
            results += _child(n, a, left, configs)
            if a.out:
                _write(os.path.join(a.out, "kernels.md"), markdown(results, device))
        sys.stdout.write(markdown(results, device))
    if a.out:
        os.replace(workload.LOG_FILE, os.path.join(a.out, "kernels.log"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
