"""Scaling check of ``train.py trainer=fsdp`` on 1, 2, 4 and 8 GPUs of one host (issue 15).

    python benchmarks/scaling.py --gpus 1 2 4 8 --model 355m --out benchmarks/out/scale355
    python benchmarks/scaling.py --gpus 1 2 --model 355m --out OUT --only noise pergpu   # a part of it
    python benchmarks/scaling.py --gpus 1 2 4 --cpu --out /tmp/scale                     # dry run, gloo, TINY
    python benchmarks/scaling.py --gpus 1 2 4 8 --plan                                   # print the commands

Arms (each a ``train.py trainer=fsdp`` run; names say GPUs, per-GPU micro-batch and accumulation):

* ``pergpu``: ``--batch`` sequences per GPU on each of ``--gpus`` (weak scaling; targets: tokens/s >= 3.6x the
  1-GPU run on 4 GPUs, >= 7.0x on 8);
* ``global``: ``--global-batch`` sequences per optimizer step on each GPU count (micro-batches of at most
  ``--micro`` per GPU, the rest by gradient accumulation); an arm identical to a ``pergpu`` one runs once;
* ``noise``: the 1-GPU ``global`` arm again (beside it when two GPUs are free): the run-to-run noise band of
  the loss. Every other ``global`` arm's loss must stay in that band (see ``losses_in_band`` below);
* ``resume``: the largest ``global`` arm writes a sharded checkpoint at step ``K = total - --resume-steps``;
  it is resumed on each smaller GPU count at the same global batch and must continue at step K exactly, with
  losses in the band (from step K's, whose weights and data are the same);
* ``hybrid``: the largest ``global`` arm with ``trainer.strategy.sharding=hybrid`` over ``--hybrid-groups``
  groups (each launched as a "node" of ``trainer.num_nodes``, on its own GPUs: the stand-in for several
  nodes); its clipped gradient norm (``train/grad_norm``, the norm clipping uses) and loss must equal full
  sharding's at the first ``--hybrid-check-steps`` steps within ``--gn-rtol``.

Each run trains ``--warmup`` + ``--steps`` steps; tokens/s is the median of the ``Throughput`` callback's
10-batch windows from step ``--warmup`` on. Runs write Lightning CSV logs (``logger=csv``) to
``OUT/runs/<arm>/csv/metrics.csv`` and their output to ``OUT/runs/<arm>.log``; each finished arm is recorded
in ``OUT/arms/<arm>.json`` and not run again by a later call with the same command (so the check can be split
over several calls: ``--only``); ``OUT/summary.md`` and ``OUT/summary.json`` cover every recorded arm, with
pass / fail / not run per target. ``--export DIR`` copies them (no checkpoints) to DIR, e.g. ``$OUT``.

``--cpu`` runs the same arms with gloo on CPU processes at the TINY sizes of ``tests/hydra_utils.py`` (one
arm at a time; of ``--model`` only its activation checkpointing), to exercise this script without a GPU.
Losses, resume and hybrid sharding are then exact to float32 rounding; tokens/s mean nothing there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _section5_summary() -> Any:
    """``benchmarks/fsdp_h200x2/summary.py`` (section 5's CSVLogger reader), loaded by path: no ``summary``
    module on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("fsdp_h200x2_summary", ROOT / "benchmarks/fsdp_h200x2/summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


read = _section5_summary().read  # Lightning CSVLogger metrics.csv -> {metric: {step: mean value}}

# The 355M SPLA model of BENCHMARKS.md section 5, and a ~1.5B one (1.50B parameters, 1.50B without the
# embeddings) at 32K context with activation checkpointing (model.activation_checkpointing).
MODELS: dict[str, list[str]] = {
    "355m": ["data.seq_len=16384", "model.d_model=1024", "model.n_layers=32", "model.n_heads=8",
             "model.n_kv_heads=2", "sparse.block_size=64", "sparse.topk=16"],
    "1.5b": ["data.seq_len=32768", "model.d_model=2048", "model.n_layers=34", "model.n_heads=16",
             "model.n_kv_heads=4", "sparse.block_size=64", "sparse.topk=16", "model.activation_checkpointing=true"],
}
SIZE_KEYS = ("data.seq_len=", "model.d_model=", "model.n_layers=", "model.n_heads=", "model.n_kv_heads=",
             "sparse.block_size=", "sparse.topk=")
# Per-GPU micro-batch that fits an H200 (141 GiB): 355M at 16K, batch 2: 78 GiB on one GPU (section 5).
DEFAULT_BATCH = {"355m": 2, "1.5b": 1}
# As benchmarks/fsdp_h200x2/*.sh: NVLink SHARP / multicast off (KINDS.md of the device machines).
GPU_ENV = {"PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
ROLES = ("pergpu", "global", "noise", "resume", "hybrid")
RESUME_WARNING = "samples per optimizer step, but the checkpoint was trained with"


@dataclass
class Arm:
    """One training run: ``gpus`` ranks (``nodes`` launchers of ``gpus // nodes`` each) x ``batch`` sequences x
    ``accumulate`` micro-batches per optimizer step, ``max_steps`` steps."""

    name: str
    roles: list[str]
    gpus: int
    batch: int
    accumulate: int
    max_steps: int
    nodes: int = 1
    overrides: list[str] = field(default_factory=list)
    after: str | None = None  # the arm whose checkpoint this one resumes
    group: str | None = None  # arms of one group may run at the same time (the noise pair)

    @property
    def global_batch(self) -> int:
        return self.gpus * self.batch * self.accumulate


def arm_name(gpus: int, batch: int, accumulate: int) -> str:
    return f"g{gpus}_b{batch}" + (f"x{accumulate}" if accumulate > 1 else "")


def split_global(global_batch: int, gpus: int, micro: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for ``global_batch`` sequences over ``gpus`` ranks, micro-batch <= ``micro``."""
    if global_batch % gpus:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of {gpus} GPUs")
    per_rank = global_batch // gpus
    batch = max(b for b in range(1, min(micro, per_rank) + 1) if per_rank % b == 0)
    return batch, per_rank // batch


def plan(args: argparse.Namespace) -> list[Arm]:
    """The arms of ``args`` in running order (duplicates merged: an arm may have several roles)."""
    gpus, top = sorted(args.gpus), max(args.gpus)
    total = args.warmup + args.steps
    arms: dict[str, Arm] = {}

    def add(arm: Arm) -> Arm:
        if arm.name in arms:
            arms[arm.name].roles += [r for r in arm.roles if r not in arms[arm.name].roles]
            return arms[arm.name]
        arms[arm.name] = arm
        return arm

    glob: dict[int, Arm] = {}
    for n in gpus:  # the 1-GPU reference first, so that its noise twin can run beside it
        batch, acc = split_global(args.global_batch, n, args.micro)
        glob[n] = add(Arm(arm_name(n, batch, acc), ["global"], n, batch, acc, total,
                          group="noise" if n == 1 else None))
        if n == 1:
            add(Arm(glob[1].name + "_twin", ["noise"], 1, batch, acc, total, group="noise"))
    for n in gpus:
        add(Arm(arm_name(n, args.batch, 1), ["pergpu"], n, args.batch, 1, total))
    source = glob[top]
    if len(gpus) > 1:  # the checkpoint the smaller counts resume (saved every K steps: once if 2K > total)
        source.overrides += [f"callbacks.model_checkpoint.every_n_train_steps={total - args.resume_steps}",
                             "callbacks.model_checkpoint.save_last=false"]
        k = total - args.resume_steps
        for n in reversed(gpus[:-1]):
            # Lightning restores the count of micro-batches and steps the optimizer at multiples of the new
            # accumulation: a resume is exact only from a step that is a cycle boundary of it
            if k * source.accumulate % glob[n].accumulate:
                raise ValueError(f"--resume-steps: step {k} ({k * source.accumulate} micro-batches per rank) is not "
                                 f"a multiple of the {glob[n].accumulate} micro-batches per step of {glob[n].name}; "
                                 "a resume there would not be exact (Lightning's accumulation cycle)")
            add(Arm(f"resume_{glob[n].name}", ["resume"], n, glob[n].batch, glob[n].accumulate, total,
                    after=source.name))
    if top % args.hybrid_groups == 0 and top > 1:
        add(Arm(f"hybrid{args.hybrid_groups}_{source.name}", ["hybrid"], top, source.batch, source.accumulate,
                args.hybrid_steps, nodes=args.hybrid_groups,
                overrides=["trainer.strategy.sharding=hybrid", f"module.total_steps={total}"]))
    return list(arms.values())


def selected(arm: Arm, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatch(arm.name, p) or p in arm.roles for p in patterns)


# --- commands -------------------------------------------------------------------------------------------

def parse_override(item: str) -> tuple[str, str | None]:
    """``key=value`` -> (key, value); ``~key`` -> (``~key``, None)."""
    if item.startswith("~"):
        return item, None
    key, _, value = item.partition("=")
    return key, value


def tiny_overrides() -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from hydra_utils import TINY

    return list(TINY)


def train_overrides(arm: Arm, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``train.py`` overrides of ``arm`` (later entries win: one value per key)."""
    runs = out / "runs"
    model = MODELS[args.model]
    if args.cpu:  # TINY sizes; the model's other knobs (activation checkpointing) still apply
        model = tiny_overrides() + [o for o in model if not o.startswith(SIZE_KEYS)]
    items = model + [
        "trainer=fsdp", f"trainer.devices={arm.gpus // arm.nodes}", f"trainer.num_nodes={arm.nodes}",
        f"data.batch_size={arm.batch}", f"trainer.accumulate_grad_batches={arm.accumulate}",
        f"trainer.max_steps={arm.max_steps}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.lr_warmup}",
        "trainer.limit_val_batches=0", f"trainer.val_check_interval={arm.max_steps}",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"data.num_workers={0 if args.cpu else 2}", "~callbacks.progress_bar",
        "logger=csv", f"paths.log_dir={runs}", f"hydra.run.dir={runs / arm.name}",
    ]
    if not is_source(arm):
        items.append("~callbacks.model_checkpoint")
    if args.cpu:
        items += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    items += list(args.set) + arm.overrides
    if arm.after is not None:
        items.append(f"ckpt_path={source_checkpoint(out, arm.after, args)}")
    merged: dict[str, str | None] = {}
    for item in items:
        key, value = parse_override(item)
        merged.pop(key, None)  # re-inserted at the end: a later override of a key replaces the earlier one
        merged[key] = value
    return [key if value is None else f"{key}={value}" for key, value in merged.items()]


def source_checkpoint(out: Path, source: str, args: argparse.Namespace) -> Path:
    return out / "runs" / source / "checkpoints" / f"step{args.warmup + args.steps - args.resume_steps:06d}.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(arm: Arm, devices: list[int], args: argparse.Namespace, out: Path) -> list[subprocess.Popen]:
    """Start ``arm`` on GPUs ``devices`` (``--cpu``: CPU processes): one ``train.py`` per node, each of which
    launches its other local ranks (Lightning); returns the node processes (each its own process group)."""
    overrides = train_overrides(arm, args, out)
    env = {**os.environ, **GPU_ENV,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    per_node = arm.gpus // arm.nodes
    procs = []
    for node in range(arm.nodes):
        node_env = dict(env, NODE_RANK=str(node))
        if not args.cpu:
            node_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices[node * per_node:(node + 1) * per_node]))
        extra = [] if node == 0 else [f"hydra.job.name=train_node{node}", "hydra.output_subdir=null"]
        log = out / "runs" / (f"{arm.name}.log" if node == 0 else f"{arm.name}.node{node}.log")
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "train.py", *overrides, *extra], cwd=ROOT, env=node_env,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def command_line(arm: Arm, args: argparse.Namespace, out: Path) -> str:
    """The arm as a shell command (for ``--plan`` and the records)."""
    env = " ".join(f"{k}={v}" for k, v in GPU_ENV.items() if not args.cpu)
    overrides = " ".join(train_overrides(arm, args, out))
    if arm.nodes == 1:
        return f"{env} python train.py {overrides}".strip()
    per_node = arm.gpus // arm.nodes
    nodes = []
    for i in range(arm.nodes):
        gpus = "" if args.cpu else "CUDA_VISIBLE_DEVICES=" + ",".join(map(str, range(i * per_node, (i + 1) * per_node)))
        extra = "" if i == 0 else f" hydra.job.name=train_node{i} hydra.output_subdir=null"
        nodes.append(f"NODE_RANK={i} {gpus} python train.py {overrides}{extra}".replace("  ", " "))
    return f"{env} MASTER_ADDR=127.0.0.1 MASTER_PORT=<free> " + " & ".join(nodes) + "; wait"


# --- running ---------------------------------------------------------------------------------------------

def record_path(out: Path, arm: Arm) -> Path:
    return out / "arms" / f"{arm.name}.json"


def done(out: Path, arm: Arm, args: argparse.Namespace) -> bool:
    """Whether ``arm`` already ran to the end with this very command (a record of an earlier call)."""
    path = record_path(out, arm)
    if not path.exists():
        return False
    rec = json.loads(path.read_text())
    return rec.get("rc") == 0 and rec.get("overrides") == train_overrides(arm, args, out)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temp name, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(no_nan(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


def no_nan(data: Any) -> Any:
    """``data`` with NaN floats as None (strict JSON)."""
    if isinstance(data, float):
        return None if math.isnan(data) else data
    if isinstance(data, dict):
        return {k: no_nan(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [no_nan(v) for v in data]
    return data


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each node's process group (the graceful stop writes its checkpoint), SIGKILL after 60 s."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_all(arms: list[Arm], args: argparse.Namespace, out: Path, capacity: int) -> None:
    """Run ``arms`` in order: one at a time, except the noise pair side by side (``--pack``: any arms that fit
    the free GPUs); an arm waits for the one whose checkpoint it resumes. ``--cpu``: strictly one at a time."""
    pending = list(arms)
    running: dict[str, tuple[Arm, list[subprocess.Popen], list[int], float]] = {}
    free = list(range(capacity))
    failed: set[str] = set()

    def may_start(arm: Arm) -> bool:
        if arm.after is not None and (arm.after in running or arm.after in failed
                                      or any(a.name == arm.after for a in pending)):
            return False
        if arm.gpus > len(free):
            return False
        if not running or args.pack and not args.cpu:
            return True
        return not args.cpu and arm.group is not None and all(a.group == arm.group for a, *_ in running.values())

    try:
        _schedule(pending, running, free, failed, may_start, args, out, capacity)
    finally:  # interrupted (Ctrl-C, SIGTERM): stop the arms still running, record them as such
        for arm, procs, _, t0 in running.values():
            stop(procs)
            finish(arm, 130, out, args, time.monotonic() - t0, note="interrupted")


def _schedule(pending: list[Arm], running: dict, free: list[int], failed: set[str], may_start: Any,
              args: argparse.Namespace, out: Path, capacity: int) -> None:
    while pending or running:
        started = True
        while started:
            started = False
            for arm in list(pending):
                if arm.after in failed:
                    pending.remove(arm)
                    failed.add(arm.name)
                    finish(arm, None, out, args, 0.0, note=f"not run: {arm.after} failed")
                    continue
                if may_start(arm):
                    devices, free[:] = free[:arm.gpus], free[arm.gpus:]
                    shutil.rmtree(out / "runs" / arm.name, ignore_errors=True)
                    print(f"[{now()}] start {arm.name} ({arm.gpus} GPU{'s' * (arm.gpus > 1)}"
                          f"{'' if args.cpu else ' ' + str(devices)}): {' '.join(arm.roles)}", flush=True)
                    running[arm.name] = (arm, launch(arm, devices, args, out), devices, time.monotonic())
                    pending.remove(arm)
                    started = True
                    break
            if not running and pending and not started:
                raise RuntimeError(f"cannot start {[a.name for a in pending]}: not enough GPUs ({capacity})")
        time.sleep(0.5 if args.cpu else 2.0)
        for name, (arm, procs, devices, t0) in list(running.items()):
            codes = [p.poll() for p in procs]
            timed_out = args.arm_timeout is not None and time.monotonic() - t0 > args.arm_timeout and None in codes
            node_failed = next((c for c in codes if c not in (None, 0)), None)
            if timed_out or node_failed is not None or None not in codes:
                if None in codes:  # timed out, or one node failed: the others would wait for it forever
                    stop(procs)
                rc = 124 if timed_out else node_failed or 0
                del running[name]
                free += devices
                if rc:
                    failed.add(name)
                finish(arm, rc, out, args, time.monotonic() - t0)


def finish(arm: Arm, rc: int | None, out: Path, args: argparse.Namespace, wall: float, note: str = "") -> None:
    """Record a finished arm; drop its checkpoints unless kept (``--keep-checkpoints``, or the resume source)."""
    rec = {**asdict(arm), "rc": rc, "wall_s": round(wall, 1), "note": note, "finished": now(),
           "overrides": train_overrides(arm, args, out), "command": command_line(arm, args, out)}
    write_json(record_path(out, arm), rec)
    print(f"[{now()}] {arm.name}: rc={rc} {wall:.0f} s {note}", flush=True)
    ckpts = out / "runs" / arm.name / "checkpoints"
    if rc == 0 and not args.keep_checkpoints and ckpts.is_dir():
        keep = source_checkpoint(out, arm.name, args) if is_source(arm) else None
        for p in ckpts.iterdir():
            if p != keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def is_source(arm: Arm) -> bool:
    """Whether ``arm`` writes the checkpoint the resume arms start from."""
    return any(o.startswith("callbacks.model_checkpoint.every_n_train_steps=") for o in arm.overrides)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")


# --- analysis --------------------------------------------------------------------------------------------

def steady(values: dict[int, float], first: int) -> float:
    vals = [v for s, v in values.items() if s >= first]
    return statistics.median(vals) if vals else math.nan


def arm_result(arm: Arm, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The record of ``arm`` with what its CSV log and output say (empty metrics if it never ran)."""
    path = record_path(out, arm)
    rec: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {**asdict(arm), "rc": None}
    csv = out / "runs" / arm.name / "csv" / "metrics.csv"
    m = read(csv) if csv.exists() else {}
    loss = m.get("train/loss", {})
    log = out / "runs" / f"{arm.name}.log"
    rec.update({
        "loss": {str(k): v for k, v in sorted(loss.items())},
        "grad_norm": {str(k): v for k, v in sorted(m.get("train/grad_norm", {}).items())},
        "tokens_per_s": steady(m.get("train/tokens_per_s", {}), args.warmup),
        "tokens_per_s_per_device": steady(m.get("train/tokens_per_s_per_device", {}), args.warmup),
        "mfu": steady(m.get("train/mfu", {}), args.warmup),
        "peak_memory_gib": max(m.get("train/peak_memory_gib", {0: math.nan}).values()),
        "first_step": min(loss) if loss else None, "last_step": max(loss) if loss else None,
        "changed_batch_warning": log.exists() and RESUME_WARNING in log.read_text(errors="replace"),
    })
    return rec


def series(rec: dict[str, Any], key: str = "loss") -> dict[int, float]:
    return {int(k): v for k, v in rec.get(key, {}).items()}


def band(ref: dict[int, float], twin: dict[int, float], lo: int, hi: int, floor: float) -> float:
    """The run-to-run noise band over steps [lo, hi): max |twin - ref| (at least ``floor``)."""
    diffs = [abs(twin[s] - ref[s]) for s in range(lo, hi) if s in ref and s in twin]
    return max([floor, *diffs])


def windows(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    return [(a, min(a + width, hi)) for a in range(lo, hi, width)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else "PASS" if ok else "FAIL"


def analyse(arms: list[Arm], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every target's numbers and verdict (``None``: not run) from the recorded arms."""
    res = {a.name: arm_result(a, out, args) for a in arms}
    ok_runs = {n: r for n, r in res.items() if r.get("rc") == 0}
    by_role: dict[str, dict[int, str]] = {role: {} for role in ROLES}
    for a in arms:
        for role in a.roles:
            by_role[role][a.gpus] = a.name
    total = args.warmup + args.steps
    targets: dict[str, Any] = {}

    # tokens/s scaling
    for kind in ("pergpu", "global"):
        base = ok_runs.get(by_role[kind].get(1, ""), {}).get("tokens_per_s", math.nan)
        rows = []
        for n, name in sorted(by_role[kind].items()):
            tps = ok_runs.get(name, {}).get("tokens_per_s", math.nan)
            rows.append({"gpus": n, "arm": name, "tokens_per_s": tps, "speedup": tps / base,
                         "efficiency": tps / base / n})
        targets[f"scaling_{kind}"] = rows
    for n, need in ((4, 3.6), (8, 7.0)):
        row = next((r for r in targets["scaling_pergpu"] if r["gpus"] == n), None)
        value = None if row is None or math.isnan(row["speedup"]) else row["speedup"]
        targets[f"speedup_{n}gpu"] = {"need": need, "value": value,
                                      "pass": None if value is None else value >= need}

    # losses of the same-global-batch arms against the 1-GPU reference, in the noise band of its twin
    ref = series(ok_runs.get(by_role["global"].get(1, ""), {}))
    twin = series(ok_runs.get(by_role["noise"].get(1, ""), {}))
    lo = args.band_from if args.band_from is not None else args.warmup + args.steps // 2
    loss_rows, loss_ok = [], None
    for n, name in sorted(by_role["global"].items()):
        if n == 1 or not ref or not twin or res[name].get("rc") is None:
            continue  # not run (yet): no verdict from it
        run = series(ok_runs.get(name, {}))
        loss_ok = loss_ok is not False and bool(run)
        for a, b in windows(lo, total, args.window) if run else []:
            noise = band(ref, twin, a, b, args.band_floor) * args.band_slack
            diffs = [abs(run[s] - ref[s]) for s in range(a, b) if s in run and s in ref]
            ok = bool(diffs) and max(diffs) <= noise
            loss_ok = loss_ok and ok
            loss_rows.append({"arm": name, "steps": [a, b - 1], "max_diff": max(diffs, default=math.nan),
                              "mean_diff": statistics.mean(diffs) if diffs else math.nan, "band": noise,
                              "pass": ok})
    noise_rows = [{"steps": [a, b - 1], "band": band(ref, twin, a, b, 0.0)}
                  for a, b in windows(args.warmup, total, args.window)] if ref and twin else []
    targets["losses_in_band"] = {"from_step": lo, "rows": loss_rows, "noise": noise_rows, "pass": loss_ok}

    # resume of the largest arm's checkpoint at step K on every smaller count
    k = total - args.resume_steps
    source = series(ok_runs.get(by_role["global"].get(max(args.gpus), ""), {}))
    noise = band(ref, twin, k, total, args.band_floor) * args.band_slack if ref and twin else args.band_floor
    resume_rows, resume_ok = [], None
    for n, name in sorted(by_role["resume"].items(), reverse=True):
        r = res[name]
        if r.get("rc") is None:
            continue
        run = series(r) if r["rc"] == 0 else {}
        diffs = [abs(run[s] - source[s]) for s in range(k, total) if s in run and s in source]
        ok = (r["rc"] == 0 and r["first_step"] == k and r["last_step"] == total - 1
              and not r["changed_batch_warning"] and len(diffs) == total - k and max(diffs) <= noise)
        resume_ok = ok if resume_ok is None else resume_ok and ok
        resume_rows.append({"arm": name, "gpus": n, "rc": r["rc"], "first_step": r["first_step"],
                            "last_step": r["last_step"], "step_k_diff": diffs[0] if diffs else math.nan,
                            "max_diff": max(diffs, default=math.nan), "band": noise,
                            "changed_batch_warning": r["changed_batch_warning"], "pass": ok})
    targets["resume"] = {"step": k, "rows": resume_rows, "pass": resume_ok}

    # hybrid sharding: clipped gradient norm and loss equal to full sharding's
    hyb_name = by_role["hybrid"].get(max(args.gpus))
    hybrid_rows, hybrid_ok = [], None
    if hyb_name is not None and res[hyb_name].get("rc") is not None:
        full, hyb = ok_runs.get(by_role["global"].get(max(args.gpus), ""), {}), res[hyb_name]
        hybrid_ok = hyb["rc"] == 0 and bool(full)
        for s in range(args.hybrid_steps):
            row: dict[str, Any] = {"step": s, "checked": s < args.hybrid_check_steps}
            for key in ("grad_norm", "loss"):
                x, y = series(hyb, key).get(s, math.nan), series(full, key).get(s, math.nan)
                row.update({f"{key}_hybrid": x, f"{key}_full": y, f"{key}_rel": rel(x, y)})
            if row["checked"]:  # a NaN (missing step) fails too
                hybrid_ok = hybrid_ok and row["grad_norm_rel"] <= args.gn_rtol and row["loss_rel"] <= args.gn_rtol
            hybrid_rows.append(row)
    ref_gn = series(ok_runs.get(by_role["global"].get(1, ""), {}), "grad_norm")
    twin_gn = series(ok_runs.get(by_role["noise"].get(1, ""), {}), "grad_norm")
    targets["hybrid"] = {"arm": hyb_name, "rtol": args.gn_rtol, "rows": hybrid_rows, "pass": hybrid_ok,
                         "noise_pair_grad_norm_rel": [rel(twin_gn[s], ref_gn[s]) for s in range(args.hybrid_check_steps)
                                                      if s in ref_gn and s in twin_gn]}
    return {"arms": res, "targets": targets}


def fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if math.isnan(x) else format(x, spec)
    return str(x)


def markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the setup, the verdicts, then one table per check."""
    t, env = summary["targets"], summary["env"]
    lines = [f"# Scaling check ({env['model']}, {'CPU dry run' if env['cpu'] else 'GPU'})", "",
             f"Date: {env['date']}; device: {env['device']}; torch {env['torch']}, lightning {env['lightning']}.",
             f"Command: `{env['command']}`", "", "## Targets", "", "| target | value | verdict |",
             "| --- | --- | --- |"]
    for n in (4, 8):
        s = t[f"speedup_{n}gpu"]
        value = "-" if s["value"] is None else f"{s['value']:.2f}x"
        lines.append(f"| tokens/s on {n} GPUs >= {s['need']}x 1 GPU (same per-GPU batch) | {value} "
                     f"| {verdict(s['pass'])} |")
    lb = t["losses_in_band"]
    worst = max((r["max_diff"] / r["band"] for r in lb["rows"]), default=None)
    lines.append(f"| same-global-batch losses in the 1-GPU noise band from step {lb['from_step']} "
                 f"| worst max/band {fmt(worst, '.2f')} | {verdict(lb['pass'])} |")
    rs = t["resume"]
    lines.append(f"| sharded checkpoint of step {rs['step']} resumes on "
                 f"{', '.join(str(r['gpus']) for r in rs['rows']) or '-'} GPUs at the exact step "
                 f"| {', '.join(str(r['first_step']) for r in rs['rows']) or '-'} | {verdict(rs['pass'])} |")
    hy = t["hybrid"]
    worst_gn = max((r["grad_norm_rel"] for r in hy["rows"] if r["checked"]), default=None)
    lines.append(f"| hybrid sharding's clipped grad norm = full's (rtol {hy['rtol']:g}) | max rel "
                 f"{fmt(worst_gn, '.2e')} | {verdict(hy['pass'])} |")
    lines += ["", "## Arms", "", "| arm | roles | GPUs | batch x accumulation | global batch | steps | rc | wall s "
              "| tokens/s | per device | MFU | peak GiB | mean loss, last 20 |", "| --- |" + " --- |" * 12]
    for name, r in summary["arms"].items():
        loss = series(r)
        last = [loss[s] for s in sorted(loss)[-20:]]
        lines.append(f"| {name} | {' '.join(r['roles'])} | {r['gpus']} | {r['batch']} x {r['accumulate']} "
                     f"| {r['gpus'] * r['batch'] * r['accumulate']} | {r['max_steps']} | {fmt(r.get('rc'))} "
                     f"| {fmt(r.get('wall_s'))} | {fmt(r['tokens_per_s'], ',.0f')} "
                     f"| {fmt(r['tokens_per_s_per_device'], ',.0f')} | {fmt(r['mfu'], '.3f')} "
                     f"| {fmt(r['peak_memory_gib'], '.1f')} | {fmt(statistics.mean(last) if last else None, '.4f')} |")
    for kind, title in (("pergpu", "same per-GPU batch"), ("global", "same global batch")):
        lines += ["", f"## Tokens/s, {title}", "", "| GPUs | arm | tokens/s | vs 1 GPU | efficiency |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['gpus']} | {r['arm']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['speedup'], '.2f')}x "
                  f"| {fmt(r['efficiency'], '.2f')} |" for r in t[f"scaling_{kind}"]]
    lines += ["", f"## Losses against the 1-GPU reference (band: max |twin - reference| per window, floor "
              f"{summary['args']['band_floor']:g})", "", "| arm | steps | max diff | mean diff | band | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arm']} | {r['steps'][0]}-{r['steps'][1]} | {fmt(r['max_diff'])} | {fmt(r['mean_diff'])} "
              f"| {fmt(r['band'])} | {verdict(r['pass'])} |" for r in lb["rows"]]
    if lb["noise"]:
        lines += ["", "Noise band from the warmup on: " + ", ".join(
            f"{r['steps'][0]}-{r['steps'][1]}: {fmt(r['band'])}" for r in lb["noise"])]
    lines += ["", f"## Resume of step {rs['step']}", "", "| arm | GPUs | rc | first step | last step "
              "| diff at step K | max diff | band | batch warning | verdict |", "| --- |" + " --- |" * 9]
    lines += [f"| {r['arm']} | {r['gpus']} | {fmt(r['rc'])} | {fmt(r['first_step'])} | {fmt(r['last_step'])} "
              f"| {fmt(r['step_k_diff'])} | {fmt(r['max_diff'])} | {fmt(r['band'])} | {r['changed_batch_warning']} "
              f"| {verdict(r['pass'])} |" for r in rs["rows"]]
    lines += ["", f"## Hybrid ({hy['arm']}) against full sharding", "",
              "| step | grad norm hybrid | full | rel | loss hybrid | full | rel | checked |",
              "| --- |" + " --- |" * 7]
    lines += [f"| {r['step']} | {fmt(r['grad_norm_hybrid'], '.6g')} | {fmt(r['grad_norm_full'], '.6g')} "
              f"| {fmt(r['grad_norm_rel'], '.2e')} | {fmt(r['loss_hybrid'], '.6g')} | {fmt(r['loss_full'], '.6g')} "
              f"| {fmt(r['loss_rel'], '.2e')} | {r['checked']} |" for r in hy["rows"]]
    if hy.get("noise_pair_grad_norm_rel"):
        lines += ["", "Run-to-run grad norm rel. difference of the 1-GPU noise pair at the checked steps: "
                  + ", ".join(fmt(x, ".2e") for x in hy["noise_pair_grad_norm_rel"])]
    return "\n".join(lines) + "\n"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Date, device, versions and command of this call (``--cpu``: torch is not imported, which takes seconds)."""
    from importlib.metadata import version

    device = f"CPU ({os.cpu_count()} cores)"
    if not args.cpu:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if names:
            device = f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": device,
            "torch": version("torch"), "lightning": version("lightning"), "model": args.model, "cpu": args.cpu,
            "command": " ".join(["python", *sys.argv]), "nccl_env": {} if args.cpu else GPU_ENV}


def export(out: Path, dest: Path) -> None:
    """Copy the summary, the arm records, logs and metrics (not checkpoints) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in [out / "summary.md", out / "summary.json", *out.glob("arms/*.json"), *out.glob("runs/*.log"),
              *out.glob("runs/*/csv/metrics.csv")]:
        if p.exists():
            target = dest / p.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


# --- command line ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts (processes with --cpu)")
    p.add_argument("--model", choices=sorted(MODELS), default="355m")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "scaling")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes at TINY sizes (a dry run)")
    p.add_argument("--steps", type=int, default=None, help="measured steps past --warmup (200; --cpu: 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the measurement (20; --cpu: 2)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch of the pergpu arms (355m: 2, 1.5b: 1)")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step of the global arms "
                   "(default: the largest --gpus)")
    p.add_argument("--micro", type=int, default=None, help="largest micro-batch per GPU (default: --batch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=None, help="optim.warmup_steps (40; --cpu: 2)")
    p.add_argument("--resume-steps", type=int, default=None, help="steps after the resumed checkpoint (20; --cpu: 2)")
    p.add_argument("--hybrid-groups", type=int, default=2)
    p.add_argument("--hybrid-steps", type=int, default=None, help="steps of the hybrid arm (10; --cpu: 2)")
    p.add_argument("--hybrid-check-steps", type=int, default=2, help="first steps whose grad norm must match")
    p.add_argument("--gn-rtol", type=float, default=None, help="grad norm / loss tolerance, hybrid vs full "
                   "(1e-3; --cpu: 1e-5)")
    p.add_argument("--window", type=int, default=None, help="steps per loss window (50; --cpu: 2)")
    p.add_argument("--band-from", type=int, default=None, help="first step of the loss-band check (default: "
                   "--warmup + --steps // 2: section 5's first ~100 steps are chaotic for every run)")
    p.add_argument("--band-floor", type=float, default=1e-3, help="smallest loss band (abs)")
    p.add_argument("--band-slack", type=float, default=1.0, help="allowed multiple of the noise band")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more train.py overrides for every arm (e.g. trainer.compile=true)")
    p.add_argument("--only", nargs="+", help="arms to run: names (globs) or roles (pergpu global noise resume hybrid)")
    p.add_argument("--pack", action="store_true", help="run arms side by side on free GPUs (faster; shares the host)")
    p.add_argument("--rerun", action="store_true", help="run arms again even if recorded")
    p.add_argument("--arm-timeout", type=float, default=None, help="seconds per arm (then SIGTERM: rc 124)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every arm's checkpoints")
    p.add_argument("--plan", action="store_true", help="print the arms' commands and exit")
    p.add_argument("--export", type=Path, help="copy the summary, records, logs and metrics here")
    args = p.parse_args(argv)
    cpu = args.cpu
    for key, gpu, tiny in (("steps", 200, 4), ("warmup", 20, 2), ("lr_warmup", 40, 2), ("resume_steps", 20, 2),
                           ("hybrid_steps", 10, 2), ("gn_rtol", 1e-3, 1e-5), ("window", 50, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if cpu else gpu)
    if args.batch is None:
        args.batch = 1 if cpu else DEFAULT_BATCH[args.model]
    args.micro = args.micro or args.batch
    args.global_batch = args.global_batch or max(args.gpus)
    checks = [("--gpus", all(n >= 1 for n in args.gpus) and len(set(args.gpus)) == len(args.gpus),
               "distinct counts >= 1"),
              ("--steps", args.steps >= 1, ">= 1"), ("--warmup", args.warmup >= 0, ">= 0"),
              ("--batch", args.batch >= 1, ">= 1"), ("--micro", args.micro >= 1, ">= 1"),
              ("--hybrid-groups", args.hybrid_groups >= 2, ">= 2"),
              ("--hybrid-check-steps", 1 <= args.hybrid_check_steps <= args.hybrid_steps, "in [1, --hybrid-steps]"),
              ("--resume-steps", 1 <= args.resume_steps < args.warmup + args.steps, "in [1, warmup + steps)"),
              ("--window", args.window >= 1, ">= 1")]
    for flag, ok, what in checks:
        if not ok:
            p.error(f"{flag}: must be {what}")
    try:
        plan(args)  # the global batch splits over every GPU count; resume steps on accumulation cycles
    except ValueError as e:
        p.error(str(e))
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    arms = plan(args)
    if args.plan:
        for arm in arms:
            print(f"# {arm.name} ({', '.join(arm.roles)}): {arm.gpus} GPUs x {arm.batch} x {arm.accumulate}\n"
                  f"{command_line(arm, args, out)}\n")
        return 0
    capacity = max(args.gpus)
    if not args.cpu:
        import torch

        capacity = torch.cuda.device_count()
        if max(args.gpus) > capacity:
            raise SystemExit(f"--gpus {max(args.gpus)}: this machine has {capacity} GPUs (--cpu for a dry run)")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    todo = [a for a in arms if selected(a, args.only) and (args.rerun or not done(out, a, args))]
    missing = {a.after for a in todo if a.after is not None} - {a.name for a in todo}
    for name in missing:
        if not source_checkpoint(out, name, args).exists():
            raise SystemExit(f"--only: the resume arms need {name}'s checkpoint "
                             f"{source_checkpoint(out, name, args)}: run {name} too")
    print(f"[{now()}] {len(todo)} of {len(arms)} arms to run: {' '.join(a.name for a in todo)}", flush=True)
    try:
        run_all(todo, args, out, capacity)
    finally:
        summary = {"env": environment(args), "args": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()}}
        summary.update(analyse(arms, args, out))
        write_json(out / "summary.json", summary)
        write_text(out / "summary.md", markdown(summary))
        if args.export is not None:
            export(out, args.export)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
