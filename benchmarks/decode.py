"""Decode benchmark: SPLA's KV-cache decode step against dense decode, on one layer and on a whole ~1B model.

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/decode.py --out benchmarks/h200_decode     # GPU, full size
    TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/kernels python benchmarks/decode.py --device cpu --out /tmp/decode

In order, each result in the same run:

0. correctness first: the SPLA decode step (Triton on CUDA, bf16) and dense decode against float64 references
   on the same cache; the CUDA-graph step against the eager one (whole model). A failed check stops the run.
1. the device's copy bandwidth (a large device-to-device copy).
2. attention decode step of one layer (Hq 32, Hkv 2, D 128, blocks of 64, top-16) at 8K / 32K / 128K / 512K,
   B = 1 and 8: SPLA (``ops.spla_decode``: scoring + top-k from the statistics, sparse + selected-linear over the
   selected blocks, residual from the state, combine) against dense SDPA ``enable_gqa`` on the same cache,
   flash-attn's ``flash_attn_with_kvcache`` if installed, fla NSA if it has a decode path; time (CUDA-graph
   replays, eager too), bytes read per step, achieved bandwidth and its fraction of the copy bandwidth.
3. whole-model decode tokens/s at 128K, B = 8, Llama-3.2-1B-shaped (16 layers, d 2048, 32 q heads, 8 KV heads
   of 64, MLP 8192, vocab 128256), SPLA (taylor2 diag, top-16 of 64, rla subtract) against the same model
   dense; caches filled with random keys / values and their statistics (decode cost does not depend on them).
4. prefill at 128K (B = 1): the attention op of one layer (section 2's shapes) and the whole model, SPLA
   (training kernels on an empty cache) against dense.

Times are medians of CUDA-event timings. Writes ``results.json`` and ``results.md`` to ``--out``, rewritten after
every section (a run stopped part way keeps the sections it finished).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import event_ms

from spla_lit import ops
from spla_lit.inference.step import DecodeStep, _mutable_state, _restore
from spla_lit.layers import BlockScorer, BlockSparseAttention, DenseAttention, ResidualLinearAttention, SPLAAttention
from spla_lit.models import DecoderLM
from spla_lit.options import Selection

GIB = 1024**3

FULL = dict(hq=32, hkv=2, d=128, block=64, topk=16, contexts=[8192, 32768, 131072, 524288], batches=[1, 8],
            model=dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, mlp_ratio=4.0,
                       mlp_multiple_of=256, vocab_size=128256, rope_theta=500000.0),
            model_context=131072, model_batch=8, prefill_context=131072, steps=20, check_context=4096)
TINY = dict(hq=4, hkv=2, d=16, block=16, topk=4, contexts=[256, 1024], batches=[1, 2],
            model=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_ratio=4.0,
                       mlp_multiple_of=32, vocab_size=256, rope_theta=10000.0),
            model_context=256, model_batch=2, prefill_context=128, steps=3, check_context=256)


def log(*args) -> None:
    print(*args, flush=True)


class Timer:
    """Median wall time of a callable: CUDA events on CUDA, perf_counter on the CPU (``max_iters`` caps the
    iterations: the CPU run under the Triton interpreter only checks that everything runs)."""

    def __init__(self, device: torch.device, max_iters: int = 20):
        self.cuda, self.max_iters = device.type == "cuda", max_iters

    def __call__(self, fn, iters: int = 20, warmup: int = 3) -> float:
        iters, warmup = min(iters, self.max_iters), min(warmup, self.max_iters)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                times.append(event_ms(fn))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)


def graphed(fn, device: torch.device):
    """``fn`` replayed from a CUDA graph (captured after a warm-up), or ``fn`` itself off CUDA."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# ------------------------------------------------------------------------------------------ the layer's cache


def layer_cache(B: int, ctx: int, c: dict, device, dtype, seed: int = 0):
    """Random keys / values of ``ctx`` tokens per row, their block statistics and linear state, and one query."""
    g = torch.Generator(device=device).manual_seed(seed)
    Hq, Hkv, D, bs = c["hq"], c["hkv"], c["d"], c["block"]
    k = torch.randn(B, ctx, Hkv, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, ctx, Hkv, D, generator=g, device=device, dtype=dtype)
    nK = -(-ctx // bs)
    mean = torch.empty(B, Hkv, nK, D, device=device, dtype=dtype)
    var = torch.empty_like(mean)
    state = torch.empty(B, Hkv, D, D + 1, device=device, dtype=torch.float32)
    for b in range(B):  # one row at a time: float32 temporaries of one row only
        kb = F.pad(k[b].float(), (0, 0, 0, 0, 0, nK * bs - ctx)).view(nK, bs, Hkv, D)
        mean[b] = kb.mean(1).transpose(0, 1).to(dtype)
        var[b] = kb.var(1, unbiased=False).transpose(0, 1).to(dtype)
        pk = F.elu(k[b].float()) + 1
        v1 = torch.cat([v[b].float(), torch.ones_like(v[b, ..., :1], dtype=torch.float32)], -1)
        state[b] = torch.einsum("nhf,nhe->hfe", pk, v1)
    q = torch.randn(B, 1, Hq, D, generator=g, device=device, dtype=dtype)
    return dict(q=q, k=k, v=v, mean=mean, var=var, state=state, phi_q=F.elu(q) + 1,
                gate=torch.rand(B, 1, Hq, generator=g, device=device, dtype=dtype),
                norm_weight=torch.rand(D, generator=g, device=device, dtype=dtype) + 0.5,
                positions=torch.full((B, 1), ctx - 1, device=device, dtype=torch.long))


def spla_step(x: dict, sel: Selection, impl: str, block_idx=None):
    return ops.spla_decode(x["q"], x["k"], x["v"], x["positions"], sel, block_stats=(x["mean"], x["var"]),
                           state=x["state"], phi_q=x["phi_q"], feature_map="elu1", gate=x["gate"],
                           norm_weight=x["norm_weight"], block_idx=block_idx, impl=impl)


def spla_kernels_only(x: dict, sel: Selection, impl: str):
    """The two kernel stages of the step (selection; sparse + selected-linear), without the torch epilogue
    (``phi(q)^T S``, the residual's finish and the combine): the difference to :func:`spla_step` is its cost."""
    idx = ops.decode_select(x["q"], x["mean"], x["var"], x["positions"], sel, impl=impl)
    return ops.decode_sparse_attention(x["q"], x["k"], x["v"], idx, x["positions"], block_size=sel.block_size,
                                       phi_q=x["phi_q"], with_normalizer=True, impl=impl)


def dense_step(x: dict):
    return F.scaled_dot_product_attention(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2),
                                          enable_gqa=True)


def bytes_read(B: int, ctx: int, c: dict, elem: int) -> dict:
    """Bytes a decode step must read: dense reads every key and value; SPLA the statistics of the visible blocks
    (mean + variance), the selected blocks' keys and values and the state (float32 [F, D + 1] per KV head)."""
    Hkv, D, bs = c["hkv"], c["d"], c["block"]
    nK = -(-ctx // bs)
    dense = B * Hkv * ctx * 2 * D * elem
    stats = B * Hkv * nK * 2 * D * elem
    blocks = B * Hkv * min(c["topk"], nK) * bs * 2 * D * elem
    state = B * Hkv * D * (D + 1) * 4
    return dict(dense=dense, spla=stats + blocks + state, spla_stats=stats, spla_blocks=blocks, spla_state=state)


# --------------------------------------------------------------------------------------------------- sections


def check(c: dict, device, dtype, impl: str) -> dict:
    """SPLA and dense decode against float64 references on one cache (B = 2)."""
    ctx = c["check_context"]
    x = layer_cache(2, ctx, c, device, dtype, seed=1)
    x64 = {n: (t.double() if t.is_floating_point() else t) for n, t in x.items()}
    sel = Selection(block_size=c["block"], topk=c["topk"])
    idx64 = ops.decode_select(x64["q"], x64["mean"], x64["var"], x64["positions"], sel, impl="reference")
    idx = ops.decode_select(x["q"], x["mean"], x["var"], x["positions"], sel, impl=impl)
    same = float((idx.sort(-1).values == idx64.sort(-1).values).all(-1).float().mean())
    ref = spla_step(x64, sel, "reference", idx64)
    got = spla_step(x, sel, impl, idx64.to(torch.int32))
    err = float((got.double() - ref).abs().max() / ref.abs().max())
    dense_ref = dense_step(x64)
    dense_err = float((dense_step(x).double() - dense_ref).abs().max() / dense_ref.abs().max())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    out = dict(context=ctx, spla_rel_err=err, dense_rel_err=dense_err, selection_agreement=same, tolerance=tol)
    log(f"check: SPLA step rel err {err:.2e}, dense {dense_err:.2e} (tol {tol}); selection agrees with float64 "
        f"on {100 * same:.1f}% of (row, KV head)")
    if not (err < tol and dense_err < tol and same >= 0.5):
        raise SystemExit(f"correctness check failed: {out}")
    return out


def copy_bandwidth(device, timer: Timer) -> float:
    n = (1 * GIB if device.type == "cuda" else 64 * 1024**2) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a), iters=20)
    bw = 2 * a.numel() * 2 / (ms * 1e-3)
    log(f"copy bandwidth: {bw / 1e12:.2f} TB/s ({2 * a.numel() * 2 / GIB:.1f} GiB moved in {ms:.3f} ms)")
    a = b = None  # free the buffers (not del: the timed lambda closes over them)
    return bw


def fla_nsa_decode():
    """fla's NSA decode entry point, or None and why."""
    try:
        import fla
        import fla.ops.nsa as nsa
    except Exception as e:  # noqa: BLE001 - any import failure: no peer
        return None, f"fla not importable ({type(e).__name__})"
    names = [n for n in dir(nsa) if "decod" in n.lower() or "recurrent" in n.lower()]
    if not names:
        return None, (f"fla {getattr(fla, '__version__', '?')}: fla.ops.nsa has no decode entry point "
                      f"(only {', '.join(n for n in dir(nsa) if not n.startswith('_'))}; its parallel kernels take "
                      "queries at positions 0..N-1 of their own keys)")
    return None, f"fla {getattr(fla, '__version__', '?')}: found {names}, not wired here (signature unknown)"


def attention_decode(c: dict, device, dtype, impl: str, timer: Timer, copy_bw: float) -> list[dict]:
    rows = []
    sel = Selection(block_size=c["block"], topk=c["topk"])
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # noqa: BLE001
        flash_attn_with_kvcache = None
    _, nsa_note = fla_nsa_decode()
    log(f"fla NSA decode: {nsa_note}")
    elem = torch.empty(0, dtype=dtype).element_size()
    for ctx in c["contexts"]:
        for B in c["batches"]:
            x = layer_cache(B, ctx, c, device, dtype)
            r = dict(context=ctx, batch=B, **bytes_read(B, ctx, c, elem))
            with torch.inference_mode():
                r["spla_eager_ms"] = timer(lambda x=x: spla_step(x, sel, impl))
                r["spla_ms"] = timer(graphed(lambda x=x: spla_step(x, sel, impl), device))
                r["spla_kernels_ms"] = timer(graphed(lambda x=x: spla_kernels_only(x, sel, impl), device))
                r["dense_eager_ms"] = timer(lambda x=x: dense_step(x))
                r["dense_ms"] = timer(graphed(lambda x=x: dense_step(x), device))
                if flash_attn_with_kvcache is not None and device.type == "cuda":
                    seqlens = torch.full((B,), ctx, dtype=torch.int32, device=device)
                    r["flash_kvcache_ms"] = timer(graphed(
                        lambda x=x, s=seqlens: flash_attn_with_kvcache(x["q"], x["k"], x["v"], cache_seqlens=s),
                        device))
            for name in ("spla", "dense"):
                r[f"{name}_GBps"] = r[name] / (r[f"{name}_ms"] * 1e-3) / 1e9
                r[f"{name}_bw_frac"] = r[name] / (r[f"{name}_ms"] * 1e-3) / copy_bw
            r["speedup"] = r["dense_ms"] / r["spla_ms"]
            r["bytes_ratio"] = r["dense"] / r["spla"]
            log(f"decode ctx {ctx:>7} B {B}: SPLA {r['spla_ms']:.4f} ms (kernels alone {r['spla_kernels_ms']:.4f}, "
                f"eager {r['spla_eager_ms']:.3f}) "
                f"dense {r['dense_ms']:.4f} ms (eager {r['dense_eager_ms']:.3f})"
                + (f" flash {r['flash_kvcache_ms']:.4f} ms" if "flash_kvcache_ms" in r else "")
                + f" -> {r['speedup']:.1f}x; bytes {r['spla'] / 1e6:.1f} MB vs {r['dense'] / 1e6:.1f} MB "
                f"(1/{r['bytes_ratio']:.0f}); {r['spla_GBps']:.0f} / {r['dense_GBps']:.0f} GB/s")
            rows.append(r)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, nsa_note


def build_model(c: dict, kind: str, device, dtype, impl: str) -> DecoderLM:
    if kind == "spla":
        attention = partial(SPLAAttention, scorer=partial(BlockScorer, method="taylor2"),
                            sparse=partial(BlockSparseAttention, block_size=c["block"], topk=c["topk"]),
                            rla=partial(ResidualLinearAttention), impl=impl)
    else:
        attention = partial(DenseAttention)
    with torch.device(device):
        net = DecoderLM(attention=attention, **c["model"])
    net = net.to(dtype).eval()
    with torch.no_grad():  # open the RLA gates: the residual is part of the output
        for m in net.modules():
            if isinstance(m, ResidualLinearAttention) and hasattr(m, "gate"):
                m.gate.bias.fill_(0.5)
    return net


@torch.no_grad()
def fill_cache(cache, ctx: int, seed: int = 0) -> None:
    """Every row holds ``ctx`` random tokens: keys / values, their block moments and the linear state."""
    g = torch.Generator(device=cache.device).manual_seed(seed)
    for layer in cache.layers:
        k = layer.k[:, :ctx]
        k.normal_(generator=g)
        layer.v[:, :ctx].normal_(generator=g)
        if layer.mean is not None:
            bs = layer.spec.block_size
            full = ctx // bs
            for b in range(cache.batch_size):
                kb = k[b, : full * bs].float().view(full, bs, *k.shape[2:])
                layer.mean[b, :, :full] = kb.mean(1).transpose(0, 1).to(layer.mean.dtype)
                if layer.var is not None:
                    layer.var[b, :, :full] = kb.var(1, unbiased=False).transpose(0, 1).to(layer.var.dtype)
                rest = k[b, full * bs:].float()
                layer.run_sum[b] = rest.sum(0)
                if layer.run_sq is not None:
                    layer.run_sq[b] = rest.square().sum(0)
        if layer.state is not None:
            layer.state.uniform_(0, ctx / 100, generator=g)
    cache.lengths.fill_(ctx)
    cache.host_lengths.fill_(ctx)


def _decoding(step, tok):
    """One greedy decode step per call, feeding back its own argmax."""
    state = {"tok": tok}

    def decode():
        state["tok"] = step(state["tok"]).argmax(-1)

    return decode


def model_decode(c: dict, device, dtype, impl: str, timer: Timer) -> list[dict]:
    rows = []
    ctx, B, steps = c["model_context"], c["model_batch"], c["steps"]
    for kind in ("spla", "dense"):
        net = build_model(c, kind, device, dtype, impl)
        cache = net.new_cache(B, ctx + 4 * steps + 16, dtype=dtype)
        fill_cache(cache, ctx)
        tok = torch.randint(0, c["model"]["vocab_size"], (B,), device=device)
        r = dict(kind=kind, context=ctx, batch=B, params=net.num_parameters(exclude_embeddings=False),
                 cache_GiB=cache.nbytes / GIB)
        with torch.inference_mode():
            eager = DecodeStep(net, cache, cuda_graph=False)
            saved = _mutable_state(cache)
            ref = eager(tok)
            _restore(cache, saved)
            # eager first: the cache still reads up to the rows' lengths (dense: SDPA flash, no mask); the graph
            # then switches it to static shapes (the whole capacity, masked)
            r["eager_ms_per_step"] = timer(_decoding(eager, tok), iters=steps, warmup=1)
            _restore(cache, saved)
            step = eager
            if device.type == "cuda":
                step = DecodeStep(net, cache, cuda_graph=True)
                got = step(tok)
                _restore(cache, saved)
                r["graph_vs_eager_rel_err"] = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                log(f"{kind}: graph step vs eager step rel err {r['graph_vs_eager_rel_err']:.2e}")
                if not r["graph_vs_eager_rel_err"] < 5e-2:
                    raise SystemExit(f"the CUDA-graph decode step differs from the eager one: {r}")
            r["graph_ms_per_step"] = timer(_decoding(step, tok), iters=steps, warmup=1)
            _restore(cache, saved)
            for name in ("eager", "graph"):
                r[f"{name}_tokens_per_s"] = B / (r[f"{name}_ms_per_step"] * 1e-3)
            r["best_tokens_per_s"] = max(r["eager_tokens_per_s"], r["graph_tokens_per_s"])
        log(f"model {kind}: {r['params'] / 1e9:.2f}B params, cache {r['cache_GiB']:.1f} GiB; decode at {ctx} x B {B}: "
            f"graph {r['graph_ms_per_step']:.3f} ms/step = {r['graph_tokens_per_s']:.0f} tokens/s, "
            f"eager {r['eager_ms_per_step']:.3f} ms = {r['eager_tokens_per_s']:.0f} tokens/s")
        rows.append(r)
        del net, cache, step, eager
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def prefill(c: dict, device, dtype, impl: str, timer: Timer) -> dict:
    n = c["prefill_context"]
    out = dict(context=n)
    sel = Selection(block_size=c["block"], topk=c["topk"])
    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(1, n, c["hq"], c["d"], generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, n, c["hkv"], c["d"], generator=g, device=device, dtype=dtype) for _ in range(2))
    with torch.inference_mode():
        out["op_spla_ms"] = timer(lambda: ops.spla_attention(q, k, v, sel, impl=impl), iters=3, warmup=1)
        out["op_dense_ms"] = timer(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True), iters=3,
            warmup=1)
    q = k = v = None  # free the buffers (not del: the timed lambdas close over them)
    log(f"prefill op at {n}: SPLA {out['op_spla_ms']:.1f} ms, dense {out['op_dense_ms']:.1f} ms "
        f"-> {out['op_dense_ms'] / out['op_spla_ms']:.1f}x")
    ids = torch.randint(0, c["model"]["vocab_size"], (1, n), device=device)
    for kind in ("spla", "dense"):
        net = build_model(c, kind, device, dtype, impl)
        cache = net.new_cache(1, n, dtype=dtype)

        def run(net=net, cache=cache):
            cache.reset()
            net._forward_cached(ids, None, cache, last_only=True)

        with torch.inference_mode():
            out[f"model_{kind}_ms"] = timer(run, iters=2, warmup=1)
        del net, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["op_speedup"] = out["op_dense_ms"] / out["op_spla_ms"]
    out["model_speedup"] = out["model_dense_ms"] / out["model_spla_ms"]
    log(f"prefill model at {n}: SPLA {out['model_spla_ms']:.0f} ms, dense {out['model_dense_ms']:.0f} ms "
        f"-> {out['model_speedup']:.2f}x")
    return out


# ----------------------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"# Decode benchmark ({e['device_name']}, {e['date']})", "",
             f"- command: `{e['command']}`", f"- torch {e['torch']}, triton {e['triton']}, impl {e['impl']}, "
             f"dtype {e['dtype']}", f"- copy bandwidth (same run): {res['copy_bw'] / 1e12:.2f} TB/s",
             f"- correctness (float64 reference, context {res['check']['context']}): SPLA step rel err "
             f"{res['check']['spla_rel_err']:.2e}, dense {res['check']['dense_rel_err']:.2e}, selection agreement "
             f"{100 * res['check']['selection_agreement']:.1f}%", f"- fla NSA decode: {res['nsa']}", "",
             "## Attention decode step, one layer", "",
             "| context | B | SPLA ms | SPLA kernels alone ms | SPLA eager ms | dense SDPA ms | flash kvcache ms | "
             "SPLA vs dense | SPLA MB read | dense MB read | bytes ratio | SPLA GB/s (of copy) | "
             "dense GB/s (of copy) |",
             "|" + " --- |" * 13]
    for r in res["attention"]:
        lines.append(f"| {r['context']} | {r['batch']} | {r['spla_ms']:.4f} | {r['spla_kernels_ms']:.4f} | "
                     f"{r['spla_eager_ms']:.3f} | "
                     f"{r['dense_ms']:.4f} | {r.get('flash_kvcache_ms', float('nan')):.4f} | {r['speedup']:.1f}x | "
                     f"{r['spla'] / 1e6:.2f} | {r['dense'] / 1e6:.1f} | 1/{r['bytes_ratio']:.0f} | "
                     f"{r['spla_GBps']:.0f} ({100 * r['spla_bw_frac']:.0f}%) | "
                     f"{r['dense_GBps']:.0f} ({100 * r['dense_bw_frac']:.0f}%) |")
    lines += ["", "## Whole-model decode", "",
              "| model | params | context | B | cache GiB | ms/step (graph) | tokens/s (graph) | ms/step (eager) | "
              "graph vs eager |", "|" + " --- |" * 9]
    for r in res["model"]:
        lines.append(f"| {r['kind']} | {r['params'] / 1e9:.2f}B | {r['context']} | {r['batch']} | "
                     f"{r['cache_GiB']:.1f} | "
                     f"{r['graph_ms_per_step']:.3f} | {r['graph_tokens_per_s']:.0f} | {r['eager_ms_per_step']:.3f} | "
                     f"{r.get('graph_vs_eager_rel_err', float('nan')):.1e} |")
    if len(res["model"]) == 2:
        spla, dense = res["model"]
        lines.append(f"\nSPLA / dense decode tokens/s, each at its best mode: "
                     f"{spla['best_tokens_per_s'] / dense['best_tokens_per_s']:.2f}x (dense eager reads exactly the "
                     "rows' length with SDPA flash; a graph step reads the whole capacity, masked)")
    p = res["prefill"]
    if not p:
        return "\n".join([*lines, ""])
    lines += ["", f"## Prefill at {p['context']} tokens (B = 1)", "",
              f"- attention op (Hq {res['config']['hq']}, Hkv {res['config']['hkv']}, D {res['config']['d']}): "
              f"SPLA {p['op_spla_ms']:.1f} ms, dense SDPA {p['op_dense_ms']:.1f} ms -> {p['op_speedup']:.1f}x",
              f"- whole model: SPLA {p['model_spla_ms']:.0f} ms, dense {p['model_dense_ms']:.0f} ms -> "
              f"{p['model_speedup']:.2f}x", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def decode_knobs(c: dict, device, dtype, impl: str, timer: Timer) -> list[dict]:
    """Opt-in section ``knobs``: the decode kernels' launch choices (``spla_kernels.decode.CONFIG``) at the
    largest context, B = 8: selection alone and the whole step per setting (CUDA-graph replays)."""
    from spla_kernels import decode as dk

    sel = Selection(block_size=c["block"], topk=c["topk"])
    ctx, B = c["contexts"][-1], c["batches"][-1]
    x = layer_cache(B, ctx, c, device, dtype)
    default, rows = dk.CONFIG, []
    grid = [dict(score_blocks=n, score_warps=w) for n in (32, 64, 128) for w in (4, 8)]
    grid += [dict(programs_per_sm=p) for p in (1, 4)] + [dict(attn_warps=8)]
    try:
        for knobs in grid:
            dk.CONFIG = replace(default, **knobs)  # the kernels read the module's CONFIG at each launch
            with torch.inference_mode():
                r = dict(context=ctx, batch=B, **knobs)
                r["select_ms"] = timer(graphed(lambda: ops.decode_select(
                    x["q"], x["mean"], x["var"], x["positions"], sel, impl=impl), device))
                r["spla_ms"] = timer(graphed(lambda: spla_step(x, sel, impl), device))
            log(f"knobs {knobs}: select {r['select_ms']:.4f} ms, step {r['spla_ms']:.4f} ms")
            rows.append(r)
    finally:
        dk.CONFIG = default
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"])
    ap.add_argument("--sections", default="attention,model,prefill",
                    help="comma-separated subset to run (also: knobs, the decode kernels' launch choices)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    c = dict(FULL if device.type == "cuda" else TINY)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, 20 if device.type == "cuda" else 2)
    import triton

    res = {"env": dict(device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                       or "cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       command=" ".join([os.path.basename(sys.executable), *sys.argv]), torch=torch.__version__,
                       triton=triton.__version__, impl=args.impl, dtype=str(dtype)),
           "config": {k: v for k, v in c.items() if k != "model"} | {"model": c["model"]}}
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    res.update(attention=[], nsa="not run", model=[], prefill={})

    def save() -> None:  # after every section: a run stopped part way keeps what it measured
        res["wall_s"] = time.perf_counter() - t0
        write_atomic(out / "results.json", json.dumps(res, indent=1, default=str) + "\n")
        write_atomic(out / "results.md", markdown(res))

    res["check"] = check(c, device, dtype, args.impl)
    res["copy_bw"] = copy_bandwidth(device, timer)
    save()
    if "attention" in sections:
        res["attention"], res["nsa"] = attention_decode(c, device, dtype, args.impl, timer, res["copy_bw"])
        save()
    if "model" in sections:
        res["model"] = model_decode(c, device, dtype, args.impl, timer)
        save()
    if "prefill" in sections:
        res["prefill"] = prefill(c, device, dtype, args.impl, timer)
        save()
    if "knobs" in sections:  # opt-in: the decode kernels' launch choices
        res["knobs"] = decode_knobs(c, device, dtype, args.impl, timer)
        save()
    log(f"done in {res['wall_s']:.0f} s; wrote {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
