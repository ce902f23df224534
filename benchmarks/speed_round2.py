"""Speed, round two (issue 13): the old and the new code paths side by side, in one GPU call.

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/speed_round2.py --out DIR [--n 65536 131072] [--deadline 230]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/kernels python benchmarks/speed_round2.py --device cpu --out DIR
        # smoke test of the script at tiny sizes (times mean nothing)

"old" is main's code path, still in the tree behind switches: the selection kernel with ``SelectConfig()``
(float32 statistics from ``spla_lit.ops.block_key_stats``, split into bf16 hi / lo in every program, the top-k
sorted in the head reduction's layout), the PyTorch add-combine (``combine_residual(impl="reference")``) and the
features kept for the backward. "new" is the per-device table's selection (``select_config``), the fused
combine kernel and the features recomputed in the backward (``feature_map=``). Everything else
(fused sparse kernel, residual) is the same code in both. The op is composed from its public steps
(``select_blocks_fused`` with an explicit config, ``sparse_attention_with_residual``, ``combine_residual``);
the check section asserts that the new composition is exactly ``spla_lit.ops.spla_attention``.

Sections (run as: the checks, then the first length of op, select, train and memory, then their other lengths;
nothing new starts once ``--deadline`` seconds have passed; the tables so far are always written):

1. ``check``: correctness against float64 at a small N: the fused sparse kernel (every output and gradient,
   ``kernels.check``), every selection variant against ``select_blocks(block_scores(...))`` (rows identical,
   largest reference-score gap of a differing pick), the whole op old and new (plain, and with the model's gate
   and RMSNorm weight) against the float64 reference path with the same selection, outputs and gradients.
2. ``op``: the full op fwd+bwd at each ``--n`` (B=1, Hq=32, Hkv=2, D=128, blocks of 64, top-16, bf16): fla NSA
   (the peer, same selection), our sparse-only kernel, SPLA old / new, plain (as the issue's table) and gated
   (gate + RMSNorm weight, as the model calls it); per-stage breakdown of the new op.
3. ``select``: scoring + top-k alone for every selection variant, with the floor (the taylor2 diag score is one
   product ``[q, q*q] . [s mu_b, s^2 var_b / 2]`` of depth 2D per (query head, visible block), then an LSE over
   the G heads and a top-k): time / floor, scoring without the top-k merge, block statistics alone.
4. ``memory``: peak memory of the op fwd+bwd (spla old / new, sparse, dense SDPA) at ``--mem-n``, and what the
   forward keeps for the backward (saved-tensor bytes by ``torch.autograd.graph.saved_tensors_hooks``).
5. ``train``: the training step (d_model 1024, 4 layers, bf16 autocast, AdamW; ``train_step.build``) at
   ``--train-n``: spla, sparse, dense: ms/step, tokens/s, peak GiB.

Output: ``DIR/speed_round2.md`` and ``DIR/speed_round2.json`` (every number), written through temporary names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import workload
from workload import log, make_inputs

import kernels as K  # benchmarks/kernels.py: bench, fwd_bwd, breakdown, row_nsa, the fused kernel's check

# Datasheet peaks of an H200 SXM (the same tensor cores as an H100 SXM): dense bf16 and HBM3e.
PEAK_TFLOPS, PEAK_TBS = 989.0, 4.8
DEV, IMPL = "cuda", "auto"
START, DEADLINE = time.monotonic(), float("inf")
RESULTS: dict = {"check": [], "op": [], "select": [], "memory": [], "saved": [], "train": []}


def left() -> float:
    return DEADLINE - time.monotonic()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float("nan") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ variants


def select_variants() -> dict:
    """name -> SelectConfig. ``old`` is main's; ``new`` the table's entry for this device."""
    from spla_kernels.config import SelectConfig, arch_of, select_config

    new = select_config(arch_of(DEV), dtype=torch.bfloat16, head_dim=workload.D)
    pr = SelectConfig(presplit=True, relayout=True)
    out = {"old": SelectConfig(), "new": new, "relayout": SelectConfig(relayout=True),
           "presplit+relayout 2st": replace(pr, stages=2),  # 2 stages: 162 KiB
           "1-product terms 2st": replace(pr, stages=2, mean_split=False, quad_split=False),  # 2 CTAs / SM
           "1-product terms 256 rows": replace(pr, rows=256, stages=2, mean_split=False, quad_split=False)}
    if new == pr:
        out["presplit"] = SelectConfig(presplit=True)
    if DEV == "cpu":  # the interpreter: a few, at tiles that fit the tiny shape
        out = {k: replace(out[k], rows=8) for k in ("old", "new", "relayout", "1-product terms 2st")}
    return out


def spla_composed(q, k, v, *, select_cfg, combine_impl, recompute, gate=None, norm_weight=None, block_idx=None):
    """The SPLA op from its public steps with an explicit selection config, combine impl and feature recompute
    (the op's defaults otherwise: elu1 features, normalized residual, add-combine)."""
    from spla_kernels.select import select_blocks_fused
    from spla_lit import ops

    sel = workload.SELECTION
    idx = block_idx if block_idx is not None else select_blocks_fused(q, k, sel, config=select_cfg)
    phi = ops.feature_map("elu1")
    o, _, r = ops.sparse_attention_with_residual(q, k, v, phi(q), phi(k), idx, block_size=sel.block_size,
                                                 scale=sel.scale, normalize=True, return_lse=False, impl=IMPL,
                                                 validate=False, feature_map="elu1" if recompute else None)
    return ops.combine_residual(o, r, gate=gate, norm_weight=norm_weight, impl=combine_impl)


def op_variants(variants: dict) -> dict:
    """name -> spla_composed's keyword arguments: old = main (its selection config, the PyTorch combine, phi
    kept for the backward); new = this branch's defaults."""
    return {"old": dict(select_cfg=variants["old"], combine_impl="reference", recompute=False),
            "new": dict(select_cfg=variants["new"], combine_impl=IMPL, recompute=True)}


def gate_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's residual gate [1, n, Hq] (bf16, as nn.Linear gives it under autocast) and RMSNorm weight [D]."""
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(1, n, workload.HQ, generator=g) * 0.5).to(DEV, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(workload.D, generator=g)).to(DEV)
    return gate, w


# ------------------------------------------------------------------------------------------------- checks


def check_select(n: int, variants: dict) -> bool:
    from spla_kernels.select import select_blocks_fused
    from spla_lit.ops import block_scores, select_blocks

    ok = True
    q, k, _ = make_inputs(n, DEV, seed=11)
    qr = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    kr = torch.randn(k.shape, generator=torch.Generator().manual_seed(2)).to(DEV, torch.bfloat16)
    sel = workload.SELECTION
    for inputs, qq, kk in (("smooth", q, k), ("gaussian", qr, kr)):
        scores = block_scores(qq, kk, sel)
        ref = select_blocks(scores, sel)
        s = scores.masked_fill(torch.isinf(scores), 0)

        def pick(idx, s=s):
            return torch.where(idx >= 0, s.gather(-1, idx.clamp(min=0).long()), 0).sort(-1).values

        for name, cfg in variants.items():
            if left() < 0:
                return ok
            try:
                got = select_blocks_fused(qq, kk, sel, config=cfg)
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the run
                log(f"check select {name}: failed {type(e).__name__}: {e}"[:300])
                ok = False
                continue
            same = (got == ref).all(-1).float().mean().item()
            gap = (pick(got) - pick(ref)).abs().amax().item()
            counts = torch.equal((got >= 0).sum(-1), (ref >= 0).sum(-1))
            # hi/lo variants: ties only (bf16 products, ~16 bits); 1-product terms: ~8 bits, reported
            good = counts and (gap < 1e-3 or not (cfg.mean_split and cfg.quad_split))
            ok &= good
            RESULTS["check"].append(dict(what="select", variant=name, inputs=inputs, n=n, rows_identical=same,
                                         max_score_gap=gap, ok=good))
            log(f"check select N={n} {inputs:8s} {name:26s}: rows identical {same:.5f}, max score gap of a "
                f"differing pick {gap:.2e} {'PASS' if good else 'FAIL'}")
    return ok


def check_op(n: int, variants: dict) -> bool:
    from spla_lit import ops

    ok = True
    q, k, v = make_inputs(n, DEV, seed=5)
    idx = K.chunked_select(q, k)
    gate, w = gate_inputs(n)
    # The new composition is the op itself (same kernels, same selection).
    with torch.no_grad():
        a = spla_composed(q, k, v, **op_variants(variants)["new"], gate=gate, norm_weight=w)
        b = ops.spla_attention(q, k, v, workload.SELECTION, gate=gate, norm_weight=w, impl=IMPL)
    same = torch.equal(a, b)
    ok &= same
    RESULTS["check"].append(dict(what="composition == spla_attention", n=n, ok=same))
    log(f"check op N={n}: the new composition equals spla_attention: {same}")
    for gated in (False, True):
        leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        extra64 = [x.detach().double().requires_grad_() for x in (gate, w)] if gated else []
        kw64 = dict(gate=extra64[0], norm_weight=extra64[1]) if gated else {}
        ref = ops.spla_attention(*leaves64, workload.SELECTION, block_idx=idx, impl="reference", **kw64)
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
        ref_g = torch.autograd.grad(ref, leaves64 + extra64, do.double())
        for name, variant in op_variants(variants).items():
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            extra = [gate.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()] if gated else []
            kw = dict(gate=extra[0], norm_weight=extra[1]) if gated else {}
            out = spla_composed(*leaves, **variant, block_idx=idx, **kw)
            grads = torch.autograd.grad(out, leaves + extra, do.to(out.dtype))
            errs = {"out": _rel(out, ref)}
            errs.update({gn: _rel(gx, rx) for gn, gx, rx in zip(("dq", "dk", "dv", "dgate", "dw"), grads, ref_g)})
            good = errs["out"] < 1e-2 and all(e < 3e-2 for e in errs.values())  # NaN compares False
            ok &= good
            RESULTS["check"].append(dict(what="op vs float64", variant=name, gated=gated, n=n, ok=good, **errs))
            log(f"check op N={n} {name} {'gated' if gated else 'plain'} vs float64: "
                + " ".join(f"{key} {e:.1e}" for key, e in errs.items()) + ("  PASS" if good else "  FAIL"))
    return ok


def run_checks(a) -> bool:
    ok = True
    variants = select_variants()
    steps = [("fused sparse kernel", lambda: K.check(a.check_n, True, full=True)),
             ("selection", lambda: check_select(a.check_select_n, variants)),
             ("op", lambda: check_op(a.check_n, variants))]
    for name, fn in steps:
        if left() < 0:
            log(f"deadline: check {name} skipped")
            break
        try:
            good = fn()
        except Exception as e:  # noqa: BLE001
            good = False
            log(f"check {name}: failed {type(e).__name__}: {e}"[:400])
            traceback.print_exc(limit=4)
        if name == "fused sparse kernel":
            RESULTS["check"].append(dict(what="fused sparse kernel vs float64 (kernels.check)", n=a.check_n,
                                         ok=bool(good)))
        ok &= bool(good)
        K._free()
    log("CHECKS " + ("PASSED" if ok else "FAILED"))
    return ok


# ------------------------------------------------------------------------------------------------- timing


def _peak_of(fn) -> float:
    """GB allocated at the peak of one call of ``fn`` above what was allocated before it (0 on CPU)."""
    if DEV != "cuda":
        fn()
        return 0.0
    K._sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    K._sync()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def time_op(n: int, variants: dict, want_breakdown: bool) -> None:
    from spla_kernels.select import select_blocks_fused

    q, k, v = make_inputs(n, DEV)
    idx = select_blocks_fused(q, k, workload.SELECTION, config=variants["new"])
    gate, w = gate_inputs(n)
    rows = []

    def leaves(*xs):
        return [x.detach().clone().requires_grad_() for x in xs]

    try:
        rows.append(("nsa", *K.row_nsa(q, k, v, idx)))
    except Exception as e:  # noqa: BLE001 - no fla here: the peer is reported missing
        log(f"op N={n}: fla NSA unavailable ({type(e).__name__}: {e})"[:300])
    rows.append(("sparse", *K.row_sparse(q, k, v, idx)))
    for name, variant in op_variants(variants).items():
        for gated in (False, True):
            ins = leaves(q, k, v) + (leaves(gate, w) if gated else [])

            def f(ins=ins, variant=variant, gated=gated):
                extra = dict(gate=ins[3], norm_weight=ins[4]) if gated else {}
                return spla_composed(ins[0], ins[1], ins[2], **variant, **extra)

            rows.append((f"spla {name} {'gated' if gated else 'plain'}", f, ins))
    nsa_ms = None
    for name, fn, ins in rows:
        if left() < 0:
            log(f"deadline: op N={n} {name} and later skipped")
            break
        try:
            run = K.fwd_bwd(fn, ins)
            ms, _ = K.bench(run)
            peak = _peak_of(run)
        except Exception as e:  # noqa: BLE001
            log(f"op N={n} {name}: failed {type(e).__name__}: {e}"[:400])
            K._free()
            continue
        if name == "nsa":
            nsa_ms = ms
        ratio = nsa_ms / ms if nsa_ms else None
        RESULTS["op"].append(dict(n=n, row=name, ms=ms, vs_nsa=ratio, peak_gb=peak))
        log(f"op N={n} {name:18s} fwd+bwd {ms:9.2f} ms" + (f"  {ratio:.2f}x NSA" if ratio else "")
            + f"  peak {peak:.2f} GB")
        if want_breakdown and name.startswith("spla") and name.endswith("plain"):  # old and new: "other"
            K.breakdown(K.fwd_bwd(fn, ins), f"{name} fwd+bwd N={n}")
    K._free()


def select_floor(n: int) -> dict:
    """Floors of scoring + top-k at N = n (B = 1): FLOPs of one product of depth 2D per (query head, visible
    block); bytes of reading q, k and writing the selection once; one exp per (query head, visible block)."""
    bs, hq, hkv, d, topk = workload.BS, workload.HQ, workload.HKV, workload.D, workload.TOPK
    visible = sum(min(t // bs + 1, math.ceil(n / bs)) for t in range(n))  # per head: sum over tokens
    pairs = hq * visible
    flops = 2.0 * pairs * 2 * d
    byts = n * hq * d * 2 + n * hkv * d * 2 + hkv * n * topk * 4
    t_flop, t_byte = flops / (PEAK_TFLOPS * 1e12) * 1e3, byts / (PEAK_TBS * 1e12) * 1e3
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132
    t_exp = pairs / (16 * sms * 1.755e9) * 1e3  # MUFU: 16 exp / clock / SM at the H100/H200 base boost clock
    return dict(pairs=pairs, flops=flops, bytes=byts, floor_ms=max(t_flop, t_byte), flop_ms=t_flop,
                byte_ms=t_byte, exp_ms=t_exp)


def time_select(n: int, variants: dict, names: list[str]) -> None:
    import spla_kernels.select as S

    q, k, _ = make_inputs(n, DEV)
    sel = workload.SELECTION
    fl = select_floor(n)
    log(f"select N={n} floor: {fl['flops'] / 1e12:.3f} TFLOP ({fl['flop_ms']:.3f} ms at {PEAK_TFLOPS:.0f} TFLOP/s), "
        f"{fl['bytes'] / 1e9:.3f} GB ({fl['byte_ms']:.3f} ms at {PEAK_TBS} TB/s), {fl['pairs'] / 1e9:.2f} G exps "
        f"({fl['exp_ms']:.3f} ms of MUFU): floor {fl['floor_ms']:.3f} ms")
    for name in names:
        if left() < 0:
            log(f"deadline: select N={n} {name} and later skipped")
            break
        cfg = variants[name]
        try:
            ms, _ = K.bench(lambda cfg=cfg: S.select_blocks_fused(q, k, sel, config=cfg))
            row = dict(n=n, variant=name, config=asdict(cfg), ms=ms, floor_ms=fl["floor_ms"],
                       x_floor=ms / fl["floor_ms"], tflops=fl["flops"] / ms / 1e9)
            if name in ("old", "new"):
                launch = S._prepare(q, k, sel, None, cfg)
                row["scoring_only_ms"], _ = K.bench(
                    lambda launch=launch: S.select_kernel[launch.grid](*launch.args, MERGE=False, **launch.meta))
                row["stats_ms"], _ = K.bench(lambda cfg=cfg: S._prepare(q, k, sel, None, cfg))
        except Exception as e:  # noqa: BLE001
            log(f"select N={n} {name}: failed {type(e).__name__}: {e}"[:400])
            continue
        RESULTS["select"].append(row)
        extra = (f", kernel without the top-k merge {row['scoring_only_ms']:.2f} ms, statistics + launch setup "
                 f"{row['stats_ms']:.2f} ms" if "stats_ms" in row else "")
        log(f"select N={n} {name:26s} {ms:8.3f} ms = {row['x_floor']:.1f}x floor{extra}")
    K._free()


# ------------------------------------------------------------------------------------------------- memory


def saved_tensors(fn) -> tuple[int, list[tuple[str, str, float]]]:
    """(bytes, [(shape, dtype, MB)]) of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), (str(tuple(t.shape)), str(t.dtype).removeprefix("torch."), st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    total = sum(b for _, _, b in seen.values())
    items = sorted(((s, d, b / 1e6) for s, d, b in seen.values()), key=lambda x: -x[2])
    return total, items


def memory(n: int, variants: dict) -> None:
    from spla_kernels.select import select_blocks_fused
    from spla_lit import ops

    q, k, v = make_inputs(n, DEV)
    idx = select_blocks_fused(q, k, workload.SELECTION, config=variants["new"])
    gate, w = gate_inputs(n)
    rows = {}
    for name, variant in op_variants(variants).items():
        def f(ins, variant=variant):
            return spla_composed(ins[0], ins[1], ins[2], **variant, gate=ins[3], norm_weight=ins[4])

        rows[f"spla {name} gated"] = (f, (q, k, v, gate, w))
    rows["sparse"] = (lambda ins: ops.block_sparse_attention(ins[0], ins[1], ins[2], idx, block_size=workload.BS,
                                                             impl=IMPL, validate=False), (q, k, v))
    G = workload.HQ // workload.HKV

    def dense(ins):  # the dense model's attention: K/V repeated to the query heads, SDPA
        qt, kt, vt = ins[0].transpose(1, 2), ins[1].transpose(1, 2), ins[2].transpose(1, 2)
        return F.scaled_dot_product_attention(qt, kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1),
                                              is_causal=True)

    rows["dense"] = (dense, (q, k, v))
    for name, (f, xs) in rows.items():
        if left() < 0:
            log(f"deadline: memory N={n} {name} and later skipped")
            break
        try:
            ins = [x.detach().clone().requires_grad_() for x in xs]
            total, items = saved_tensors(lambda f=f, ins=ins: f(ins))
            run = K.fwd_bwd(lambda f=f, ins=ins: f(ins), ins)
            peak = _peak_of(run)
        except Exception as e:  # noqa: BLE001
            log(f"memory N={n} {name}: failed {type(e).__name__}: {e}"[:400])
            K._free()
            continue
        RESULTS["memory"].append(dict(n=n, row=name, peak_gb=peak, saved_gb=total / 1e9))
        RESULTS["saved"].append(dict(n=n, row=name, items=items[:12]))
        log(f"memory N={n} {name:16s}: fwd+bwd peak {peak:.2f} GB above the inputs; saved for backward "
            f"{total / 1e9:.3f} GB: " + ", ".join(f"{s} {d} {mb:.0f} MB" for s, d, mb in items[:8]))
        K._free()


# -------------------------------------------------------------------------------------------------- train


def _train_one(model: str, n: int, a) -> tuple[float, float]:
    """(ms per step, peak GiB) of the training step of ``model`` at N = n (everything it allocated is freed on
    return, so the next model's peak does not include it)."""
    import train_step

    torch.manual_seed(0)
    net = train_step.build(model, d_model=a.d_model, n_layers=a.layers, impl=IMPL, heads=workload.HQ,
                           kv_heads=workload.HKV, head_dim=workload.D, block_size=workload.BS,
                           topk=workload.TOPK).to(DEV)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=DEV == "cuda")
    x = torch.randint(0, 512, (1, n + 1), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.train_warmup):
        step()
    K._sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        step()
    K._sync()
    ms = (time.perf_counter() - t0) * 1e3 / a.train_steps
    return ms, (torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0)


def train(n: int, a) -> None:
    dense_tok = None
    for model in ("dense", "spla", "sparse"):
        if left() < 0:
            log(f"deadline: train N={n} {model} and later skipped")
            break
        try:
            ms, peak = _train_one(model, n, a)
        except Exception as e:  # noqa: BLE001
            log(f"train N={n} {model}: failed {type(e).__name__}: {e}"[:400])
            continue
        finally:
            K._free()
        tok = n / ms * 1e3
        if model == "dense":
            dense_tok = tok
        ratio = tok / dense_tok if dense_tok else None
        RESULTS["train"].append(dict(n=n, model=model, ms=ms, tok_s=tok, vs_dense=ratio, peak_gib=peak))
        log(f"train N={n} {model:6s} {ms:9.1f} ms/step {tok:10.0f} tok/s" + (f" {ratio:.2f}x dense" if ratio else "")
            + f" peak {peak:.1f} GiB")


# ------------------------------------------------------------------------------------------------ output


def markdown(device: str) -> str:
    r = RESULTS
    lines = [f"# Speed round two: {device}, torch {torch.__version__}", "",
             f"B=1 Hq={workload.HQ} Hkv={workload.HKV} D={workload.D} bf16, blocks of {workload.BS}, "
             f"top-{workload.TOPK}; medians of CUDA-event timings (triton.testing.do_bench). old = main's selection "
             "config and PyTorch combine; new = the table's selection config and the fused combine.", ""]
    if r["check"]:
        lines += ["## Checks (float64 references)", "", "| what | variant | N | result | figures |",
                  "| --- | --- | --- | --- | --- |"]
        for c in r["check"]:
            figs = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                             if k not in ("what", "variant", "n", "ok"))
            lines.append(f"| {c['what']} | {c.get('variant', '-')} | {c['n']} | {'PASS' if c['ok'] else 'FAIL'} | "
                         f"{figs} |")
        lines.append("")
    if r["op"]:
        lines += ["## Full op, fwd+bwd", "", "| N | row | ms | vs NSA | peak GB |", "| --- | --- | --- | --- | --- |"]
        for o in r["op"]:
            ratio = f"{o['vs_nsa']:.2f}x" if o["vs_nsa"] else "-"
            lines.append(f"| {o['n']} | {o['row']} | {o['ms']:.2f} | {ratio} | {o['peak_gb']:.2f} |")
        lines.append("")
    if r["select"]:
        lines += ["## Scoring + top-k", "", "| N | variant | ms | floor ms | x floor | no-merge ms | stats ms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in r["select"]:
            nm = f"{s['scoring_only_ms']:.3f}" if "scoring_only_ms" in s else "-"
            st = f"{s['stats_ms']:.3f}" if "stats_ms" in s else "-"
            lines.append(f"| {s['n']} | {s['variant']} | {s['ms']:.3f} | {s['floor_ms']:.3f} | {s['x_floor']:.1f} | "
                         f"{nm} | {st} |")
        lines.append("")
    if r["memory"]:
        lines += ["## Memory of the op (fwd+bwd peak above the inputs; saved for backward)", "",
                  "| N | row | peak GB | saved GB | largest saved |", "| --- | --- | --- | --- | --- |"]
        for m, s in zip(r["memory"], r["saved"]):
            big = "; ".join(f"{sh} {d} {mb:.0f} MB" for sh, d, mb in s["items"][:6])
            lines.append(f"| {m['n']} | {m['row']} | {m['peak_gb']:.2f} | {m['saved_gb']:.3f} | {big} |")
        lines.append("")
    if r["train"]:
        lines += ["## Training step (d_model 1024, 4 layers, bf16 autocast, AdamW)", "",
                  "| N | model | ms/step | tokens/s | vs dense | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
        for t in r["train"]:
            ratio = f"{t['vs_dense']:.2f}x" if t["vs_dense"] else "-"
            lines.append(f"| {t['n']} | {t['model']} | {t['ms']:.1f} | {t['tok_s']:.0f} | {ratio} | "
                         f"{t['peak_gib']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def save(out: str, device: str) -> None:
    if out:
        K._write(os.path.join(out, "speed_round2.md"), markdown(device))
        K._write(os.path.join(out, "speed_round2.json"), json.dumps(RESULTS, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    global DEV, IMPL, DEADLINE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="", help="folder for speed_round2.md / .json / .log")
    p.add_argument("--sections", default="check,op,select,memory,train")
    p.add_argument("--n", type=int, nargs="+", default=[65536, 131072], help="op and select lengths")
    p.add_argument("--mem-n", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--train-n", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--check-n", type=int, default=2048)
    p.add_argument("--check-select-n", type=int, default=4096)
    p.add_argument("--select-variants", default="", help="comma list (default: all of select_variants())")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no new item starts (default 230 on cuda, none on cpu)")
    a = p.parse_args(argv)
    DEV = a.device
    if a.deadline is None:
        a.deadline = 230.0 if DEV == "cuda" else math.inf  # the interpreter's smoke test must reach every section
    DEADLINE = START + a.deadline
    if DEV == "cuda" and not torch.cuda.is_available():
        log("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        return 1
    if DEV == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            log("--device cpu needs TRITON_INTERPRET=1 (the kernels run in Triton's interpreter)")
            return 1
        K._use_tiny_shape()
        IMPL = "triton"
        a.n, a.mem_n, a.train_n = [64], [64], [32]
        a.check_n, a.check_select_n, a.d_model, a.layers = 96, 128, 32, 1  # 96 > top-4 x 16: a residual
        a.train_warmup, a.train_steps = 1, 1
    K.DEV = DEV
    device = K.open_log(a.out, "speed_round2.log")
    sections = [s for s in a.sections.split(",") if s]
    variants = select_variants()
    names = [x for x in a.select_variants.split(",") if x] or list(variants)
    ok = True
    # Order of priority (the deadline cuts the tail): checks, then the first length of every section, then the
    # other lengths (the later select lengths time old and new only).
    firsts, rest = [], []
    for i, n in enumerate(a.n):
        if "op" in sections:
            (rest if i else firsts).append((f"op {n}", lambda n=n: time_op(n, variants, want_breakdown=True)))
        if "select" in sections:
            subset = names if i == 0 else [x for x in names if x in ("old", "new")]
            (rest if i else firsts).append((f"select {n}", lambda n=n, subset=subset: time_select(n, variants,
                                                                                                  subset)))
    for key, ns, fn in (("train", a.train_n, lambda n: train(n, a)),
                        ("memory", a.mem_n, lambda n: memory(n, variants))):
        if key in sections:
            for i, n in enumerate(ns):
                (rest if i else firsts).append((f"{key} {n}", lambda n=n, fn=fn: fn(n)))
    plan = ([("check", lambda: run_checks(a))] if "check" in sections else []) + firsts + rest
    for name, fn in plan:
        if left() < 0:
            log(f"deadline reached ({a.deadline:.0f} s): {name} and later skipped")
            break
        t0 = time.monotonic()
        try:
            res = fn()
            if name == "check":
                ok &= bool(res)
        except Exception as e:  # noqa: BLE001 - report and go on: the tables so far are kept
            log(f"{name}: failed {type(e).__name__}: {e}"[:400])
            traceback.print_exc(limit=4)
        log(f"[{name}: {time.monotonic() - t0:.0f} s, {time.monotonic() - START:.0f} s in total]")
        save(a.out, device)
        K._free()
    text = markdown(device)
    print(text)
    save(a.out, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
