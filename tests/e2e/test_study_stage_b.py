"""Study stage B's launcher (benchmarks/study/stage_b.py): flags, the command lines of every phase, records and
tables from fake records. Fast only: the end-to-end CPU dry run (--tiny) is run by hand (benchmarks/study/README.md)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hydra_utils import ROOT
from omegaconf import OmegaConf

sys.path.insert(0, str(ROOT / "benchmarks" / "study"))

import stage_b  # noqa: E402
from _launch import split_file  # noqa: E402
from stage_b import (  # noqa: E402
    ARMS,
    RESIDUAL_ARMS,
    cpt_jobs,
    data_jobs,
    epoch_check,
    epoch_steps,
    eval_jobs,
    eval_seconds,
    fit_tasks,
    parse_args,
    pretrain_job,
    rebuild_runs,
    size_from_probe,
    suggest,
)

from spla_lit.data.tokens import TokenDataModule  # noqa: E402
from spla_lit.eval.study import aggregate, run_record, study_markdown, val_curve  # noqa: E402
from spla_lit.eval.text_tasks import TEXT_TASKS, shortest_text_length, text_suite  # noqa: E402


def _args(tmp_path: Path, *extra: str):
    return parse_args(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), *extra])


def _value(argv: list[str], key: str) -> str:
    found = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    assert len(found) == 1, (key, argv)
    return found[0]


def test_defaults_derive_the_cpt_and_eval_lengths_from_the_short_length(tmp_path):
    a = _args(tmp_path)
    assert (a.short_len, a.cpt_len, a.ppl_len) == (1024, 4096, 4096)
    assert a.eval_lengths == [4096, 8192, 16384, 32768] and a.arms == list(ARMS) and a.seeds == [1, 2, 3]
    assert (a.block_size, a.topk) == (64, 8)  # 8 of 64 blocks at 4K
    b = _args(tmp_path, "--short-len", "2048", "--cpt-len", "8192", "--topk", "16")
    assert b.eval_lengths == [8192, 16384, 32768, 65536] and b.ppl_len == 8192


@pytest.mark.parametrize("flags, named", [
    (["--topk", "64"], "--topk"),                       # every block at 4K: nothing sparse
    (["--cpt-len", "1024"], "--cpt-len"),               # no longer than the pretraining context
    (["--block-size", "100"], "--block-size"),
    (["--d-model", "100"], "--d-model"),
    (["--val-fraction", "0.7"], "--val-fraction"),
    (["--num-samples", "0"], "--num-samples"),
    (["--cpt-s", "0"], "--cpt-s"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--eval-lengths", "4096", "4096"], "--eval-lengths"),
    (["--probe", "--until", "pretrain"], "--probe"),
    (["--arms", "window"], "--arms"),                   # not a stage B arm
])
def test_bad_flags_are_named(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit):
        _args(tmp_path, *flags)
    assert named in capsys.readouterr().err


def test_base_must_be_an_exported_folder_and_skips_pretraining_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _args(tmp_path, "--base", str(tmp_path))
    err = capsys.readouterr().err
    assert "--base" in err and "config.json" in err
    (tmp_path / "config.json").write_text("{}")
    assert _args(tmp_path, "--base", str(tmp_path)).base == tmp_path
    with pytest.raises(SystemExit):
        _args(tmp_path, "--base", str(tmp_path), "--until", "pretrain")


def test_data_jobs_train_a_tokenizer_only_when_missing(tmp_path):
    a = _args(tmp_path)
    jobs = data_jobs(a, tmp_path / "runs", 2)
    assert [j.name for j in jobs] == ["tokenizer", "prepare"]
    assert "input=stdlib" in jobs[0].argv and "vocab_size=8192" in jobs[0].argv
    assert _value(jobs[1].argv, "tokenizer") == str(a.data / "tokenizer")
    assert _value(jobs[1].argv, "out") == str(a.data / "tokens")
    (a.data / "tokenizer").mkdir(parents=True)
    (a.data / "tokenizer" / "tokenizer.json").write_text("{}")
    assert [j.name for j in data_jobs(a, tmp_path / "runs", 2)] == ["prepare"]


def test_pretraining_is_one_dense_run_at_the_short_length(tmp_path):
    a = _args(tmp_path, "--pretrain-steps", "500")
    job = pretrain_job(a, tmp_path / "runs", 4, "auto", a.pretrain_steps)
    assert job.argv[1] == "train.py" and {"model=dense", "data=tokens", "trainer=gpu", "impl=auto"} <= set(job.argv)
    assert _value(job.argv, "data.seq_len") == "1024" and _value(job.argv, "trainer.max_steps") == "500"
    assert _value(job.argv, "tokenizer") == str(a.data / "tokenizer")  # carried data: no stale manifest path
    assert _value(job.argv, "model.d_model") == "384" and _value(job.argv, "model.n_kv_heads") == "3"
    assert _value(job.argv, "data.val_fraction") == "0.05"
    assert job.env["OMP_NUM_THREADS"] == "4"
    cpu = pretrain_job(parse_args(["--out", "o", "--device", "cpu"]), tmp_path, 1, "reference", 3)
    assert "trainer.accelerator=cpu" in cpu.argv and "trainer=gpu" not in cpu.argv
    assert _value(cpu.argv, "trainer.val_check_interval") == "3"  # never beyond the run


def test_cpt_runs_are_arm_major_from_the_base_with_the_same_data_per_seed(tmp_path):
    a = _args(tmp_path, "--cpt-steps", "800")
    base = tmp_path / "base"
    runs = cpt_jobs(a, tmp_path / "runs", 1, "auto", base, a.cpt_steps)
    assert [(arm, seed) for _, arm, seed in runs] == [(arm, s) for arm in ARMS for s in (1, 2, 3)]
    for job, arm, seed in runs:
        assert {"experiment=cpt", f"+variant={arm}", f"seed={seed}", f"init_from={base}"} <= set(job.argv)
        # the best val/loss kept (one checkpoint, saved after its validation) beside train.py's last.ckpt
        assert {"++callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.save_top_k=1",
                "callbacks.model_checkpoint.every_n_train_steps=null"} <= set(job.argv)
        assert _value(job.argv, "data.seq_len") == "4096" and _value(job.argv, "sparse.topk") == "8"
        assert _value(job.argv, "optim.freeze_pretrained_steps") == ("50" if arm in RESIDUAL_ARMS else "0")
        assert job.log.parent.name == job.name and job.name.endswith(f"_{arm}_s{seed}")

    def data_args(job):  # what decides the tokens a run sees
        return [a for a in job.argv if a.startswith(("data.", "seed="))]

    by_seed = {}
    for job, _, seed in runs:
        by_seed.setdefault(seed, set()).add(tuple(data_args(job)))
    assert all(len(v) == 1 for v in by_seed.values())
    # the probe without a base: random init of the base's sizes, its tokenizer named
    probe = cpt_jobs(a, tmp_path / "runs", 1, "auto", None, 40, prefix="probe_", keep_best=False)
    argv = probe[0][0].argv
    assert {"init_from_required=false", "optim.freeze_pretrained_steps=0"} <= set(argv)
    assert "callbacks.model_checkpoint=null" in argv  # the probe keeps last.ckpt only
    assert not any(x.startswith("init_from=") for x in argv) and _value(argv, "model.d_model") == "384"
    assert probe[0][0].name.startswith("probe_00_dense")


def test_each_run_gets_a_long_generated_evaluation_and_a_short_perplexity(tmp_path):
    a = _args(tmp_path, "--num-samples", "50", "--tasks", "niah_single", "variable_tracking")
    job = cpt_jobs(a, tmp_path / "runs", 1, "auto", tmp_path / "base", 10)[3][0]
    long, short = eval_jobs(a, job, "taylor2", "auto")
    assert (long.name, short.name) == (job.name, f"{job.name}.eval_short")
    assert _value(long.argv, "output_dir") == str(job.log.parent / "eval")
    assert _value(long.argv, "lengths") == "[4096,8192,16384,32768]" and "decode=generate" in long.argv
    assert _value(long.argv, "tasks") == "[niah_single,variable_tracking]"
    assert _value(long.argv, "num_samples") == "50" and _value(long.argv, "perplexity.length") == "4096"
    assert _value(long.argv, "fidelity.length") == "4096"
    assert _value(short.argv, "output_dir") == str(job.log.parent / "eval_short")
    assert _value(short.argv, "perplexity.length") == "1024" and _value(short.argv, "lengths") == "[1024]"
    assert "fidelity.enabled=false" in short.argv and short.log.name == "eval_short.out"
    ckpt = tmp_path / "step000250.ckpt"
    assert _value(eval_jobs(a, job, "base", "auto", ckpt=ckpt)[1].argv, "ckpt_path") == str(ckpt)


def test_tasks_and_eval_lengths_are_checked_on_the_prepared_data_before_any_job(tmp_path, prepared, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer").symlink_to(tokenizer_dir)
    (data / "tokens").symlink_to(prepared)
    suite = text_suite(OmegaConf.create({"path": str(prepared), "seq_len": 64, "val_fraction": 0.05,
                                         "split_seed": 0}), str(tokenizer_dir))
    need = {t: shortest_text_length(suite, t) for t in TEXT_TASKS}
    short = need["niah_single"] + 8  # niah_single fits, the longest task does not
    longest = max(need, key=need.get)
    assert need[longest] > short + 8
    sizes = ["--short-len", str(short), "--cpt-len", "1024", "--block-size", "32"]  # the corpus: 2880 tokens
    lines = []
    a = _args(tmp_path, *sizes, "--eval-lengths", str(short), "1024")
    assert a.tasks is None and fit_tasks(a, lines.append) is None
    assert "niah_single" in a.tasks and longest not in a.tasks  # (near the edge samples vary: a margin of 8)
    assert any(line.startswith("--tasks: dropped ") for line in lines)
    a = _args(tmp_path, *sizes, "--eval-lengths", "1024")
    assert fit_tasks(a, lines.append) is None and a.tasks == list(TEXT_TASKS)
    a = _args(tmp_path, *sizes, "--eval-lengths", str(short), "1024", "--tasks", "niah_single", longest)
    problem = fit_tasks(a, lines.append)
    assert problem.startswith("--tasks / --eval-lengths: ") and f"too few for task {longest!r}" in problem
    # main: the same error before any job runs (no run folder made), in the log that comes back
    argv = ["--out", str(tmp_path / "out"), "--data", str(data), "--device", "cpu", "--workdir",
            str(tmp_path / "work"), *sizes, "--eval-lengths", str(short), "--tasks", longest]
    assert stage_b.main(argv) == 2
    assert not (tmp_path / "work").exists()
    assert "ERROR --tasks / --eval-lengths" in (tmp_path / "out" / "launcher.log").read_text()


def test_split_file_cuts_into_joinable_parts(tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "base.tar.gz"
    path.write_bytes(data)
    parts = split_file(path, 4000)
    assert [p.name for p in parts] == ["base.tar.gz.00", "base.tar.gz.01", "base.tar.gz.02"]
    assert not path.exists() and b"".join(p.read_bytes() for p in parts) == data
    small = tmp_path / "small"
    small.write_bytes(b"x")
    assert split_file(small, 10) == [small]


def _evals(*seconds: float) -> dict:
    """Probe evaluation timings (4 samples) whose total at 100 samples is ``seconds``, half of it the suite's."""
    return {arm: {"suite_s": t / 50, "rest_s": t / 2, "probe_samples": 4}
            for arm, t in zip(("dense", "taylor2"), seconds)}


def test_suggest_sizes_both_calls_from_the_probe_rates(tmp_path):
    a = _args(tmp_path, "--budget-s", "540")
    pre = {"tokens_per_s": 10 * 32 * 1024, "startup_s": 40.0}  # 10 steps/s
    cpt = {"dense": {"tokens_per_s": 4 * 4 * 4096, "startup_s": 50.0},   # 4 steps/s
           "taylor2": {"tokens_per_s": 2 * 4 * 4096, "startup_s": 60.0}}  # 2 steps/s: sets the count
    evals = _evals(20.0, 30.0)
    assert eval_seconds(evals["taylor2"], 100) == pytest.approx(30.0)
    s = suggest(a, pre, cpt, evals, {"eval": 16, "probe_eval": 2})
    assert s["eval_s_estimate"] == pytest.approx(30.0 * 8)
    assert s["pretrain"]["steps"] == int((540 - 30 - 40 - 60 - 20) * 10)
    assert s["cpt"]["slowest"] == "taylor2" and s["cpt"]["steps"] == int((540 - 30 - 60 - 240) * 2)
    assert s["cpt"]["tokens_per_run"] == s["cpt"]["steps"] * 4 * 4096 and s["cpt"]["epochs"] is None
    # capped at --cpt-max-epochs (2) / --pretrain-max-epochs (10) passes over the training split
    capped = suggest(a, pre, cpt, evals, {"eval": 16, "probe_eval": 2}, epoch_steps={"pretrain": 100, "cpt": 50})
    assert capped["cpt"]["steps"] == 100 and capped["cpt"]["epochs"] == 2.0
    assert capped["cpt"]["deadline_s"] == round(100 / 2 + 60 + 30)
    assert capped["pretrain"]["steps"] == 1000 and capped["pretrain"]["epochs"] == 10.0
    # a budget the start-up and the evaluation alone exceed: the probe's report says so, with no negative deadline
    tight = suggest(_args(tmp_path, "--budget-s", "100"), pre, cpt, evals, {"eval": 16, "probe_eval": 2})
    assert tight["pretrain"]["steps"] == 0 and tight["cpt"]["steps"] == 0
    md = stage_b.probe_markdown(a, [], tight)
    assert "call 1 (`--until pretrain`): nothing fits in --budget-s 100" in md and "--pretrain-s -" not in md
    assert "call 2 (`--base ...`): nothing fits in --budget-s 100" in md and "--cpt-s -" not in md


def test_size_prints_the_cpt_call_with_the_evaluation_within_its_share(tmp_path, capsys):
    inputs = {"pre": {}, "cpt": {"dense": {"tokens_per_s": 4 * 4 * 4096, "startup_s": 50.0}},
              "evals": _evals(60.0), "epoch_steps": {"pretrain": 1000, "cpt": 10_000}, "gpus": 2, "probe_eval": 5}
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"inputs": inputs}))
    a = _args(tmp_path, "--size", str(probe), "--budget-s", "600", "--arms", "dense", "--seeds", "1", "2")
    sizing = size_from_probe(a, json.loads(probe.read_text()))
    # 2 runs on 2 GPUs: 2 evaluations per GPU (<= the probe's 5: no scaling); 60 s at 100 samples fits 40% of 600
    assert sizing["num_samples"] == 100 and sizing["eval_s_estimate"] == pytest.approx(60.0)
    tight = size_from_probe(_args(tmp_path, "--size", str(probe), "--budget-s", "100", "--arms", "dense"),
                            {"inputs": inputs})
    assert tight["num_samples"] < 100 and tight["eval_s_estimate"] <= 40.0
    assert stage_b.main(["--size", str(probe), "--budget-s", "600", "--arms", "dense", "--seeds", "1", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    c = sizing["cpt"]
    assert last == (f"CPT_STEPS={c['steps']} CPT_S={c['deadline_s']} EVAL_S={c['eval_deadline_s']} NSAMP=100")
    assert c["steps"] == int((600 - 30 - 50 - 60) * 4)
    with pytest.raises(SystemExit):
        size_from_probe(a, {"rows": []})  # a probe without the inputs


def test_eval_only_rebuilds_the_runs_of_a_launch_by_name(tmp_path, capsys):
    root = tmp_path / "study_b_2026-11-30_12-00-00"
    for name in ("pretrain", "00_dense_s1", "01_taylor2_s1"):
        (root / name).mkdir(parents=True)
    lines = []
    a = _args(tmp_path, "--eval-only", str(root), "--arms", "dense", "taylor2", "random", "--seeds", "1")
    pre, cpt = rebuild_runs(a, root, "auto", lines.append)
    assert pre.name == "pretrain" and pre.log.parent == root / "pretrain"
    assert [(j.name, arm, seed) for j, arm, seed in cpt] == [("00_dense_s1", "dense", 1),
                                                             ("01_taylor2_s1", "taylor2", 1)]
    assert "02_random_s1" in lines[0]  # its folder is missing: logged, left out
    shutil.rmtree(root / "pretrain")
    assert rebuild_runs(a, root, "auto", lines.append)[0] is None
    for flags in (["--probe"], ["--until", "pretrain"]):
        with pytest.raises(SystemExit):
            _args(tmp_path, "--eval-only", str(root), *flags)
        assert "--eval-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(tmp_path, "--eval-only", str(tmp_path / "nowhere"))


def test_epochs_of_each_stage_are_logged_and_warned_above_the_cap(tmp_path, prepared, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer").symlink_to(tokenizer_dir)
    (data / "tokens").symlink_to(prepared)
    a = _args(tmp_path, "--short-len", "128", "--cpt-len", "512", "--block-size", "32", "--pretrain-batch", "2",
              "--cpt-batch", "1")
    per_epoch = epoch_steps(a)
    windows = (TokenDataModule(str(prepared), seq_len=512, val_fraction=0.05).train_dataset.num_windows)
    assert per_epoch["cpt"] == windows and per_epoch["pretrain"] > per_epoch["cpt"]  # windows of 128, 2 a step
    a.cpt_steps, a.pretrain_steps = int(2 * windows), int(per_epoch["pretrain"])  # 2 epochs: at the cap, 1: below
    lines = []
    epoch_check(a, lines.append, ["pretrain", "cpt"])
    assert len(lines) == 2 and "= 2.00 epochs" in lines[1]
    a.cpt_steps += 1
    epoch_check(a, lines.append, ["cpt"])
    assert lines[-1].startswith("WARNING: --cpt-steps ") and "--cpt-max-epochs 2.0" in lines[-1]


def _suite(value: float, lengths=(4096, 8192)) -> dict:
    return {"average": {str(n): value for n in lengths},
            "per_task": {str(n): {"niah_single": value} for n in lengths}}


def _record(arm: str, seed, gen: float, short_ppl: float, **more) -> dict:
    ev = {"ruler": _suite(gen / 2), "ruler_generate": _suite(gen)}
    return {"job": f"{arm}_{seed}", "arm": arm, "seed": seed, "config": {"data.seq_len": 4096},
            "train": {"status": "ok", "global_step": 10}, "eval": ev,
            "eval_short": {"perplexity": {"length": 1024, "ppl": short_ppl, "loss": 1.0}}, **more}


def test_stage_b_tables_from_fake_records():
    history = [{"step": s, "val/loss": v, "val/ppl": 2.0} for s, v in ((250, 3.0), (500, 2.5), (750, 2.4),
                                                                       (1000, 2.41))]
    records = [_record("dense", s, 0.5 + 0.1 * s, 10.0 + s) for s in (1, 2, 3)]
    records += [_record("taylor2", 1, 0.2, 12.0)]
    records += [{**_record("base", None, 0.0, 9.0), "role": "base", "exported_step": 750,
                 "train": {"status": "ok", "global_step": 1000, "val_history": history}}]
    summary = aggregate(records)
    dense = summary["arms"]["dense"]
    assert dense["generate"]["average"]["4096"]["mean"] == pytest.approx(0.7)
    assert dense["generate"]["average"]["4096"]["half"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert dense["average"]["4096"]["mean"] == pytest.approx(0.35)  # teacher-forced beside it
    assert dense["short_ppl"]["ppl"]["mean"] == pytest.approx(12.0) and dense["short_ppl"]["length"] == 1024
    assert list(summary["arms"]) == ["dense", "taylor2", "base"]
    text = study_markdown(summary, records, "Stage B")
    assert "## Exact match by greedy generation" in text and "70.0 ± " in text
    assert "## Perplexity at the pretraining length (1024 tokens" in text and "12.00 ± " in text
    assert "pretraining validation curve" in text and "Best val/loss 2.4000 at step 750" in text
    assert "exported: step 750" in text
    # stage A's records (no generation, no eval_short) keep their tables
    plain = [{**r, "eval": {"ruler": r["eval"]["ruler"]}} for r in records[:3]]
    for r in plain:
        del r["eval_short"]
    text_a = study_markdown(aggregate(plain), plain)
    assert "generation" not in text_a and "pretraining length" not in text_a


def test_val_curve_measures_the_last_quarter():
    hist = [{"step": 100 * i, "val/loss": 4.0 - 0.1 * i} for i in range(1, 9)]
    curve = val_curve(hist)
    assert curve["best_step"] == 800 and curve["final"] == pytest.approx(3.2)
    assert curve["last_quarter_drop"] == pytest.approx((3.4 - 3.2) / 3.4)
    rising = val_curve(hist + [{"step": 900, "val/loss": 3.5}])
    assert rising["best_step"] == 800 and rising["last_quarter_drop"] < 0
    assert val_curve(hist[:1]) is None


def test_run_record_keeps_extra_evaluations(tmp_path):
    job = tmp_path / "00_dense_s1"
    (job / "eval_short").mkdir(parents=True)
    (job / "eval_short" / "results.json").write_text(json.dumps({"perplexity": {"ppl": 9.0}}))
    record = run_record(job, arm="dense", seed=1, extra_evals=("eval_short", "eval_other"))
    assert record["eval_short"] == {"perplexity": {"ppl": 9.0}} and record["eval_other"] is None
    assert record["eval"] is None and "eval_short" not in run_record(job, arm="dense", seed=1)
