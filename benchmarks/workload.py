"""The kernel benchmarks' workload: shapes, "real-looking" inputs and their block selections.

Shared by ``kernels.py``, ``linear_select.py`` (its ``log``) and ``residual_accuracy.py`` (run from the repository root
with ``PYTHONPATH=$PWD:$PWD/kernels``; this folder is the scripts' own, so they import it by name).

Setup of every table in BENCHMARKS.md sections 0-3: B=1, Hq=32, Hkv=2, D=128, bf16, blocks of 64, top-16
blocks per token (the diagonal one included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spla_lit.ops import block_key_stats
from spla_lit.ops.utils import cdiv
from spla_lit.options import Selection

B, HQ, HKV, D, BS, TOPK = 1, 32, 2, 128, 64, 16
G = HQ // HKV
SCALE = D**-0.5
SELECTION = Selection(block_size=BS, topk=TOPK)


def use_tiny_shape() -> None:
    """Switch to the CPU smoke test's shape: 4 query heads, 2 KV heads, D=32, blocks of 16, top-4 (Triton's
    interpreter takes minutes per call at the real one). Scripts re-read the constants after this call."""
    global HQ, HKV, D, BS, TOPK, G, SCALE, SELECTION
    HQ, HKV, D, BS, TOPK = 4, 2, 32, 16, 4
    G, SCALE, SELECTION = HQ // HKV, D**-0.5, Selection(block_size=BS, topk=TOPK)


LOG_FILE: str | None = None  # a script's log file (--out), appended to by ``log`` besides stdout


def log(*a) -> None:
    """Print a line (flushed) and append it to ``LOG_FILE`` when one is set."""
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    if LOG_FILE is not None:
        with open(LOG_FILE, "a") as f:
            f.write(line + "\n")


def smooth(n: int, heads: int, gen: torch.Generator, noise: float, dev: str, n_freq: int = 8) -> torch.Tensor:
    """[1, n, heads, D] bf16: a sum of low-frequency cosines along the sequence (random directions) plus noise,
    so that neighbouring tokens pick similar blocks."""
    t = torch.arange(n, device=dev, dtype=torch.float32)[:, None, None]
    x = torch.zeros(n, heads, D, device=dev)
    for f in range(n_freq):
        freq = (torch.rand(1, generator=gen).item() * 8 + 0.5) * 2 * math.pi / 8192 * 2 ** (f / 2)
        u = torch.randn(1, heads, D, generator=gen).to(dev)
        x += torch.cos(freq * t + torch.rand(1, generator=gen).item() * 6.28) * u
    x = x / math.sqrt(n_freq) + noise * torch.randn(n, heads, D, generator=gen).to(dev)
    return x[None].to(torch.bfloat16)


def make_inputs(n: int, dev: str, seed: int = 0, noise: float = 0.5) -> tuple[torch.Tensor, ...]:
    """q [1, n, HQ, D], k, v [1, n, HKV, D], bf16 on ``dev``: smooth q and k, Gaussian v."""
    g = torch.Generator().manual_seed(seed)
    q = smooth(n, HQ, g, noise, dev)
    k = smooth(n, HKV, g, noise, dev)
    v = torch.randn(1, n, HKV, D, generator=g).to(dev, torch.bfloat16)
    return q, k, v


def chunked_select(q: torch.Tensor, k: torch.Tensor, *, topk: int | None = None, block_size: int | None = None,
                   query_block: int = 1, random: bool = False, chunk: int = 2048, seed: int = 0) -> torch.Tensor:
    """Taylor-2 (diag) block scores reduced over the G heads by log-sum-exp, then top-k with the query's own
    blocks forced, computed per chunk of queries so that the score matrix never exists whole (int32
    [B, Hkv, nQ, topk], ascending, -1 padded). ``random``: uniform scores instead. PyTorch only: the stand-in
    where the fused selection kernel cannot run (query blocks, no CUDA). topk / block_size: the workload's."""
    topk = TOPK if topk is None else topk
    block_size = BS if block_size is None else block_size
    Bq, N, Hq, Dq = q.shape
    Hkv = k.shape[2]
    nK = cdiv(N, block_size)
    cnt, mean, var = block_key_stats(k, block_size, "diag")
    gen = torch.Generator(device=q.device).manual_seed(seed)
    chunk = max(query_block, chunk // query_block * query_block)
    scale = Dq**-0.5
    out = []
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        nq = cdiv(e - s, query_block)
        if random:
            sc = torch.rand(Bq, Hkv, nq, nK, device=q.device, generator=gen)
        else:
            qc = q[:, s:e].float().view(Bq, e - s, Hkv, Hq // Hkv, Dq).permute(0, 2, 3, 1, 4)
            lm = cnt.log() + scale * torch.einsum("bhgnd,bhkd->bhgnk", qc, mean)
            lm = lm + 0.5 * scale**2 * torch.einsum("bhgnd,bhkd->bhgnk", qc.square(), var)
            if query_block > 1:
                pad = nq * query_block - (e - s)
                lm = F.pad(lm, (0, 0, 0, pad)).view(*lm.shape[:3], nq, query_block, nK).mean(4)
            sc = lm.logsumexp(2)
        t = s // query_block + torch.arange(nq, device=q.device)
        last = torch.clamp((t + 1) * query_block - 1, max=N - 1)
        diag = last // block_size
        first = (t * query_block) // block_size
        b = torch.arange(nK, device=q.device)
        forced = (b[None] >= first[:, None]) & (b[None] <= diag[:, None])
        sc = sc.masked_fill(b[None] > diag[:, None], float("-inf")).masked_fill(forced, float("inf"))
        vals, idx = sc.topk(min(topk, nK), dim=-1)
        idx = torch.where(vals == float("-inf"), nK, idx).sort(-1).values
        idx = torch.where(idx == nK, -1, idx)
        out.append(F.pad(idx, (0, topk - idx.shape[-1]), value=-1).to(torch.int32))
    return torch.cat(out, dim=2)


def real_selection(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The benchmark's per-token selection ``(block_idx, how)``: the fused selection kernel, or the chunked
    PyTorch scorer where the kernel does not run (its result is the same up to ties)."""
    try:
        from spla_kernels.select import select_blocks_fused

        return select_blocks_fused(q, k, SELECTION), "fused select kernel"
    except Exception as e:  # noqa: BLE001 - fall back to the torch scorer, and say so
        log(f"fused selection failed ({type(e).__name__}: {e}"[:300] + "); using the chunked torch scorer")
    return chunked_select(q, k), "chunked torch scorer"
