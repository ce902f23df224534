"""Shared by the study launchers: run many ``train.py`` / ``eval.py`` processes at once on one machine.

Each job is one process in its own session (so a deadline can kill it with its data-loader workers), pinned to
one GPU by ``CUDA_VISIBLE_DEVICES`` (one of the launcher's GPUs: ``--gpus``, else the incoming
``CUDA_VISIBLE_DEVICES``, else all; :func:`visible_gpus`) and capped to a few CPU threads. A phase has a
deadline: jobs still running then are terminated (SIGTERM, then SIGKILL after a grace period) and reported,
never waited for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # spla_lit from this checkout, as the jobs (which run in ROOT) see it

# Sizes of the CPU dry run (--tiny): every path of the GPU run at toy scale, in seconds per job on a laptop.
TINY_TRAIN = ["data.seq_len=128", "data.batch_size=2", "data.val_samples=8", "data.num_workers=0",
              "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
              "sparse.block_size=16", "sparse.topk=3", "optim.warmup_steps=1", "callbacks.fidelity.max_tokens=256"]
TINY_HEAD_DIM = 16
CPU_TRAIN = ["trainer.accelerator=cpu", "trainer.precision=32-true"]


def width_overrides(width: int, head_dim: int) -> list[str]:
    """Model overrides for ``d_model = width`` with heads of ``head_dim`` (``width // head_dim`` query heads,
    half as many KV heads when that count is even)."""
    if width % head_dim:
        raise SystemExit(f"--widths: {width} is not a multiple of the head dim {head_dim}")
    heads = width // head_dim
    kv = heads // 2 if heads % 2 == 0 else heads
    return [f"model.d_model={width}", f"model.n_heads={heads}", f"model.n_kv_heads={kv}", f"model.head_dim={head_dim}"]


def max_time(seconds: float) -> str:
    """Lightning's ``trainer.max_time`` string (DD:HH:MM:SS) for ``seconds`` (at least 1 s)."""
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Log:
    """Timestamped lines to stdout and to a log file (line-buffered, so a killed run keeps what it wrote)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (kept open for the whole launch)

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Job:
    """One process: ``argv`` run in the repository root with ``env`` added, output to ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None  # its CUDA_VISIBLE_DEVICES entry


@dataclass
class Outcome:
    """How a job ended: ``rc`` None when it never started; ``timed_out`` when the deadline killed it."""

    name: str
    rc: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def thread_env(threads: int) -> dict[str, str]:
    """Environment capping the CPU threads of a job (PyTorch intra-op, OpenMP, BLAS)."""
    n = str(max(1, threads))
    return {k: n for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def add_device_args(parser: Any, gpus_help: str = "the runs are spread over") -> None:
    """``--device`` (cuda | cpu), ``--gpus`` (CUDA_VISIBLE_DEVICES ids, :func:`visible_gpus`) and ``--impl`` (the
    attention ops, :func:`default_impl`) on an argparse parser or argument group."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--gpus", default=None,
                        help=f"CUDA_VISIBLE_DEVICES ids {gpus_help}, e.g. 0,1 (default: the incoming "
                             "CUDA_VISIBLE_DEVICES, else all)")
    parser.add_argument("--impl", default=None, help="attention ops (default: auto on cuda, reference on cpu)")


def visible_gpus(device: str, gpus: str | None = None, environ: Mapping[str, str] | None = None,
                 device_count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs the jobs may use, as ``CUDA_VISIBLE_DEVICES`` entries of the launcher's environment ([] for ``cpu``).

    ``gpus`` (``--gpus``, e.g. ``"0,1"``) wins; otherwise an incoming ``CUDA_VISIBLE_DEVICES`` (the caller's
    choice, e.g. ``CUDA_VISIBLE_DEVICES=1 python calibrate.py ...`` beside a benchmark on GPU 0) is kept as it is;
    otherwise every device torch sees (``0 .. n-1``). With both, ``gpus`` must be a subset of the incoming list (a
    job can only narrow the caller's choice). ``environ`` and ``device_count`` default to ``os.environ`` and
    ``torch.cuda.device_count`` (tests pass fakes)."""
    environ = os.environ if environ is None else environ
    incoming = environ.get("CUDA_VISIBLE_DEVICES")
    given = None if incoming is None else [d.strip() for d in incoming.split(",") if d.strip()]
    if device == "cpu":
        if gpus:
            raise SystemExit("--gpus: given with --device cpu (GPUs are only used with --device cuda)")
        return []
    if given == []:
        raise SystemExit(f"--device cuda: CUDA_VISIBLE_DEVICES={incoming!r} hides every GPU")
    if gpus is not None:
        ids = [d.strip() for d in gpus.split(",") if d.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise SystemExit(f"--gpus: expected distinct comma-separated device ids such as 0,1, got {gpus!r}")
        outside = [d for d in ids if given is not None and d not in given]
        if outside:
            raise SystemExit(f"--gpus: {','.join(outside)} not in the incoming CUDA_VISIBLE_DEVICES={incoming}")
    else:
        ids = given
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    n = device_count()
    if n < 1:
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for a dry run)")
    if ids is None:
        return [str(i) for i in range(n)]
    if given is None and any(d.isdigit() and int(d) >= n for d in ids):
        raise SystemExit(f"--gpus: {gpus} names a device beyond the {n} visible ones")
    return ids


def assign_gpus(jobs: Sequence[Job], gpus: Sequence[str]) -> None:
    """Round-robin ``jobs`` over the device ids ``gpus`` (:func:`visible_gpus`) in list order, in place: each job
    gets ``CUDA_VISIBLE_DEVICES=<its id>``; nothing for the CPU (``gpus`` empty)."""
    for i, job in enumerate(jobs):
        if gpus:
            job.gpu = str(gpus[i % len(gpus)])
            job.env["CUDA_VISIBLE_DEVICES"] = job.gpu


def command_line(job: Job) -> str:
    """The job as one shell line (for commands.sh and the log)."""
    import shlex

    env = " ".join(f"{k}={v}" for k, v in sorted(job.env.items()) if k == "CUDA_VISIBLE_DEVICES")
    return (env + " " if env else "") + " ".join(shlex.quote(a) for a in job.argv)


def _kill(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the job's process group, SIGKILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_jobs(jobs: Sequence[Job], deadline_s: float, log: Callable[[str], None], *, max_parallel: int | None = None,
             grace_s: float = 10.0, poll_s: float = 0.5) -> dict[str, Outcome]:
    """Run ``jobs`` (at most ``max_parallel`` at once; None: all) until they end or ``deadline_s`` seconds pass.

    Never raises for a failing job: its exit code is in its :class:`Outcome` and its log's tail is logged.
    """
    t0 = time.monotonic()
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    outcomes = {j.name: Outcome(j.name) for j in jobs}
    limit = max_parallel or len(jobs) or 1
    while pending or running:
        now = time.monotonic()
        if now - t0 > deadline_s:
            break
        while pending and len(running) < limit:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as out:
                proc = subprocess.Popen(job.argv, cwd=ROOT, env={**os.environ, **job.env}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            running[job.name] = (job, proc, time.monotonic())
        for name, (job, proc, start) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            outcomes[name] = Outcome(name, rc, time.monotonic() - start)
            if rc:
                log(f"FAILED {name} (exit {rc}, {outcomes[name].wall_s:.0f}s); log tail:\n{tail(job.log, 25)}")
            else:
                log(f"done {name} ({outcomes[name].wall_s:.0f}s)")
        time.sleep(poll_s)
    for name, (job, proc, start) in running.items():
        log(f"DEADLINE: stopping {name} after {time.monotonic() - start:.0f}s; log tail:\n{tail(job.log, 10)}")
        _kill(proc, grace_s)
        outcomes[name] = Outcome(name, proc.returncode, time.monotonic() - start, timed_out=True)
    for job in pending:
        log(f"DEADLINE: {job.name} never started")
    return outcomes


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def pack(members: Sequence[tuple[Path, str]], archive: Path) -> Path:
    """Write ``(file, name in archive)`` pairs to a .tar.gz, atomically (missing files are skipped)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path, name in members:
            if path.is_file():
                tar.add(path, arcname=name)
    os.replace(tmp, archive)
    return archive


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Cut ``path`` into ``<path>.00``, ``<path>.01``, ... of at most ``part_bytes`` bytes each (a transfer's per-file
    limit; ``cat <path>.* > <path>`` joins them) and remove it; a file that fits stays whole: ``[path]``."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes: must be >= 1, got {part_bytes}")
    if path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            part = path.with_name(f"{path.name}.{len(parts):02d}")
            tmp = part.with_name(f".{part.name}.tmp")
            tmp.write_bytes(chunk)
            os.replace(tmp, part)
            parts.append(part)
    path.unlink()
    return parts


def clip_log(path: Path, max_lines: int = 400) -> Path:
    """A copy of a job log clipped to its first and last lines (what goes into the archive)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    if len(lines) > max_lines:
        half = max_lines // 2
        lines = lines[:half] + [f"... ({len(lines) - max_lines} lines left out) ..."] + lines[-half:]
    out = path.with_name(path.name + ".clip")
    out.write_text("\n".join(lines) + "\n")
    return out


# ------------------------------------------------------------------------------------------ the study's phases


def train_length(tiny: bool, overrides: Sequence[str]) -> int:
    """Training length of the runs: study_a's ``data.seq_len``, or the --tiny / --set override."""
    from omegaconf import OmegaConf

    length = OmegaConf.load(ROOT / "conf" / "experiment" / "study_a.yaml").data.seq_len
    for o in (TINY_TRAIN if tiny else []) + list(overrides):
        if o.startswith("data.seq_len="):
            length = int(o.split("=", 1)[1])
    return int(length)


def default_impl(impl: str | None, device: str) -> str:
    """Attention ops: ``auto`` (Triton) on CUDA, the PyTorch reference on the CPU, unless given."""
    return impl or ("auto" if device == "cuda" else "reference")


def eval_job(job: Job, device: str, impl: str, overrides: Sequence[str], name: str = "eval",
             ckpt: Path | None = None) -> Job:
    """``eval.py`` on a training job's checkpoint (``ckpt``, default its last), on the same GPU with the same thread
    caps; results in ``<run>/<name>/``, output in ``<run>/<name>.out``. The job is named as the training job, plus
    ``.<name>`` for another ``name`` than ``eval`` (a second evaluation of the same run)."""
    run = job.log.parent
    ckpt = ckpt or run / "checkpoints" / "last.ckpt"
    argv = [sys.executable, "eval.py", f"ckpt_path={ckpt}", f"output_dir={run / name}",
            f"hydra.run.dir={run / name}", f"device={device}", f"impl={impl}", *overrides]
    return Job(job.name if name == "eval" else f"{job.name}.{name}", argv, run / f"{name}.out", dict(job.env), job.gpu)


def start(args: Any, name: str) -> tuple[Log, Path, list[str], str]:
    """A launcher's start: ``args.out`` created with its ``launcher.log``, the runs' folder
    ``<args.workdir>/<name>_<date>_<time>``, the GPUs (:func:`visible_gpus`) and the attention ops
    (:func:`default_impl`) of ``args.device`` / ``args.gpus`` / ``args.impl``."""
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "launcher.log")
    run_root = (args.workdir / f"{name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    return log, run_root, visible_gpus(args.device, args.gpus), default_impl(args.impl, args.device)


def has_checkpoint(job: Job) -> bool:
    return (job.log.parent / "checkpoints" / "last.ckpt").is_file()


def log_setup(log: Callable[[str], None], gpus: Sequence[str]) -> None:
    """Python, torch and the GPUs: the jobs' ``CUDA_VISIBLE_DEVICES`` entries and the devices the launcher sees."""
    log(f"python {sys.version.split()[0]}; cwd {ROOT}")
    if gpus:
        import torch

        seen = "; ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        log(f"torch {torch.__version__}; jobs pinned to CUDA_VISIBLE_DEVICES in [{','.join(gpus)}] (incoming "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); the launcher sees {seen}")


TRAIN_PHASE = "training (one process per run, all at once)"


def write_commands(path: Path, phases: Sequence[tuple[str, Sequence[Job]]]) -> None:
    """Every job's command line, phase by phase under a ``# <title>`` line, for the record."""
    from spla_lit.eval.report import write_text

    write_text("".join(f"# {title}\n" + "".join(command_line(j) + "\n" for j in jobs) for title, jobs in phases), path)


def records_and_archive(runs: Sequence[tuple[Job, str, int | None]], trained: Mapping[str, Outcome],
                        evaluated: Mapping[str, Outcome], archive: Path, log: Callable[[str], None],
                        extra: Mapping[str, Mapping[str, Any]] | None = None, extra_evals: Sequence[str] = (),
                        **launcher: Any) -> list[dict]:
    """One record per ``(job, arm, seed)`` (``spla_lit.eval.study.run_record`` + ``extra[job.name]`` + how the
    launcher ran it), written to ``<run>/run.json`` and packed with the clipped job logs into ``archive``.
    ``extra_evals``: names of further evaluations of every run (:func:`eval_job`'s ``name``), in the record under
    that name, their outcomes in ``evaluated`` under ``<job>.<name>``; a job missing from ``trained`` (not trained
    by this launch) gets ``launcher.train`` None. A run whose record cannot be built gets a
    stub saying why; nothing here raises for one run."""
    from spla_lit.eval.report import write_json
    from spla_lit.eval.study import run_record

    records, members = [], []
    for job, arm, seed in runs:
        run = job.log.parent
        try:
            record = run_record(run, arm=arm, seed=seed, extra_evals=extra_evals)
        except Exception as e:  # a broken run must not lose the others
            log(f"record of {job.name} failed: {type(e).__name__}: {e}")
            record = {"job": job.name, "arm": arm, "seed": seed, "train": {"status": f"record failed: {e}"},
                      "eval": None}
        record.update((extra or {}).get(job.name, {}))
        record["launcher"] = {"gpu": job.gpu, "train": vars(trained[job.name]) if job.name in trained else None,
                              "eval": vars(evaluated[job.name]) if job.name in evaluated else None, **launcher}
        for name in extra_evals:
            outcome = evaluated.get(f"{job.name}.{name}")
            record["launcher"][name] = vars(outcome) if outcome else None
        records.append(record)
        write_json(record, run / "run.json")
        members += [(run / "run.json", f"runs/{job.name}.json"), (clip_log(job.log), f"logs/{job.name}.train.log")]
        members += [(clip_log(run / f"{name}.out"), f"logs/{job.name}.{name}.log") for name in ("eval", *extra_evals)
                    if (run / f"{name}.out").is_file()]
    pack(members, archive)
    log(f"wrote {archive} ({len(records)} records)")
    return records
