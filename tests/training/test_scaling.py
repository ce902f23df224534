"""Scale-out to 4 processes on the CPU (gloo), through ``benchmarks/scaling.py --cpu`` (issue 15's check at
TINY sizes): a sharded checkpoint written by 4 processes resumes on 2 and on 1 at the exact step with the same
weights; hybrid sharding over 2 groups of 2 gives full sharding's clipped gradient norm and loss; and the
script's plan and verdicts (from CSV logs written here)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_weights import assert_same_weights, net_weights
from hydra_utils import ROOT

SPEC = importlib.util.spec_from_file_location("benchmarks_scaling", ROOT / "benchmarks" / "scaling.py")
scaling = sys.modules.setdefault("benchmarks_scaling", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(scaling)  # registered first: its dataclass looks its module up

CLIP = 0.05  # below the TINY model's gradient norms: the clipping acts at every step


@pytest.fixture(scope="module")
def four_procs(tmp_path_factory) -> Path:
    """``scaling.py --cpu --gpus 1 2 4``, the arms with 4 processes and what resumes from them: full sharding
    over 4 processes x batch 1 (6 steps, a sharded checkpoint at step 4), its checkpoint resumed on 2 processes
    (batch 1 x 2 micro-batches) and on 1 (batch 1 x 4), and 2 steps of hybrid sharding over 2 groups of 2."""
    out = tmp_path_factory.mktemp("scaling")
    cmd = [sys.executable, "benchmarks/scaling.py", "--cpu", "--gpus", "1", "2", "4", "--warmup", "0", "--steps",
           "6", "--resume-steps", "2", "--hybrid-steps", "2", "--only", "g4_b1", "resume", "hybrid",
           "--keep-checkpoints", "--out", str(out), "--set", f"trainer.gradient_clip_val={CLIP}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sharded_checkpoint_of_4_processes_resumes_on_2_and_1_at_the_exact_step(four_procs):
    resume = json.loads((four_procs / "summary.json").read_text())["targets"]["resume"]
    assert resume["step"] == 4 and resume["pass"] is True
    assert [(r["gpus"], r["first_step"], r["last_step"]) for r in resume["rows"]] == [(2, 4, 5), (1, 4, 5)]
    assert not any(r["changed_batch_warning"] for r in resume["rows"])
    source = four_procs / "runs" / "g4_b1" / "checkpoints"
    assert len(list((source / "step000004.ckpt").glob("*.distcp"))) == 4  # one shard per process
    final = net_weights(source / "last.ckpt")
    for arm in ("resume_g2_b1x2", "resume_g1_b1x4"):
        last = four_procs / "runs" / arm / "checkpoints" / "last.ckpt"
        assert scaling.series(json.loads((four_procs / "summary.json").read_text())["arms"][arm])  # it logged
        assert_same_weights(net_weights(last), final)  # the same 2 steps from the same state and data


@pytest.mark.slow
def test_hybrid_sharding_over_2_groups_gives_full_shardings_clipped_grad_norm_and_loss(four_procs):
    hybrid = json.loads((four_procs / "summary.json").read_text())["targets"]["hybrid"]
    assert hybrid["arm"] == "hybrid2_g4_b1" and hybrid["pass"] is True
    for row in hybrid["rows"]:  # step 1's loss follows step 0's clipped update
        assert row["grad_norm_full"] > CLIP  # clipped
        assert row["grad_norm_hybrid"] == pytest.approx(row["grad_norm_full"], rel=1e-5)
        assert row["loss_hybrid"] == pytest.approx(row["loss_full"], rel=1e-5)
    run = four_procs / "runs"
    assert "sharded over 4 ranks (hybrid" in (run / "hybrid2_g4_b1.log").read_text()
    assert (run / "hybrid2_g4_b1" / "train_node1.log").exists()  # the second group ran as node 1


def test_plan_runs_identical_arms_once_and_splits_the_global_batch():
    args = scaling.parse_args(["--gpus", "1", "2", "4", "8", "--out", "/nonexistent"])
    arms = {a.name: a for a in scaling.plan(args)}
    assert list(arms) == ["g1_b2x4", "g1_b2x4_twin", "g2_b2x2", "g4_b2", "g8_b1", "g1_b2", "g2_b2", "g8_b2",
                          "resume_g4_b2", "resume_g2_b2x2", "resume_g1_b2x4", "hybrid2_g8_b1"]
    assert arms["g4_b2"].roles == ["global", "pergpu"]  # 8 sequences over 4 GPUs = 2 per GPU
    assert {a.global_batch for n, a in arms.items() if "pergpu" not in a.roles} == {8}
    assert arms["resume_g1_b2x4"].after == "g8_b1" and arms["hybrid2_g8_b1"].nodes == 2
    overrides = scaling.train_overrides(arms["hybrid2_g8_b1"], args, Path("/o"))
    assert {"trainer.devices=4", "trainer.num_nodes=2", "trainer.strategy.sharding=hybrid",
            "module.total_steps=220", "trainer.max_steps=10", "model.d_model=1024"} <= set(overrides)
    resume = scaling.train_overrides(arms["resume_g2_b2x2"], args, Path("/o"))
    assert "ckpt_path=/o/runs/g8_b1/checkpoints/step000200.ckpt" in resume
    assert "callbacks.model_checkpoint.every_n_train_steps=200" in scaling.train_overrides(arms["g8_b1"], args,
                                                                                           Path("/o"))
    cpu_args = scaling.parse_args(["--cpu", "--gpus", "1", "2", "4", "--model", "1.5b"])
    cpu = scaling.train_overrides(arms["g1_b2"], cpu_args, Path("/o"))
    assert "model.d_model=32" in cpu and "model.activation_checkpointing=true" in cpu  # TINY, the 1.5B's knob


@pytest.mark.parametrize(("argv", "flag"), [(["--gpus", "3", "--global-batch", "4"], "--global-batch 4"),
                                            (["--gpus", "2", "2"], "--gpus"),
                                            (["--resume-steps", "0"], "--resume-steps"),
                                            (["--cpu", "--gpus", "1", "4", "--warmup", "0", "--resume-steps", "2"],
                                             "--resume-steps: step 2")])
def test_bad_arguments_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    assert flag in capsys.readouterr().err


def _fake_run(out: Path, arm, loss: dict[int, float], tokens: float, grad_norm: float = 2.0,
              args=None) -> None:
    folder = out / "runs" / arm.name / "csv"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train/loss", "train/grad_norm", "train/tokens_per_s"])
        for step, value in loss.items():
            w.writerow([step, value, grad_norm, tokens])
    scaling.write_json(scaling.record_path(out, arm), {**scaling.asdict(arm), "rc": 0, "wall_s": 1.0})


def test_verdicts_from_the_csv_logs(tmp_path):
    """Speed-ups against 3.6x / 7.0x, losses against the noise band, resume at step K, hybrid grad norms."""
    args = scaling.parse_args(["--gpus", "1", "4", "8", "--steps", "8", "--warmup", "0", "--window", "2",
                               "--resume-steps", "4", "--hybrid-steps", "2", "--out", str(tmp_path)])
    arms = {a.name: a for a in scaling.plan(args)}
    ref = {s: 5.0 - 0.25 * s for s in range(8)}
    tokens = {"g1_b2x4": 100.0, "g1_b2": 100.0, "g4_b2": 370.0, "g8_b2": 690.0}
    for name, arm in arms.items():
        if name.startswith("resume"):  # the source g8_b1 is at ref + 0.05; g1 leaves the band at step 7
            loss = {s: ref[s] + 0.051 + (0.5 if name == "resume_g1_b2x4" and s == 7 else 0.0) for s in range(4, 8)}
        elif name == "g1_b2x4_twin":
            loss = {s: v + 0.01 for s, v in ref.items()}
        elif name == "hybrid2_g8_b1":
            loss = {0: 5.05, 1: 4.8}
        else:
            loss = {s: v + (0.002 if name == "g4_b2" else 0.05 if name == "g8_b1" else 0.0) for s, v in ref.items()}
        _fake_run(tmp_path, arm, loss, tokens.get(name, 50.0), grad_norm=2.0001 if name.startswith("hybrid") else 2.0)
    t = scaling.analyse(list(arms.values()), args, tmp_path)["targets"]
    assert (t["speedup_4gpu"]["pass"], t["speedup_8gpu"]["pass"]) == (True, False)  # 3.7x, 6.9x
    assert t["speedup_4gpu"]["value"] == pytest.approx(3.7)
    rows = {(r["arm"], tuple(r["steps"])): r["pass"] for r in t["losses_in_band"]["rows"]}
    assert rows == {("g4_b2", (4, 5)): True, ("g4_b2", (6, 7)): True, ("g8_b1", (4, 5)): False,
                    ("g8_b1", (6, 7)): False}  # band 0.01 from step 4 (half the measured steps) on
    assert t["losses_in_band"]["pass"] is False
    resume = {r["arm"]: r["pass"] for r in t["resume"]["rows"]}
    assert resume == {"resume_g4_b2": True, "resume_g1_b2x4": False} and t["resume"]["pass"] is False
    assert t["hybrid"]["pass"] is True  # rel 5e-5 <= 1e-3
    md = scaling.markdown({**scaling.analyse(list(arms.values()), args, tmp_path),
                           "env": {"model": "355m", "cpu": False, "date": "d", "device": "x", "torch": "t",
                                   "lightning": "l", "command": "c"}, "args": vars(args)})
    assert "| tokens/s on 8 GPUs >= 7.0x 1 GPU (same per-GPU batch) | 6.90x | FAIL |" in md


def test_a_failed_node_stops_the_others_and_the_arms_resuming_it_are_not_run(tmp_path, monkeypatch):
    args = scaling.parse_args(["--cpu", "--gpus", "1", "2", "--out", str(tmp_path)])
    two_nodes = scaling.Arm("two_nodes", ["hybrid"], 2, 1, 1, 4, nodes=2)
    resumer = scaling.Arm("resumer", ["resume"], 1, 1, 2, 4, after="two_nodes")
    started = []

    def launch(arm, devices, args, out):  # node 0 fails at once, node 1 would wait for it for a minute
        started.append(arm.name)
        return [subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
                for code in ("import sys; sys.exit(3)", "import time; time.sleep(60)")]

    monkeypatch.setattr(scaling, "launch", launch)
    (tmp_path / "runs").mkdir()
    t0 = time.monotonic()
    scaling.run_all([two_nodes, resumer], args, tmp_path, capacity=2)
    assert time.monotonic() - t0 < 30 and started == ["two_nodes"]
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "arms").glob("*.json")}
    assert records["two_nodes"]["rc"] == 3
    assert records["resumer"]["rc"] is None and "two_nodes failed" in records["resumer"]["note"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known bug (issue 15 report): Lightning restores the checkpoint's count of "
                   "micro-batches and steps the optimizer when that count is a multiple of accumulate_grad_batches, "
                   "so a resume at another accumulation whose step K is not on a cycle boundary of the new one "
                   "(K x old accumulation not a multiple of the new) makes a short first step and shifts the data")
def test_resume_at_another_accumulation_off_its_cycle_is_exact(tmp_path):
    from hydra_utils import make_cfg

    from spla_lit.training.run import train

    train(make_cfg(["data.batch_size=4"], tmp_path / "source"))  # 4 steps, checkpoint at step 2 (2 micro-batches)
    ckpt = tmp_path / "source" / "checkpoints" / "step000002.ckpt"
    # the same 4 samples per step as 1 x 4 micro-batches: step 2 starts mid-cycle of the new accumulation
    train(make_cfg(["data.batch_size=1", "trainer.accumulate_grad_batches=4", f"ckpt_path={ckpt}"], tmp_path / "r"))
    assert_same_weights(net_weights(tmp_path / "r" / "checkpoints" / "last.ckpt"),
                        net_weights(tmp_path / "source" / "checkpoints" / "last.ckpt"))
