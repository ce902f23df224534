"""The study launchers (benchmarks/study/): concurrent jobs with a deadline, and a tiny CPU run of each launcher."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
from hydra_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "study"))

from _launch import Job, assign_gpus, max_time, run_jobs, visible_gpus, width_overrides  # noqa: E402
from calibrate import batch_rate_ratio, grid, parse_args  # noqa: E402


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_jobs_reports_failures_and_stops_jobs_at_the_deadline(tmp_path):
    lines: list[str] = []
    jobs = [Job("ok", _py("print('fine')"), tmp_path / "ok.out"),
            Job("bad", _py("import sys; print('boom'); sys.exit(3)"), tmp_path / "bad.out"),
            Job("slow", _py("import time; time.sleep(60)"), tmp_path / "slow.out"),
            Job("late", _py("print('never')"), tmp_path / "late.out")]
    out = run_jobs(jobs, deadline_s=8.0, log=lines.append, max_parallel=3, grace_s=1.0)
    assert out["ok"].ok and out["ok"].rc == 0 and (tmp_path / "ok.out").read_text() == "fine\n"
    assert out["bad"].rc == 3 and not out["bad"].ok
    assert out["slow"].timed_out and not out["slow"].ok and out["slow"].wall_s < 30
    # "late" waited for a free slot; it starts once "ok" or "bad" ended and finishes before the deadline
    assert out["late"].ok
    text = "\n".join(lines)
    assert "FAILED bad (exit 3" in text and "boom" in text and "DEADLINE: stopping slow" in text


def test_run_jobs_never_starts_what_does_not_fit_before_the_deadline(tmp_path):
    lines: list[str] = []
    jobs = [Job("slow", _py("import time; time.sleep(60)"), tmp_path / "slow.out"),
            Job("queued", _py("pass"), tmp_path / "queued.out")]
    out = run_jobs(jobs, deadline_s=1.0, log=lines.append, max_parallel=1, grace_s=1.0)
    assert out["queued"].rc is None and not out["queued"].ok
    assert any("queued never started" in line for line in lines)


def _count(n: int):
    return lambda: n


@pytest.mark.parametrize("env, gpus, n, expected", [
    ({}, None, 2, ["0", "1"]),                                   # nothing said: every device torch sees
    ({"CUDA_VISIBLE_DEVICES": "1"}, None, 1, ["1"]),             # the caller's choice is kept (issue 12)
    ({"CUDA_VISIBLE_DEVICES": "2, 3"}, None, 2, ["2", "3"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-ab12,GPU-cd34"}, None, 2, ["GPU-ab12", "GPU-cd34"]),  # UUIDs as they are
    ({}, "0,1", 2, ["0", "1"]),
    ({}, "1", 2, ["1"]),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "2,0", 3, ["2", "0"]),   # --gpus narrows the incoming list
])
def test_visible_gpus_respects_the_incoming_devices_and_gpus(env, gpus, n, expected):
    assert visible_gpus("cuda", gpus, env, _count(n)) == expected


@pytest.mark.parametrize("env, gpus, n, match", [
    ({"CUDA_VISIBLE_DEVICES": "1"}, "0", 1, "not in the incoming"),
    ({"CUDA_VISIBLE_DEVICES": ""}, None, 0, "hides every GPU"),
    ({}, None, 0, "no CUDA device"),
    ({}, "0,0", 2, "distinct"),
    ({}, ",", 2, "distinct"),
    ({}, "0,5", 2, "beyond the 2 visible"),
])
def test_visible_gpus_rejects_bad_choices(env, gpus, n, match):
    with pytest.raises(SystemExit, match=match):
        visible_gpus("cuda", gpus, env, _count(n))


def test_visible_gpus_on_the_cpu():
    assert visible_gpus("cpu", None, {"CUDA_VISIBLE_DEVICES": "1"}, _count(0)) == []
    with pytest.raises(SystemExit, match="--device cpu"):
        visible_gpus("cpu", "0", {}, _count(0))


def test_assign_gpus_pins_jobs_round_robin_onto_the_given_ids(tmp_path):
    jobs = [Job(f"j{i}", ["true"], tmp_path / f"{i}.out") for i in range(5)]
    assign_gpus(jobs, visible_gpus("cuda", None, {"CUDA_VISIBLE_DEVICES": "1"}, _count(1)))
    assert [(j.gpu, j.env["CUDA_VISIBLE_DEVICES"]) for j in jobs] == [("1", "1")] * 5
    assign_gpus(jobs, ["0", "1"])
    assert [j.env["CUDA_VISIBLE_DEVICES"] for j in jobs] == ["0", "1", "0", "1", "0"]
    cpu = [Job("c", ["true"], tmp_path / "c.out")]
    assign_gpus(cpu, [])
    assert cpu[0].gpu is None and "CUDA_VISIBLE_DEVICES" not in cpu[0].env


def test_a_job_sees_its_pinned_device_not_the_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the launcher's own (fake) environment
    jobs = [Job(f"j{i}", _py("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"), tmp_path / f"{i}.out")
            for i in range(2)]
    assign_gpus(jobs, visible_gpus("cuda", "1", None, _count(2)))
    out = run_jobs(jobs, deadline_s=60.0, log=lambda _: None)
    assert all(o.ok for o in out.values())
    assert [(tmp_path / f"{i}.out").read_text() for i in range(2)] == ["1\n", "1\n"]


def test_width_overrides_and_max_time():
    assert width_overrides(384, 64) == ["model.d_model=384", "model.n_heads=6", "model.n_kv_heads=3",
                                        "model.head_dim=64"]
    assert width_overrides(48, 16)[1:3] == ["model.n_heads=3", "model.n_kv_heads=3"]
    with pytest.raises(SystemExit, match="multiple"):
        width_overrides(100, 64)
    assert max_time(395.7) == "00:00:06:35" and max_time(0) == "00:00:00:01"


def test_calibration_grid_crosses_lr_answer_loss_weight_and_batch_then_probes_the_first_point(tmp_path):
    runs = grid(parse_args(["--out", str(tmp_path), "--lrs", "3e-3", "1e-3", "--answer-loss-weights", "1", "0",
                            "--mixtures", "single", "--batch-sizes", "16", "8"]))
    dense = [r for r in runs if r[1] == "dense"]
    assert len(dense) == 8 and [r[1] for r in runs[8:]] == ["taylor2"]
    assert {(k["lr"], k["alw"], k["batch"]) for _, _, _, k in dense} == {
        (lr, w, b) for lr in (3e-3, 1e-3) for w in (1.0, 0.0) for b in (16, 8)}
    name, _, overrides, knobs = runs[8]
    assert knobs == dense[0][3] and name == "probe_taylor2_lr0.003_d256_single_w1_b16"
    assert {"optim.lr=0.003", "module.answer_loss_weight=1.0", "data.batch_size=16", "model.d_model=256"} <= set(
        overrides)
    default = grid(parse_args(["--out", str(tmp_path)]))  # lr {3e-3, 1e-3} x mixture {k1, copy_k1} + the probe
    assert len(default) == 5 and default[4][0] == "probe_taylor2_lr0.003_d256_k1_w1_b16"
    assert "data.mixture.copy=0.34" in default[1][2] and "data.mixture.copy=0.34" not in default[0][2]
    assert "data.task_kwargs.mqar.key_len=2" in overrides  # --mixtures single: the two-token keys of calibration 2


def test_step_budget_scales_the_probe_rate_by_the_dense_batch_ratio():
    row = dict(lr=3e-3, width=256, mixture="single", alw=1.0)
    dense = [{**row, "batch": 16, "steps_per_s": 10.0}, {**row, "batch": 8, "steps_per_s": 15.0},
             {**row, "alw": 0.0, "batch": 8, "steps_per_s": 99.0}]
    probe = {**row, "batch": 16, "steps_per_s": 5.0}
    assert batch_rate_ratio(dense, probe, {**row, "batch": 8}) == 1.5
    assert batch_rate_ratio(dense, probe, {**row, "batch": 16}) == 1.0
    assert batch_rate_ratio(dense, probe, {**row, "batch": 4}) == 1.0  # no dense run at that batch: unscaled
    assert batch_rate_ratio(dense, probe, None) == 1.0


@pytest.mark.slow
def test_stage_a_launcher_tiny_cpu_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/study/stage_a.py", "--tiny", "--device", "cpu", "--arms", "dense", "no_rla",
         "--seeds", "1", "--steps", "2", "--num-samples", "2", "--lengths-x", "1", "2", "--train-s", "300",
         "--startup-s", "10", "--eval-s", "300", "--out", str(out), "--workdir", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"launcher.log", "commands.sh", "study_a_runs.tar.gz", "study_a.md",
                                               "study_a.json"}
    with tarfile.open(out / "study_a_runs.tar.gz") as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile("runs/01_no_rla_s1.json"))
    assert "logs/00_dense_s1.train.log" in names
    assert record["arm"] == "no_rla" and record["train"]["global_step"] == 2
    assert set(record["eval"]["ruler"]["average"]) == {"128", "256"}
    assert record["eval"]["fidelity"]["layers"] and record["launcher"]["train"]["rc"] == 0
    assert "+variant=no_rla" in (out / "commands.sh").read_text()


@pytest.mark.slow
def test_calibration_launcher_tiny_cpu_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/study/calibrate.py", "--tiny", "--device", "cpu", "--lrs", "1e-3",
         "--widths", "32", "--mixtures", "easy", "--answer-loss-weights", "1", "--batch-sizes", "2", "--probe",
         "--max-steps", "2", "--val-every", "1",
         "--num-samples", "2", "--train-s", "300", "--startup-s", "10", "--eval-s", "300", "--out", str(out),
         "--workdir", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "calibration.json").read_text())
    (row,) = summary["rows"]
    assert row["mixture"] == "easy" and row["steps"] == 2 and set(row["eval"]) == {"niah_single", "mqar"}
    assert row["alw"] == 1.0 and row["batch"] == 2
    record = summary["records"][0]
    assert record["config"]["data.task_kwargs"]["mqar"] == {"key_len": 2, "num_pairs": 8, "num_queries": 4}
    assert [h["step"] for h in record["train"]["val_history"]] == [1, 2]  # optimizer steps, not TensorBoard's
    assert "Suggestion for stage A" in (out / "calibration.md").read_text()
