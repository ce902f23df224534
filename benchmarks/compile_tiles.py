"""Offline compilation of every kernel launch under the per-device tile table, without a GPU.

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/compile_tiles.py [--arch sm90 sm80 sm89 default]
        [--shapes bench fp32 d256 mha block128] [--ptx DIR] [--out table.md]

For each GPU class of ``spla_kernels.config`` and each shape, the entry points run on small CPU tensors with
their tile config taken from the table for that class, every kernel launch is recorded instead of run, and
each distinct launch is compiled with ``triton.compile`` for the class's target (ptxas from Triton's wheel).
Prints registers, stack bytes (spills) and shared memory per launch against the class's limit
(``SHARED_MEMORY``); exits 1 if a launch does not compile or does not fit. Families the table has no
tiles for on a class (the entry points decline there) are listed as ``declined``. ``--ptx DIR`` also writes each
kernel's PTX (to compare the code of two versions of a kernel). Nothing is timed: this checks that a table
entry can launch on a class, not that it is fast there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_tiles.py compiles for a GPU target: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import spla_kernels.linear as L  # noqa: E402
import spla_kernels.residual as R  # noqa: E402
import spla_kernels.select as SEL  # noqa: E402
import spla_kernels.sparse as SP  # noqa: E402
from spla_kernels.config import SHARED_MEMORY, linear_config, select_config, sparse_config  # noqa: E402
from spla_lit.options import Selection  # noqa: E402

# Compute capability compiled for each class; ``default`` (unknown GPUs) gets the Ampere ISA and the
# smallest shared-memory limit of the table.
TARGETS = {"sm90": 90, "sm80": 80, "sm89": 89, "default": 80}
# (dtype, head dim, query heads, KV heads, block size): "bench" is the benchmark's shape (BENCHMARKS.md).
SHAPES = {
    "bench": (torch.bfloat16, 128, 32, 2, 64),
    "fp32": (torch.float32, 128, 32, 2, 64),
    "d256": (torch.bfloat16, 256, 32, 2, 64),
    "mha": (torch.bfloat16, 128, 8, 8, 64),
    "block128": (torch.bfloat16, 128, 32, 2, 128),
}
N, TOPK = 1024, 8
_KERNELS = {
    SP: ("sparse_fwd_kernel", "sparse_bwd_dq_kernel", "sparse_bwd_dkv_kernel"),
    SEL: ("select_kernel",),
    L: ("states_local_kernel", "states_scan_kernel", "states_fixup_kernel", "chunk_out_kernel",
        "chunk_dkdv_kernel"),
    R: ("residual_bwd_kernel",),
}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.fn, args, kw))


def record(run) -> list:
    """The kernel launches of ``run()`` (nothing runs on a device)."""
    launches: list = []
    saved = {(m, n): getattr(m, n) for m, names in _KERNELS.items() for n in names}
    try:
        for (m, n), fn in saved.items():
            setattr(m, n, _Recorder(fn, launches))
        run()
    finally:
        for (m, n), fn in saved.items():
            setattr(m, n, fn)
    return launches


def _causal_idx(hkv: int, n: int, block: int, topk: int) -> torch.Tensor:
    """Each token selects its diagonal block and the topk - 1 before it, [1, Hkv, N, topk] int32."""
    diag = torch.arange(n) // block
    idx = diag[:, None] - torch.arange(topk - 1, -1, -1)[None, :]
    idx = torch.where(idx >= 0, idx, n).sort(-1).values  # ascending, the -1 padding last
    return torch.where(idx == n, -1, idx).to(torch.int32).expand(1, hkv, n, topk).contiguous()


def shape_launches(arch: str, shape: str) -> tuple[list, list[str]]:
    """Every launch of the sparse, fused, selection, linear and residual paths (forward and backward) at
    ``shape`` with the table's tiles for ``arch``, and the families the table declines there."""
    dtype, d, hq, hkv, block = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def leaf(h, dim=d):
        return torch.rand(1, N, h, dim, generator=g).to(dtype).requires_grad_()

    q, k, v, pq, pk = leaf(hq), leaf(hkv), leaf(hkv), leaf(hq), leaf(hkv)
    idx = _causal_idx(hkv, N, block, TOPK)
    f = min(d, 128)  # the linear kernels take feature and value dims <= 128
    lq, lk, lv = leaf(hq, f), leaf(hkv, f), leaf(hkv, f)
    kw = dict(block_size=block, query_block=1, scale=d**-0.5)

    def sparse():
        cfg = sparse_config(arch, fused=False, dtype=dtype, dim=d, block_size=block)
        o, lse = SP.block_sparse_attention(q, k, v, idx, config=cfg, **kw)
        torch.autograd.grad((o.float().sum() + lse.sum()), (q, k, v))
        cfg = sparse_config(arch, fused=True, dtype=dtype, dim=d, block_size=block)
        outs = SP.sparse_attention_with_selected_linear(q, k, v, pq, pk, idx, with_normalizer=True, config=cfg, **kw)
        torch.autograd.grad(sum(x.float().sum() for x in outs), (q, k, v, pq, pk))

    def select():
        cfg = select_config(arch, dtype=dtype, head_dim=d)
        SEL.select_blocks_fused(q, k, Selection(block_size=block, topk=TOPK), config=cfg)

    def linear():
        # One super-chunk per chunk would skip the fix-up kernel: force several, as at long N.
        cfg = replace(linear_config(arch, dtype=dtype), super_target=1)
        out = L.causal_linear_attention(lq, lk, lv, config=cfg)
        torch.autograd.grad(out.sum(), (lq, lk, lv))
        sel = torch.zeros(1, N, hq, f + 1, requires_grad=True)
        nonempty = torch.ones(1, hkv, N, dtype=torch.bool)
        r = R.subtract_residual(lq, lk, lv, sel, nonempty, normalize=True, config=cfg)
        torch.autograd.grad(r.sum(), (lq, lk, lv, sel))

    launches, declined = [], []
    for name, run in (("sparse", sparse), ("select", select), ("linear", linear)):
        try:
            launches += record(run)
        except NotImplementedError:
            declined.append(name)
    return launches, declined


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes per thread: spills and local arrays) from ``cuobjdump
    --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def compile_launch(fn, args: tuple, kw: dict, cc: int):
    """``triton.compile`` of one recorded launch for compute capability ``cc`` (the runtime's own argument
    specialisation: dtypes, 16-byte alignment, integers equal to 1 as constants)."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _key(fn, args: tuple, kw: dict) -> tuple:
    types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    return fn.__name__, types, tuple(sorted((k, str(v)) for k, v in kw.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sm90", "sm80", "sm89"], choices=list(TARGETS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ptx", default="", help="folder to write each compiled kernel's PTX into")
    p.add_argument("--out", default="", help="also write the Markdown table here")
    a = p.parse_args(argv)
    lines = ["| class | shape | kernel | warps | stages | registers | stack B | shared KiB | limit KiB | fits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print(f"triton {triton.__version__}, torch {torch.__version__}; N={N}, topk={TOPK}", flush=True)
    print("\n".join(lines), flush=True)
    ok = True
    for arch in a.arch:
        cc, limit = TARGETS[arch], SHARED_MEMORY[arch]
        seen: set = set()
        for shape in a.shapes:
            launches, declined = shape_launches(arch, shape)
            for family in declined:
                line = f"| {arch} | {shape} | {family} kernels | - | - | - | - | - | {limit // 1024} | declined |"
                lines.append(line)
                print(line, flush=True)
            for fn, args, kw in launches:
                key = _key(fn, args, kw)
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.perf_counter()
                try:
                    ck = compile_launch(fn, args, kw, cc)
                except Exception as e:  # noqa: BLE001 - reported as a row, the exit status says it failed
                    ok = False
                    line = f"| {arch} | {shape} | {fn.__name__} | - | - | - | - | - | {limit // 1024} | " \
                           f"no: {type(e).__name__}: {str(e)[:120]} |"
                else:
                    regs, spill = _resources(ck.asm["cubin"])
                    shared = ck.metadata.shared
                    fits = shared <= limit
                    ok &= fits
                    line = (f"| {arch} | {shape} | {fn.__name__} | {ck.metadata.num_warps} | "
                            f"{ck.metadata.num_stages} | {regs} | {spill} | {shared / 1024:.0f} | {limit // 1024} | "
                            f"{'yes' if fits else 'NO'} |")
                    if a.ptx:
                        os.makedirs(a.ptx, exist_ok=True)
                        name = f"{arch}-{shape}-{fn.__name__}-{len(seen)}.ptx"
                        with open(os.path.join(a.ptx, name), "w") as f:
                            f.write(ck.asm["ptx"])
                lines.append(line)
                print(line + f"  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, a.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
