"""Study stage B on one machine: pretrain one dense model on real text at a short context, continually pretrain
every arm x seed from it at 4x the context, evaluate them all, pack the per-run JSON for ``scripts/collect_study.py``.

    python benchmarks/study/stage_b.py --until data --data data/stageb --device cpu --out /tmp/b   # phase 0 here
    python benchmarks/study/stage_b.py --probe --data data/stageb --budget-s 540 --out $OUT       # measure, size
    python benchmarks/study/stage_b.py --until pretrain --data data/stageb --pretrain-steps P --out $OUT
    python benchmarks/study/stage_b.py --base models/stageb_base --data data/stageb --cpt-steps C --out $OUT
    python benchmarks/study/stage_b.py --tiny --device cpu --out /tmp/dry                         # CPU dry run

Phases (README "Stage B"):
  0 data      a byte-level BPE (``spla_lit.data.train_tokenizer``) and token shards (``spla_lit.data.prepare``) of
              --input (the stdlib corpus) in --data (DIR/tokenizer, DIR/tokens); reused when already there.
  1 pretrain  ``train.py model=dense data=tokens`` at --short-len for --pretrain-steps on one GPU, validating every
              --val-every steps; the checkpoint with the lowest val/loss (--export best) is exported as a Llama
              folder (``spla_lit.export``, --base-dtype). --base DIR skips it.
  2 CPT       ``train.py experiment=cpt init_from=<base> +variant=<arm> seed=<s>`` at --cpt-len for --cpt-steps, every
              arm x seed at once, round-robin over the GPUs; the same data order per seed for every arm.
  3 eval      per run (and the base, when pretrained in this call): ``eval.py`` with ``decode=generate`` at
              --eval-lengths (text RULER-style suite, teacher-forced and generated), perplexity by position at
              --ppl-len, selection fidelity at --cpt-len (``<run>/eval``); perplexity at --short-len on held-out
              text (``<run>/eval_short``).
  4 records   one JSON per run (``run_record`` + ``eval_short``) in study_b_runs.tar.gz, tables study_b.md/.json/.png.
--probe: a few dozen steps of the pretraining alone, then of every CPT run at once (the real concurrency), an
evaluation of one seed per arm with --probe-eval-samples; prints and writes (probe.md / probe.json) steps/s,
tokens/s, peak memory and the --pretrain-steps / --cpt-steps that fit --budget-s.
--until pretrain: stop after phase 1 (+ the base's evaluation and record) and return the exported base in $OUT as
stage_b_base.tar.gz (cut into .00, .01, ... parts of at most 15 MiB: ``cat stage_b_base.tar.gz.* | tar xz``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from _launch import (
    CPU_TRAIN,
    ROOT,
    Job,
    Log,
    add_device_args,
    assign_gpus,
    eval_job,
    has_checkpoint,
    log_setup,
    max_time,
    pack,
    records_and_archive,
    run_jobs,
    split_file,
    start,
    thread_env,
    width_overrides,
    write_commands,
)

from spla_lit.eval.text_tasks import TEXT_TASKS  # noqa: E402 (after _launch puts the root on the path)
from spla_lit.ops.utils import cdiv  # noqa: E402

ARMS = ("dense", "taylor2", "taylor1", "random", "no_rla")
RESIDUAL_ARMS = ("taylor2", "taylor1", "random")  # the arms whose conversion adds parameters (gate, norm)
PHASES = ("data", "pretrain", "cpt")
PART_BYTES = 15 * 2**20  # a file that comes back from the device: at most 16 MiB
EXTRA_EVALS = ("eval_short",)
EVAL_SHARE = 0.4  # --size: the evaluation's share of a call at most (the rest trains)
# --tiny: every phase at toy size on a CPU (reference ops), a few minutes on two cores.
TINY = {"short_len": 256, "cpt_len": 1024, "vocab_size": 1024, "d_model": 32, "layers": 2, "head_dim": 16,
        "pretrain_steps": 12, "pretrain_batch": 4, "cpt_steps": 4, "cpt_batch": 2, "val_every": 4, "block_size": 32,
        "topk": 4, "eval_lengths": [1024, 2048], "tasks": ["niah_single", "variable_tracking"], "num_samples": 2,
        "ppl_samples": 2, "short_ppl_samples": 4, "fidelity_samples": 1, "freeze_steps": 1, "warmup_steps": 1,
        "probe_steps": 24, "probe_eval_samples": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (the device's $OUT); required but with --size")
    p.add_argument("--until", choices=PHASES, default="cpt",
                   help="last phase: data (prepare only), pretrain (+ export, base eval, base archive), cpt (all)")
    p.add_argument("--probe", action="store_true", help="throughput probe and step suggestion (no study runs)")
    p.add_argument("--eval-only", type=Path, default=None, metavar="RUN_ROOT",
                   help="phases 3-4 only, on the runs of RUN_ROOT (<workdir>/study_b_<date>_<time> of an earlier "
                        "launch, given the same flags): its CPT runs (and RUN_ROOT/pretrain, if there) re-evaluated")
    p.add_argument("--budget-s", type=float, default=540,
                   help="--probe / --size: device seconds of one call to size for")
    p.add_argument("--size", type=Path, default=None, metavar="PROBE_JSON",
                   help="print CPT_STEPS=.. CPT_S=.. EVAL_S=.. NSAMP=.. for a call of --budget-s that trains and "
                        "evaluates --arms x --seeds on --gpus, from a probe's probe.json; runs nothing")
    p.add_argument("--probe-steps", type=int, default=40, help="--probe: steps of each probe run")
    p.add_argument("--probe-eval-samples", type=int, default=4, help="--probe: eval samples per task and length")
    g = p.add_argument_group("data (phase 0)")
    g.add_argument("--data", type=Path, default=None,
                   help="folder of the prepared data (DIR/tokenizer, DIR/tokens): reused if complete, else prepared "
                        "there (default: <workdir>/stage_b_data)")
    g.add_argument("--input", nargs="+", default=["stdlib"], help="corpus: files or folders, or stdlib")
    g.add_argument("--vocab-size", type=int, default=8192)
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out share of the documents (the same split for pretraining, CPT and every eval)")
    g = p.add_argument_group("model and pretraining (phase 1)")
    g.add_argument("--base", type=Path, default=None, help="an exported base (Llama folder): skip phase 1")
    g.add_argument("--short-len", type=int, default=1024, help="pretraining context")
    g.add_argument("--d-model", type=int, default=384)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--head-dim", type=int, default=64, help="query heads d_model / head_dim, half as many KV heads")
    g.add_argument("--pretrain-steps", type=int, default=3000)
    g.add_argument("--pretrain-batch", type=int, default=32)
    g.add_argument("--pretrain-lr", type=float, default=2e-3)
    g.add_argument("--warmup-steps", type=int, default=100, help="LR warmup of both stages")
    g.add_argument("--val-every", type=int, default=250, help="validation interval (steps) of both stages")
    g.add_argument("--pretrain-max-epochs", type=float, default=10.0,
                   help="passes over the training split the probe's --pretrain-steps may take (and above which the "
                        "launch warns); the base's best val/loss came at 8")
    g.add_argument("--export", choices=("best", "last"), default="best",
                   help="which pretraining checkpoint becomes the base: lowest val/loss, or the last")
    g.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="weights of the exported base (bfloat16: half the bytes to carry between calls)")
    g.add_argument("--set-pretrain", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides, phase 1")
    g = p.add_argument_group("continual pretraining (phase 2)")
    g.add_argument("--cpt-len", type=int, default=None, help="CPT context (default 4 x --short-len)")
    g.add_argument("--cpt-steps", type=int, default=1000)
    g.add_argument("--cpt-batch", type=int, default=4)
    g.add_argument("--cpt-lr", type=float, default=3e-4)
    g.add_argument("--freeze-steps", type=int, default=50, help="optim.freeze_pretrained_steps of the CPT runs")
    g.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    g.add_argument("--block-size", type=int, default=64, help="sparse.block_size of the SPLA arms")
    g.add_argument("--topk", type=int, default=8, help="sparse.topk: blocks attended per query block")
    g.add_argument("--set-cpt", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides, phase 2")
    g.add_argument("--cpt-max-epochs", type=float, default=2.0,
                   help="passes over the training split the probe's --cpt-steps may take (and above which the launch "
                        "warns): CPT's val/loss was lowest after ~1-1.5 epochs and rose after")
    g.add_argument("--eval-ckpt", choices=("best", "last"), default="best",
                   help="which checkpoint of a CPT run is evaluated: the lowest val/loss (each run keeps that one "
                        "and last.ckpt), or the last")
    g = p.add_argument_group("evaluation (phase 3)")
    g.add_argument("--eval-lengths", nargs="+", type=int, default=None,
                   help="text suite lengths (default 1x, 2x, 4x, 8x --cpt-len: 4K..32K)")
    g.add_argument("--tasks", nargs="+", default=None, choices=TEXT_TASKS,
                   help="text suite tasks (default: every one whose samples fit every --eval-lengths, checked on the "
                        "prepared data at the start; a given task that does not fit is an error)")
    g.add_argument("--num-samples", type=int, default=100, help="samples per task and length")
    g.add_argument("--ppl-len", type=int, default=None, help="perplexity-by-position length (default --cpt-len)")
    g.add_argument("--ppl-samples", type=int, default=16)
    g.add_argument("--short-ppl-samples", type=int, default=64, help="windows of --short-len for the short ppl")
    g.add_argument("--fidelity-samples", type=int, default=4)
    g.add_argument("--eval-batch", type=int, default=16, help="eval rows per batch (at most 64K tokens)")
    g = p.add_argument_group("machine")
    g.add_argument("--data-s", type=float, default=300, help="deadline of phase 0 (s)")
    g.add_argument("--pretrain-s", type=float, default=420, help="deadline of the pretraining (s)")
    g.add_argument("--export-s", type=float, default=120, help="deadline of the export (s)")
    g.add_argument("--cpt-s", type=float, default=420, help="deadline of the CPT phase (s)")
    g.add_argument("--eval-s", type=float, default=150, help="deadline of the evaluation phase (s)")
    g.add_argument("--startup-s", type=float, default=60,
                   help="part of a training deadline kept for start-up and the final checkpoint (trainer.max_time "
                        "= deadline - startup-s; a safety net, runs are sized by their steps)")
    add_device_args(g)
    g.add_argument("--tiny", action="store_true", help="toy sizes for a CPU dry run (overrides the sizes above)")
    g.add_argument("--max-parallel", type=int, default=None, help="jobs at once (default: all)")
    g.add_argument("--workdir", type=Path, default=Path("/tmp/spla_study"), help="where run directories go")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.cpt_len = args.cpt_len or 4 * args.short_len
    args.ppl_len = args.ppl_len or args.cpt_len
    args.eval_lengths = args.eval_lengths or [args.cpt_len * x for x in (1, 2, 4, 8)]
    args.data = (args.data or args.workdir / "stage_b_data").resolve()
    check_args(args, p.error)
    return args


def check_args(args: argparse.Namespace, error: Any) -> None:
    """Reject bad flags early, naming them (``error``: ``ArgumentParser.error``, which exits)."""
    for flag in ("vocab_size", "short_len", "cpt_len", "d_model", "layers", "head_dim", "pretrain_steps",
                 "pretrain_batch", "warmup_steps", "val_every", "cpt_steps", "cpt_batch", "block_size", "topk",
                 "num_samples", "ppl_len", "ppl_samples", "short_ppl_samples", "fidelity_samples", "eval_batch",
                 "probe_steps", "probe_eval_samples"):
        value = getattr(args, flag)
        if value < 1:
            error(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
    for flag in ("budget_s", "data_s", "pretrain_s", "export_s", "cpt_s", "eval_s", "pretrain_lr", "cpt_lr",
                 "pretrain_max_epochs", "cpt_max_epochs"):
        if getattr(args, flag) <= 0:
            error(f"--{flag.replace('_', '-')}: must be > 0, got {getattr(args, flag)}")
    if args.freeze_steps < 0:
        error(f"--freeze-steps: must be >= 0, got {args.freeze_steps}")
    if not 0 < args.val_fraction < 0.5:
        error(f"--val-fraction: must be in (0, 0.5), got {args.val_fraction}")
    if args.d_model % args.head_dim:
        error(f"--d-model: {args.d_model} is not a multiple of --head-dim {args.head_dim}")
    if args.cpt_len <= args.short_len:
        error(f"--cpt-len: {args.cpt_len} must exceed --short-len {args.short_len} (stage B extends the context)")
    if args.cpt_len % args.block_size:
        error(f"--block-size: {args.block_size} does not divide --cpt-len {args.cpt_len}")
    if args.topk >= args.cpt_len // args.block_size:
        error(f"--topk: {args.topk} of {args.cpt_len // args.block_size} blocks at --cpt-len selects everything")
    if min(args.eval_lengths) < 1 or len(set(args.eval_lengths)) != len(args.eval_lengths):
        error(f"--eval-lengths: expected distinct positive lengths, got {args.eval_lengths}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.arms)) != len(args.arms):
        error("--arms / --seeds: repeated values")
    if args.out is None and args.size is None:
        error("--out: required (the output folder)")
    if args.size is not None and not args.size.is_file():
        error(f"--size: {args.size} is not a file (a probe's probe.json)")
    if args.probe and args.until != "cpt":
        error("--probe: measures every phase; drop --until")
    if args.eval_only is not None:
        if args.probe or args.until != "cpt":
            error("--eval-only: evaluates the runs of an earlier launch; drop --probe / --until")
        if not args.eval_only.is_dir():
            error(f"--eval-only: {args.eval_only} is not a folder (expected <workdir>/study_b_<date>_<time>)")
    if args.base is not None and args.eval_only is None:
        if args.until != "cpt":
            error(f"--base: given, so phase 1 is skipped; --until {args.until} would run nothing")
        if not (args.base / "config.json").is_file():
            error(f"--base: {args.base} holds no config.json (an exported Hugging Face folder, e.g. from --until "
                  "pretrain's stage_b_base.tar.gz)")


# ------------------------------------------------------------------------------------------ job command lines


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The base model's sizes (``model=dense``; CPT runs take them from the exported base)."""
    return [*width_overrides(args.d_model, args.head_dim), f"model.n_layers={args.layers}"]


def _machine(args: argparse.Namespace, impl: str) -> list[str]:
    tiny = ["trainer.limit_val_batches=4"] if args.tiny else []  # all the held-out text is hundreds of batches
    return [f"impl={impl}", *(["trainer=gpu"] if args.device == "cuda" else CPU_TRAIN), *tiny]


def _val_every(args: argparse.Namespace, steps: int) -> str:
    return f"trainer.val_check_interval={min(args.val_every, steps)}"


def data_jobs(args: argparse.Namespace, run_root: Path, threads: int) -> list[Job]:
    """Phase 0: the tokenizer (unless ``<data>/tokenizer`` has one), then the shards (prepare itself skips an
    up-to-date folder)."""
    py, data, env = sys.executable, args.data, thread_env(threads)
    inputs = ",".join(map(str, args.input))
    jobs = []
    if not (data / "tokenizer" / "tokenizer.json").is_file():
        jobs.append(Job("tokenizer", [py, "-m", "spla_lit.data.train_tokenizer", f"input={inputs}",
                                      f"vocab_size={args.vocab_size}", f"out={data / 'tokenizer'}", "progress=false"],
                        run_root / "data" / "tokenizer.out", env))
    jobs.append(Job("prepare", [py, "-m", "spla_lit.data.prepare", f"input={inputs}",
                                f"tokenizer={data / 'tokenizer'}", f"out={data / 'tokens'}", "progress=false"],
                    run_root / "data" / "prepare.out", env))
    return jobs


def pretrain_job(args: argparse.Namespace, run_root: Path, threads: int, impl: str, steps: int,
                 name: str = "pretrain", deadline_s: float | None = None) -> Job:
    """Phase 1: the dense base at --short-len on the prepared text (its own tokenizer recorded with it)."""
    run = run_root / name
    argv = [sys.executable, "train.py", "model=dense", "data=tokens", f"data.path={args.data / 'tokens'}",
            f"tokenizer={args.data / 'tokenizer'}", f"data.seq_len={args.short_len}",
            f"data.batch_size={args.pretrain_batch}", f"data.val_fraction={args.val_fraction}",
            *model_overrides(args), f"optim.lr={args.pretrain_lr}", f"optim.warmup_steps={args.warmup_steps}",
            f"trainer.max_steps={steps}", _val_every(args, steps),
            f"++trainer.max_time={max_time((deadline_s or args.pretrain_s) - args.startup_s)}", "seed=0",
            *_machine(args, impl), f"hydra.run.dir={run}", *args.set_pretrain]
    return Job(name, argv, run / "train.out", thread_env(threads))


def export_job(args: argparse.Namespace, ckpt: Path, base: Path, env: dict[str, str]) -> Job:
    """The chosen pretraining checkpoint as a Llama folder (the CPT runs' ``init_from``)."""
    argv = [sys.executable, "-m", "spla_lit.export", f"ckpt_path={ckpt}", f"out={base}", f"dtype={args.base_dtype}",
            "overwrite=true"]
    return Job("export", argv, base.parent / "export.out", dict(env))


# A CPT run keeps two checkpoints: the lowest val/loss (saved after the validation that measured it, named by its
# step like the pretraining's) and train.py's last.ckpt; no per-validation checkpoints (15 runs share the disk).
BEST_CKPT = ["++callbacks.model_checkpoint.monitor=val/loss", "++callbacks.model_checkpoint.mode=min",
             "callbacks.model_checkpoint.save_top_k=1", "callbacks.model_checkpoint.every_n_train_steps=null",
             "callbacks.model_checkpoint.save_last=false"]


def cpt_jobs(args: argparse.Namespace, run_root: Path, threads: int, impl: str, base: Path | None, steps: int,
             prefix: str = "", deadline_s: float | None = None, keep_best: bool = True) -> list[tuple[Job, str, int]]:
    """Phase 2: (job, arm, seed) per CPT run, arm-major (round-robin GPUs get every arm). ``base`` None (the probe
    without a base): a randomly initialised model of the base's sizes, same throughput. ``keep_best``: the run
    keeps its best-val checkpoint (:data:`BEST_CKPT`) beside last.ckpt; else last.ckpt only (the probe)."""
    init = ([f"init_from={base}"] if base is not None else
            ["init_from_required=false", f"tokenizer={args.data / 'tokenizer'}", *model_overrides(args)])
    ckpts = BEST_CKPT if keep_best else ["callbacks.model_checkpoint=null"]
    out = []
    for arm in args.arms:
        # only the arms with a residual have new parameters to train alone first (train.py refuses it otherwise)
        freeze = args.freeze_steps if base is not None and arm in RESIDUAL_ARMS else 0
        for seed in args.seeds:
            name = f"{prefix}{len(out):02d}_{arm}_s{seed}"
            argv = [sys.executable, "train.py", "experiment=cpt", f"+variant={arm}", f"seed={seed}", *init,
                    f"optim.freeze_pretrained_steps={freeze}",
                    f"data.path={args.data / 'tokens'}", f"data.seq_len={args.cpt_len}",
                    f"data.batch_size={args.cpt_batch}", f"data.val_fraction={args.val_fraction}",
                    f"sparse.block_size={args.block_size}", f"sparse.topk={args.topk}", f"optim.lr={args.cpt_lr}",
                    f"optim.warmup_steps={args.warmup_steps}", f"trainer.max_steps={steps}", _val_every(args, steps),
                    f"++trainer.max_time={max_time((deadline_s or args.cpt_s) - args.startup_s)}",
                    *ckpts, *_machine(args, impl), f"hydra.run.dir={run_root / name}",
                    *args.set_cpt]
            out.append((Job(name, argv, run_root / name / "train.out", thread_env(threads)), arm, seed))
    return out


def eval_jobs(args: argparse.Namespace, job: Job, label: str, impl: str, ckpt: Path | None = None,
              num_samples: int | None = None) -> list[Job]:
    """Phase 3 for one run: the long evaluation (suite by generation at --eval-lengths, perplexity by position at
    --ppl-len, fidelity at --cpt-len) and ``eval_short`` (perplexity at --short-len; one task teacher-forced, since
    eval.py always runs a suite)."""
    if args.tasks is None:
        raise ValueError("args.tasks: None; fit_tasks() chooses the default tasks first")
    rows = max(1, min(args.eval_batch, 65536 // max(args.eval_lengths)))
    common = [f"label={label}", "batch_size=" + str(args.eval_batch), "max_batch_tokens=65536", "plot=false",
              "progress=false"]
    long = [f"lengths=[{','.join(map(str, args.eval_lengths))}]", f"tasks=[{','.join(args.tasks)}]",
            f"num_samples={num_samples or args.num_samples}", "decode=generate", f"perplexity.length={args.ppl_len}",
            f"perplexity.num_samples={args.ppl_samples}", "perplexity.num_buckets=8",
            f"fidelity.length={args.cpt_len}", f"fidelity.num_samples={args.fidelity_samples}"]
    short = [f"lengths=[{args.short_len}]", "tasks=[niah_single]", f"num_samples={min(rows, args.num_samples)}",
             f"perplexity.length={args.short_len}", f"perplexity.num_samples={args.short_ppl_samples}",
             "perplexity.num_buckets=4", "fidelity.enabled=false"]
    return [eval_job(job, args.device, impl, common + long, ckpt=ckpt),
            eval_job(job, args.device, impl, common + short, name="eval_short", ckpt=ckpt)]


# ------------------------------------------------------------------------------------------ helpers


def data_ready(data: Path) -> bool:
    return (data / "tokenizer" / "tokenizer.json").is_file() and (data / "tokens" / "manifest.json").is_file()


def heldout_check(args: argparse.Namespace, log: Log) -> None:
    """Warn when the held-out share looks too small for the evaluation's windows (the split is by documents, so
    only roughly ``val_fraction`` of the tokens)."""
    manifest = json.loads((args.data / "tokens" / "manifest.json").read_text())
    held = int(manifest["num_tokens"] * args.val_fraction)
    need = max(args.ppl_len * args.ppl_samples, args.short_len * args.short_ppl_samples)
    log(f"data {args.data}: {manifest['num_tokens']:,} tokens in {manifest['num_documents']} documents, vocab "
        f"{manifest['vocab_size']}, ~{held:,} held out ({args.val_fraction}); the perplexity windows need {need:,}")
    if held < 1.2 * need:
        log(f"WARNING: the held-out text (~{held:,} tokens) may hold too few windows for --ppl-samples / "
            "--short-ppl-samples: raise --val-fraction or lower them")


def runs_split_seed() -> int:
    """The held-out document split's seed of every run (data=tokens' default: the launcher never overrides it)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "data" / "tokens.yaml").split_seed


def fit_tasks(args: argparse.Namespace, log: Log) -> str | None:
    """Check ``--tasks`` x ``--eval-lengths`` (and the short evaluation's niah_single at ``--short-len``) on the
    prepared tokenizer and held-out text, as eval.py will (``spla_lit.eval.text_tasks.text_task_misfits``, the eval
    seed stream). Default ``--tasks`` (None) becomes every text task that fits, the others logged as dropped; a
    given task that does not fit: the error message (None when all is well)."""
    from omegaconf import OmegaConf

    from spla_lit.eval.ruler import ruler_seed
    from spla_lit.eval.text_tasks import misfit_message, text_suite, text_task_misfits

    seed = ruler_seed(OmegaConf.load(ROOT / "conf" / "eval.yaml").seed)  # eval.py's default seed: stage B's
    data_cfg = OmegaConf.create({"path": str(args.data / "tokens"), "seq_len": args.cpt_len,
                                 "val_fraction": args.val_fraction, "split_seed": runs_split_seed()})
    suite = text_suite(data_cfg, str(args.data / "tokenizer"))
    short = text_task_misfits(suite, ["niah_single"], [args.short_len], seed)
    if short:
        return f"--short-len: the short evaluation's {misfit_message(short)}"
    misfits = text_task_misfits(suite, args.tasks or TEXT_TASKS, args.eval_lengths, seed)
    if args.tasks is None:
        args.tasks = [t for t in TEXT_TASKS if t not in misfits]
        if misfits:
            log(f"--tasks: dropped {', '.join(misfits)} from the default: --eval-lengths {misfit_message(misfits)}")
        if not args.tasks:
            return f"--eval-lengths: no text task fits {args.eval_lengths}"
    elif misfits:
        return (f"--tasks / --eval-lengths: {misfit_message(misfits)}; drop the task from --tasks or raise "
                "--eval-lengths")
    log(f"text suite: {', '.join(args.tasks)} at {args.eval_lengths} (every pair checked on {args.data})")
    return None


def epoch_steps(args: argparse.Namespace) -> dict[str, float]:
    """Optimizer steps of one pass over the training split of the prepared data: ``pretrain`` (--short-len x
    --pretrain-batch) and ``cpt`` (--cpt-len x --cpt-batch), from the same split as the runs'."""
    from spla_lit.data.tokens import TokenDataModule

    out, split_seed = {}, runs_split_seed()
    for stage, length, batch in (("pretrain", args.short_len, args.pretrain_batch), ("cpt", args.cpt_len,
                                                                                     args.cpt_batch)):
        data = TokenDataModule(str(args.data / "tokens"), seq_len=length, batch_size=1,
                               val_fraction=args.val_fraction, split_seed=split_seed)
        out[stage] = data.train_dataset.num_windows / batch
    return out


def epoch_check(args: argparse.Namespace, log: Log, stages: list[str]) -> None:
    """Log the passes over the training split that ``stages`` (pretrain, cpt) will take; a WARNING above
    --pretrain-max-epochs / --cpt-max-epochs (past them val/loss rose: the corpus is small)."""
    per_epoch = epoch_steps(args)
    for stage in stages:
        steps, cap = getattr(args, f"{stage}_steps"), getattr(args, f"{stage}_max_epochs")
        epochs = steps / per_epoch[stage]
        log(f"{stage}: {steps} steps = {epochs:.2f} epochs of the training split ({per_epoch[stage]:.0f} steps each)")
        if epochs > cap:
            log(f"WARNING: --{stage}-steps {steps} is {epochs:.1f} epochs, above --{stage}-max-epochs {cap} "
                f"({int(cap * per_epoch[stage])} steps): the model will likely overfit the corpus")


def pick_checkpoint(run: Path, log: Log, which: str = "best") -> tuple[Path, int | None, dict[str, Any]]:
    """The checkpoint of a training run to export or evaluate: with ``best`` the ``step<N>.ckpt`` of the lowest
    val/loss (the pretraining saves one per validation, a CPT run only its best), else (or when missing)
    ``last.ckpt``; its step; and the run's training summary (``run_record``'s ``train``) at its final step."""
    from spla_lit.eval.study import run_record, val_curve

    last = run / "checkpoints" / "last.ckpt"
    train = run_record(run, arm=run.name)["train"]
    if which == "best":
        curve = val_curve(train.get("val_history") or [])
        if curve is not None:
            ckpt = run / "checkpoints" / f"step{curve['best_step']:06d}.ckpt"
            if ckpt.is_file():
                log(f"{run.name}: step {curve['best_step']} (val/loss {curve['best']:.4f}; final {curve['final']:.4f} "
                    f"at step {curve['final_step']}; last-quarter drop {100 * (curve['last_quarter_drop'] or 0):.2f}%)")
                return ckpt, curve["best_step"], train
            log(f"{run.name}: no checkpoint at the best step {curve['best_step']} ({ckpt.name}): last.ckpt")
    return last, train.get("global_step"), train


def scalar_stats(run: Path) -> dict[str, Any]:
    """Throughput of a probe run from its TensorBoard scalars: median tokens/s (validation excluded), peak GPU
    memory, the last step."""
    import statistics

    from spla_lit.eval.sweep import read_scalars

    scalars = read_scalars(run)
    tps = [v for _, _, v in scalars.get("train/tokens_per_s", [])]
    mem = [v for _, _, v in scalars.get("train/peak_memory_gib", [])]
    steps = [s for events in scalars.values() for s, _, _ in events]
    return {"tokens_per_s": statistics.median(tps) if tps else None, "peak_memory_gib": max(mem) if mem else None,
            "last_step": max(steps) if steps else None}


# ------------------------------------------------------------------------------------------ probe


def eval_seconds(timing: dict[str, float], num_samples: int) -> float:
    """Seconds of one run's evaluations (long + short) at ``num_samples`` per task and length, from a probe's
    ``{"suite_s", "rest_s", "probe_samples"}``: the suite's time scales with the samples, the rest (perplexity,
    fidelity, start-up, loading) does not."""
    return timing["suite_s"] * num_samples / timing["probe_samples"] + timing["rest_s"]


def _capped(args: argparse.Namespace, stage: str, steps: int, epoch_steps: dict[str, float] | None
            ) -> tuple[int, float | None]:
    """``steps`` capped at --<stage>-max-epochs passes over the training split (``epoch_steps[stage]`` steps
    each; None: no cap), and the passes they make."""
    if not epoch_steps:
        return steps, None
    per_epoch = epoch_steps[stage]
    steps = min(steps, int(getattr(args, f"{stage}_max_epochs") * per_epoch))
    return steps, steps / per_epoch


def suggest(args: argparse.Namespace, pre: dict[str, Any], cpt: dict[str, dict[str, Any]],
            evals: dict[str, dict[str, float]], concurrency: dict[str, int], margin_s: float = 30.0,
            epoch_steps: dict[str, float] | None = None, num_samples: int | None = None) -> dict[str, Any]:
    """Steps that fit ``args.budget_s`` per call, from the probe's rates.

    ``pre`` / ``cpt[arm]``: ``tokens_per_s`` and ``startup_s`` of the pretraining probe and of each arm's CPT probe
    runs (all CPT runs at once, as in the study); ``evals[arm]``: one run's evaluation time by parts
    (:func:`eval_seconds`; at ``num_samples``, default --num-samples), measured with ``concurrency["probe_eval"]``
    evaluations per GPU, scaled to ``concurrency["eval"]`` (the study's). Call 1 pretrains, exports and evaluates
    the base; call 2 trains and evaluates the CPT runs: the slowest arm sets the CPT step count (every arm trains
    the same tokens). ``epoch_steps`` (:func:`epoch_steps`): the step counts are capped at --pretrain-max-epochs /
    --cpt-max-epochs passes over the training split (the time left unused)."""
    n = num_samples or args.num_samples
    out: dict[str, Any] = {"budget_s": args.budget_s, "margin_s": margin_s, "num_samples": n}
    eval_scale = max(1.0, concurrency["eval"] / max(1, concurrency["probe_eval"]))
    eval_s = max((eval_seconds(e, n) for e in evals.values()), default=0.0) * eval_scale
    out["eval_s_estimate"] = eval_s
    if pre.get("tokens_per_s"):
        rate = pre["tokens_per_s"] / (args.pretrain_batch * args.short_len)
        base_eval = eval_seconds(evals["dense"], n) if "dense" in evals else 0.0
        train_s = args.budget_s - margin_s - pre["startup_s"] - 60 - base_eval  # 60: export
        steps, epochs = _capped(args, "pretrain", max(0, int(train_s * rate)), epoch_steps)
        train_s = min(train_s, steps / rate)
        out["pretrain"] = {"steps_per_s": rate, "train_s": train_s, "steps": steps, "epochs": epochs,
                           "tokens": steps * args.pretrain_batch * args.short_len,
                           "deadline_s": round(train_s + pre["startup_s"] + 30)}
    rates = {a: c["tokens_per_s"] / (args.cpt_batch * args.cpt_len) for a, c in cpt.items() if c.get("tokens_per_s")}
    if rates:
        slowest = min(rates, key=rates.get)
        startup = max(c.get("startup_s", 0.0) for c in cpt.values())
        train_s = args.budget_s - margin_s - startup - eval_s
        steps, epochs = _capped(args, "cpt", max(0, int(train_s * rates[slowest])), epoch_steps)
        train_s = min(train_s, steps / rates[slowest])
        out["cpt"] = {"steps_per_s": rates, "slowest": slowest, "train_s": train_s, "steps": steps, "epochs": epochs,
                      "tokens_per_run": steps * args.cpt_batch * args.cpt_len,
                      "deadline_s": round(train_s + startup + 30), "eval_deadline_s": round(eval_s * 1.2 + 30)}
    return out


def size_from_probe(args: argparse.Namespace, probe: dict[str, Any], eval_share: float = EVAL_SHARE) -> dict[str, Any]:
    """--size: :func:`suggest` for one call of --budget-s that trains and evaluates the CPT runs of --arms x --seeds
    on --gpus (default: the probe's GPU count), from a probe's ``probe.json``; --num-samples lowered in steps of 5
    until the evaluation takes at most ``eval_share`` of the budget."""
    inputs = probe.get("inputs")
    if not inputs:
        raise SystemExit("--size: the probe JSON has no 'inputs' (written by a probe of this launcher version)")
    n_gpus = len(args.gpus.split(",")) if args.gpus else inputs["gpus"]
    concurrency = {"eval": cdiv(2 * len(args.arms) * len(args.seeds), max(1, n_gpus)),
                   "probe_eval": inputs["probe_eval"]}
    candidates = list(range(args.num_samples, 0, -5))
    n = next((n for n in candidates if suggest(args, {}, {}, inputs["evals"], concurrency, num_samples=n)
              ["eval_s_estimate"] <= eval_share * args.budget_s), candidates[-1])
    sizing = suggest(args, {}, inputs["cpt"], inputs["evals"], concurrency, epoch_steps=inputs["epoch_steps"],
                     num_samples=n)
    sizing["eval_share"] = sizing["eval_s_estimate"] / args.budget_s
    return sizing


def size_lines(sizing: dict[str, Any]) -> str:
    """--size's output: a comment, then ``CPT_STEPS=.. CPT_S=.. EVAL_S=.. NSAMP=..`` (``eval "$(...)"`` or
    ``. file`` in a shell)."""
    cpt = sizing.get("cpt")
    if not cpt:
        raise SystemExit("--size: the probe measured no CPT rate")
    epochs = "" if cpt["epochs"] is None else f", {cpt['epochs']:.2f} epochs"
    over = f" (over {EVAL_SHARE:.0%}: fewer runs or tasks?)" if sizing.get("eval_share", 0.0) > EVAL_SHARE else ""
    return (f"# slowest arm {cpt['slowest']} at {cpt['steps_per_s'][cpt['slowest']]:.3f} steps/s: train "
            f"{cpt['train_s']:.0f}s{epochs}; evaluation ~{sizing['eval_s_estimate']:.0f}s of {sizing['budget_s']:.0f}s "
            f"at {sizing['num_samples']} samples{over}\n"
            f"CPT_STEPS={max(1, cpt['steps'])} CPT_S={max(60, cpt['deadline_s'])} EVAL_S={cpt['eval_deadline_s']} "
            f"NSAMP={sizing['num_samples']}\n")


def probe_markdown(args: argparse.Namespace, rows: list[dict[str, Any]], sizing: dict[str, Any]) -> str:
    from spla_lit.eval.report import table

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["# Stage B throughput probe", "",
             f"Model d_model {args.d_model}, {args.layers} layers, heads of {args.head_dim}; pretraining "
             f"{args.short_len} x {args.pretrain_batch}; CPT {args.cpt_len} x {args.cpt_batch}, block "
             f"{args.block_size}, topk {args.topk}; {args.probe_steps} steps per run. CPT probes ran all "
             f"{len(args.arms) * len(args.seeds)} runs at once, as the study does.", "",
             table(["run", "arm", "ok", "steps/s", "tokens/s (K)", "peak GiB", "wall s", "startup s",
                    "eval s (scaled)"],
                   [[r["name"], r["arm"], r["ok"], num(r.get("steps_per_s"), ".2f"),
                     num(r["tokens_per_s"] and r["tokens_per_s"] / 1e3, ".0f"), num(r.get("peak_memory_gib"), ".2f"),
                     num(r.get("wall_s"), ".0f"), num(r.get("startup_s"), ".0f"), num(r.get("eval_scaled_s"), ".0f")]
                    for r in rows]), "", "## Suggestion", ""]
    pre, cpt = sizing.get("pretrain"), sizing.get("cpt")
    def epochs(part: dict[str, Any], flag: str) -> str:
        return "" if part["epochs"] is None else f", {part['epochs']:.2f} epochs (at most {flag})"

    def too_small(what: str) -> str:  # a budget the start-up and evaluation alone exceed: no negative deadlines
        return (f"- {what}: nothing fits in --budget-s {sizing['budget_s']:.0f} (start-up, export and the evaluation, "
                f"~{sizing['eval_s_estimate']:.0f} s at {sizing['num_samples']} samples, take it all); "
                "`--size probe.json --budget-s B` sizes a call of B seconds.")

    if pre and pre["steps"] <= 0:
        lines.append(too_small("call 1 (`--until pretrain`)"))
    elif pre:
        lines.append(f"- call 1 (`--until pretrain`): `--pretrain-steps {pre['steps']} --pretrain-s "
                     f"{pre['deadline_s']}` ({pre['tokens'] / 1e6:.0f}M tokens at {pre['steps_per_s']:.1f} steps/s"
                     f"{epochs(pre, f'--pretrain-max-epochs {args.pretrain_max_epochs}')}).")
    if cpt and cpt["steps"] <= 0:
        lines.append(too_small("call 2 (`--base ...`)"))
    elif cpt:
        lines.append(f"- call 2 (`--base ...`): `--cpt-steps {cpt['steps']} --cpt-s {cpt['deadline_s']} --eval-s "
                     f"{cpt['eval_deadline_s']}` ({cpt['tokens_per_run'] / 1e6:.0f}M tokens per run"
                     f"{epochs(cpt, f'--cpt-max-epochs {args.cpt_max_epochs}')}; slowest arm {cpt['slowest']}; "
                     f"evaluation ~{sizing['eval_s_estimate']:.0f} s at {sizing['num_samples']} samples; `--size "
                     "probe.json --budget-s B` sizes another call).")
    if not (pre or cpt):
        lines.append("- no rate measured: see launcher.log.")
    return "\n".join(lines) + "\n"


def run_probe(args: argparse.Namespace, run_root: Path, gpus: list[str], impl: str, log: Log) -> int:
    """--probe: the pretraining alone, then every CPT run at once, then one evaluation per arm (seed 1)."""
    from spla_lit.eval.report import write_json, write_text

    n_cpt = len(args.arms) * len(args.seeds)
    cpus = os.cpu_count() or 1
    pre = pretrain_job(args, run_root, cpus, impl, args.probe_steps, name="probe_pretrain",
                       deadline_s=args.pretrain_s)
    pre.argv += ["callbacks.model_checkpoint=null"]
    assign_gpus([pre], gpus)
    runs = cpt_jobs(args, run_root, max(1, cpus // n_cpt), impl, args.base, args.probe_steps, prefix="probe_",
                    keep_best=False)
    assign_gpus([j for j, _, _ in runs], gpus)
    first = {arm: job for job, arm, seed in runs if seed == args.seeds[0]}
    evals = [e for arm, job in first.items() for e in eval_jobs(args, job, arm, impl,
                                                                num_samples=args.probe_eval_samples)]
    write_commands(args.out / "commands.sh", [("probe: pretraining alone", [pre]),
                                             ("probe: every CPT run at once", [j for j, _, _ in runs]),
                                             ("probe: one evaluation per arm", evals)])
    log(f"probe 1/3: pretraining alone, {args.probe_steps} steps")
    outcomes = run_jobs([pre], args.pretrain_s, log)
    log(f"probe 2/3: {n_cpt} CPT runs at once, {args.probe_steps} steps")
    outcomes.update(run_jobs([j for j, _, _ in runs], args.cpt_s, log, max_parallel=args.max_parallel))
    ready = [e for e in evals if has_checkpoint(e)]
    log(f"probe 3/3: {len(ready)} evaluations ({args.probe_eval_samples} samples per task and length)")
    evaluated = run_jobs(ready, args.eval_s, log, max_parallel=args.max_parallel)

    rows, cpt_rates, eval_s = [], {}, {}
    for job, arm, tokens_per_step in [(pre, "dense", args.pretrain_batch * args.short_len)] + \
            [(j, a, args.cpt_batch * args.cpt_len) for j, a, _ in runs]:
        stats = scalar_stats(job.log.parent)
        o = outcomes[job.name]
        rate = stats["tokens_per_s"] / tokens_per_step if stats["tokens_per_s"] else None
        row = {"name": job.name, "arm": arm, "ok": o.ok, "wall_s": o.wall_s, **stats, "steps_per_s": rate,
               "startup_s": max(0.0, o.wall_s - args.probe_steps / rate) if rate else None}
        if job is not pre and job in first.values():
            timed = eval_s.setdefault(arm, {"suite_s": 0.0, "rest_s": 0.0, "probe_samples": args.probe_eval_samples})
            for name in (job.name, f"{job.name}.eval_short"):
                res_dir = job.log.parent / ("eval" if name == job.name else "eval_short")
                timing = json.loads((res_dir / "results.json").read_text())["timing_s"] \
                    if (res_dir / "results.json").is_file() else {}
                suite = sum(v for k, v in timing.items() if k.startswith("ruler"))
                rest = sum(v for k, v in timing.items() if not k.startswith("ruler"))
                wall = evaluated[name].wall_s if name in evaluated else 0.0
                timed["suite_s"] += suite
                timed["rest_s"] += max(rest, wall - suite) if timing else wall  # rest + start-up and loading
            row["eval_scaled_s"] = eval_seconds(timed, args.num_samples)
        if job is not pre and rate:
            cpt_rates.setdefault(arm, []).append(row)
        rows.append(row)
    cpt = {a: {"tokens_per_s": min(r["tokens_per_s"] for r in rs), "startup_s": max(r["startup_s"] for r in rs)}
           for a, rs in cpt_rates.items()}
    per_gpu = max(1, len(gpus))
    pre_rate = {k: rows[0][k] for k in ("tokens_per_s", "startup_s")} if rows[0]["steps_per_s"] else {}
    inputs = {"pre": pre_rate, "cpt": cpt, "evals": eval_s, "epoch_steps": epoch_steps(args), "gpus": per_gpu,
              "probe_eval": cdiv(2 * len(first), per_gpu)}
    concurrency = {"eval": cdiv(2 * n_cpt, per_gpu), "probe_eval": inputs["probe_eval"]}
    sizing = suggest(args, pre_rate, cpt, eval_s, concurrency, epoch_steps=inputs["epoch_steps"])
    write_json({"rows": rows, "suggestion": sizing, "inputs": inputs,
                "args": {k: str(v) for k, v in vars(args).items()}}, args.out / "probe.json")
    text = probe_markdown(args, rows, sizing)
    write_text(text, args.out / "probe.md")
    members = [(j.log, f"logs/{j.name}.train.log") for j in [pre] + [j for j, _, _ in runs]]
    members += [(e.log, f"logs/{e.name}.log") for e in evals]
    pack(members, args.out / "probe_runs.tar.gz")
    print(text)
    return 0 if "cpt" in sizing and "pretrain" in sizing else 1


# ------------------------------------------------------------------------------------------ main


def run_evals(args: argparse.Namespace, job: Job, label: str, impl: str, log: Log, which: str,
              extra: dict[str, dict[str, Any]]) -> list[Job]:
    """Phase 3 of one run: :func:`eval_jobs` on its ``which`` checkpoint (:func:`pick_checkpoint`); ``extra[job]``
    (merged into its record) says which checkpoint and step were evaluated; the base's (``label`` base) also says
    it is the base, exported from that checkpoint."""
    ckpt, step, _ = pick_checkpoint(job.log.parent, log, which)
    base = {"role": "base", "exported_step": step, "exported_ckpt": ckpt.name} if label == "base" else {}
    extra[job.name] = {**base, "eval_ckpt": which, "evaluated_ckpt": ckpt.name, "evaluated_step": step}
    return eval_jobs(args, job, label, impl, ckpt=ckpt)


def rebuild_runs(args: argparse.Namespace, run_root: Path, impl: str, log: Log, cpus: int = 1
                 ) -> tuple[Job | None, list[tuple[Job, str, int]]]:
    """--eval-only: the pretraining job (when ``run_root/pretrain`` exists) and the CPT jobs of an earlier launch
    with these flags, rebuilt by name (jobs whose folder is missing are left out, logged), with the launch's CPU
    thread caps (their evaluations inherit them)."""
    pre = pretrain_job(args, run_root, cpus, impl, args.pretrain_steps) if (run_root / "pretrain").is_dir() else None
    threads = max(1, cpus // (len(args.arms) * len(args.seeds)))
    cpt = cpt_jobs(args, run_root, threads, impl, args.base or run_root / "base", args.cpt_steps)
    missing = [j.name for j, _, _ in cpt if not j.log.parent.is_dir()]
    if missing:
        log(f"--eval-only: no run folder for {', '.join(missing)} in {run_root} (other --arms / --seeds than the "
            f"launch?); there: {', '.join(sorted(p.name for p in run_root.iterdir() if p.is_dir()))}")
    return pre, [(j, a, s) for j, a, s in cpt if j.log.parent.is_dir()]


def main(argv: list[str] | None = None) -> int:
    from spla_lit.eval.study import collect_study

    args = parse_args(argv)
    if args.size is not None:
        print(size_lines(size_from_probe(args, json.loads(args.size.read_text()))), end="")
        return 0
    log, run_root, gpus, impl = start(args, "study_b")
    if args.eval_only is not None:
        run_root = args.eval_only.resolve()
    cpus = os.cpu_count() or 1
    log(f"stage B: data {args.data}, runs in {run_root}, GPUs [{','.join(gpus) or 'none'}], impl {impl}; short "
        f"{args.short_len}, CPT {args.cpt_len} (block {args.block_size}, topk {args.topk}), eval {args.eval_lengths}")
    log_setup(log, gpus)

    if args.eval_only is not None and not data_ready(args.data):
        log(f"--eval-only: {args.data} holds no prepared data (the launch's --data); nothing runs")
        return 1
    if not data_ready(args.data) or args.until == "data":
        jobs = data_jobs(args, run_root, cpus)
        log(f"phase 0: data into {args.data} ({', '.join(j.name for j in jobs)}), deadline {args.data_s:.0f}s")
        for job in jobs:  # one after the other: prepare needs the tokenizer
            if not run_jobs([job], args.data_s, log)[job.name].ok:
                log(f"phase 0 failed ({job.name}); nothing else runs")
                return 1
    if not data_ready(args.data):
        log(f"phase 0: {args.data} is incomplete; nothing else runs")
        return 1
    heldout_check(args, log)
    problem = fit_tasks(args, log)
    if problem:
        log(f"ERROR {problem}; nothing else runs")
        return 2
    if args.until == "data":
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in args.data.iterdir()}
        log(f"data ready: {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sorted(sizes.items()))}")
        return 0
    if args.probe:
        return run_probe(args, run_root, gpus, impl, log)
    if args.eval_only is None:
        epoch_check(args, log, [s for s, runs in (("pretrain", args.base is None), ("cpt", args.until == "cpt"))
                                if runs])

    phases: list[tuple[str, list[Job]]] = []
    runs: list[tuple[Job, str, int | None]] = []
    extra: dict[str, dict[str, Any]] = {}
    trained, evals = {}, []
    base = args.base.resolve() if args.base else None
    if args.eval_only is not None:
        pre, cpt = rebuild_runs(args, run_root, impl, log, cpus)
        log(f"--eval-only: phases 0-2 skipped; {len(cpt)} CPT runs{' and the pretraining' if pre else ''} of "
            f"{run_root} (training outcomes: what the run folders say)")
        if pre is not None:
            runs.append((pre, "base", None))
            evals += run_evals(args, pre, "base", impl, log, args.export, extra)
        runs += cpt
        evals += [e for job, arm, _ in cpt for e in run_evals(args, job, arm, impl, log, args.eval_ckpt, extra)]
    elif base is None:
        pre = pretrain_job(args, run_root, cpus, impl, args.pretrain_steps)
        assign_gpus([pre], gpus)
        phases.append(("pretraining", [pre]))
        write_commands(args.out / "commands.sh", phases)
        log(f"phase 1: pretraining, {args.pretrain_steps} steps at {args.short_len} tokens, deadline "
            f"{args.pretrain_s:.0f}s")
        trained.update(run_jobs([pre], args.pretrain_s, log))
        ckpt, _, _ = pick_checkpoint(pre.log.parent, log, args.export)
        if not ckpt.is_file():
            log("phase 1 failed: no checkpoint; nothing else runs")
            return 1
        base = run_root / "base"
        exp = export_job(args, ckpt, base, pre.env)
        phases.append(("export", [exp]))
        if not run_jobs([exp], args.export_s, log)["export"].ok:
            log("export failed; nothing else runs")
            return 1
        size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        log(f"phase 1 done at {log.elapsed():.0f}s: base {base} ({size / 2**20:.1f} MiB, {args.base_dtype})")
        runs.append((pre, "base", None))
        evals += run_evals(args, pre, "base", impl, log, args.export, extra)  # the exported checkpoint

    if args.until == "cpt" and args.eval_only is None:
        cpt = cpt_jobs(args, run_root, max(1, cpus // (len(args.arms) * len(args.seeds))), impl, base,
                       args.cpt_steps)
        assign_gpus([j for j, _, _ in cpt], gpus)
        phases.append(("continual pretraining (all at once)", [j for j, _, _ in cpt]))
        write_commands(args.out / "commands.sh", phases)
        log(f"phase 2: {len(cpt)} CPT runs ({len(args.arms)} arms x seeds {args.seeds}) from {base}, "
            f"{args.cpt_steps} steps at {args.cpt_len} tokens, deadline {args.cpt_s:.0f}s")
        trained.update(run_jobs([j for j, _, _ in cpt], args.cpt_s, log, max_parallel=args.max_parallel))
        log(f"phase 2 done at {log.elapsed():.0f}s: {sum(trained[j.name].ok for j, _, _ in cpt)}/{len(cpt)} ok")
        runs += cpt
        evals += [e for job, arm, _ in cpt for e in run_evals(args, job, arm, impl, log, args.eval_ckpt, extra)]
    write_commands(args.out / "commands.sh", phases + [("evaluation", evals)])

    ready = [e for e in evals if Path(e.argv[2].split("=", 1)[1]).is_file()]
    for e in ready:  # spread the evaluations over the GPUs in their own order (two per run)
        e.env.pop("CUDA_VISIBLE_DEVICES", None)
    assign_gpus(ready, gpus)
    log(f"phase 3: {len(ready)} evaluations, deadline {args.eval_s:.0f}s")
    evaluated = run_jobs(ready, args.eval_s, log, max_parallel=args.max_parallel)
    log(f"phase 3 done at {log.elapsed():.0f}s: {sum(o.ok for o in evaluated.values())}/{len(ready)} ok")

    log("phase 4: run records, archive, tables")
    records = records_and_archive(runs, trained, evaluated, args.out / "study_b_runs.tar.gz", log, extra=extra,
                                  extra_evals=EXTRA_EVALS, concurrent_jobs=len(runs), gpus=gpus, stage="B")
    if args.until == "pretrain":
        archive = pack([(f, f"stage_b_base/{f.relative_to(base)}") for f in sorted(base.rglob("*"))],
                       args.out / "stage_b_base.tar.gz")
        parts = split_file(archive, PART_BYTES)
        log(f"base archive: {', '.join(p.name for p in parts)} (join: cat stage_b_base.tar.gz* | tar xz)")
    try:
        collect_study([r for r in records if "config" in r], args.out, name="study_b",
                      title="Study stage B (CPT from one dense base)", write_runs=False, plot=args.until == "cpt")
        log(f"wrote {args.out / 'study_b.md'}")
    except Exception as e:
        log(f"tables failed ({type(e).__name__}: {e}); the archive has the records: scripts/collect_study.py")
    ok = sum(bool(r.get("eval")) and bool(r.get("eval_short")) for r in records)
    log(f"finished at {log.elapsed():.0f}s: {ok}/{len(records)} runs evaluated")
    print(json.dumps({"runs": len(records), "evaluated": ok, "wall_s": round(log.elapsed()), "root": str(ROOT)}))
    return 0 if ok == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
