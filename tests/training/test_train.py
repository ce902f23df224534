"""End to end: training, exact resume, reproducibility, the NaN stop, atomic checkpoints, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ckpt_weights import assert_same_weights, net_weights
from hydra_utils import ROOT, make_cfg

from spla_lit.training import LMModule, NonFiniteLossError
from spla_lit.training.checkpoint_io import atomic_torch_save
from spla_lit.training.run import train


@pytest.mark.slow
def test_training_reduces_loss_and_writes_logs_and_checkpoints(tmp_path):
    metrics = train(make_cfg(["trainer.max_steps=12", "trainer.val_check_interval=6", "optim.lr=1e-2"], tmp_path))
    assert metrics["global_step"] == 12
    assert metrics["train/loss"] < 4.5  # from ln(128) = 4.85 at init: it learns the token statistics
    assert "val/loss" in metrics and "val/answer_acc" in metrics and "train/rla/residual_share" in metrics
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "step000006.ckpt", "step000012.ckpt"} <= ckpts
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["spla_config"]["scorer"]["method"] == "taylor2"  # eval.py rebuilds the model from this


@pytest.mark.slow
def test_resume_continues_at_the_exact_step_and_data(tmp_path):
    full = tmp_path / "full"
    train(make_cfg(["trainer.max_steps=6", "trainer.val_check_interval=3", "scorer=random"], full))
    half = full / "checkpoints" / "step000003.ckpt"
    resumed = tmp_path / "resumed"
    train(make_cfg(["trainer.max_steps=6", "trainer.val_check_interval=3", "scorer=random", f"ckpt_path={half}"],
                   resumed))
    assert_same_weights(net_weights(full / "checkpoints" / "last.ckpt"),
                        net_weights(resumed / "checkpoints" / "last.ckpt"), rtol=0, atol=0)
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


@pytest.mark.slow
def test_same_seed_reproduces_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        train(make_cfg(["trainer.max_steps=3", f"seed={seed}"], tmp_path / name))
        runs[name] = net_weights(tmp_path / name / "checkpoints" / "last.ckpt")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = LMModule._loss

    def poisoned(self, logits, labels):
        loss = real_loss(self, logits, labels)
        return loss * float("nan") if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(LMModule, "_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(make_cfg(["trainer.max_steps=8", "trainer.val_check_interval=2"], tmp_path))
    good = tmp_path / "checkpoints" / "step000002.ckpt"
    assert good.exists() and not (tmp_path / "checkpoints" / "step000004.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in net_weights(good).values())
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_nan_loss_of_one_micro_batch_stops_an_accumulated_step(tmp_path, monkeypatch):
    real_loss = LMModule._loss
    calls = []

    def poisoned(self, logits, labels):
        loss = real_loss(self, logits, labels)
        if self.training:
            calls.append(self.global_step)
            if self.global_step == 2 and calls.count(2) == 1:  # the first of step 2's two micro-batches
                return loss * float("inf")
        return loss

    monkeypatch.setattr(LMModule, "_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="training loss is inf at step 2"):
        train(make_cfg(["trainer.max_steps=4", "trainer.accumulate_grad_batches=2"], tmp_path))
    assert calls.count(2) == 2  # stopped after the step's last micro-batch, before its optimizer step


@pytest.mark.slow
def test_train_loss_is_the_mean_of_the_accumulated_micro_batches(tmp_path, monkeypatch):
    real_loss = LMModule._loss
    seen: dict[int, list[float]] = {}

    def recording(self, logits, labels):
        loss = real_loss(self, logits, labels)
        if self.training:
            seen.setdefault(self.global_step, []).append(float(loss.detach()))
        return loss

    monkeypatch.setattr(LMModule, "_loss", recording)
    metrics = train(make_cfg(["trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                              "trainer.val_check_interval=3"], tmp_path))
    assert [len(v) for v in seen.values()] == [2, 2, 2]
    assert metrics["train/loss"] == pytest.approx(sum(seen[2]) / 2, rel=1e-6)


def test_inf_gradient_stops_with_the_step(tmp_path, monkeypatch):
    def poison_grad(self):
        if self.global_step == 1:
            next(p for p in self.net.parameters() if p.grad is not None).grad[0] = float("inf")

    monkeypatch.setattr(LMModule, "on_after_backward", poison_grad, raising=False)
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 1"):
        train(make_cfg(["trainer.max_steps=3"], tmp_path))


@pytest.mark.slow
def test_clipping_by_the_shared_norm_matches_lightnings_clipping(tmp_path, monkeypatch):
    """Clipping reuses the norm of the finiteness check: the same update as Lightning's own clipping."""
    cli = ["trainer.max_steps=3", "trainer.gradient_clip_val=0.05", "trainer.val_check_interval=3"]
    train(make_cfg(cli, tmp_path / "ours"))
    monkeypatch.setattr(LMModule, "configure_gradient_clipping",
                        LMModule.__mro__[1].configure_gradient_clipping)
    train(make_cfg(cli, tmp_path / "lightning"))
    a = net_weights(tmp_path / "ours" / "checkpoints" / "last.ckpt")
    b = net_weights(tmp_path / "lightning" / "checkpoints" / "last.ckpt")
    assert_same_weights(a, b, rtol=1e-6, atol=1e-7)
    unclipped = tmp_path / "unclipped"
    train(make_cfg(["trainer.max_steps=3", "trainer.gradient_clip_val=null", "trainer.val_check_interval=3"],
                   unclipped))
    c = net_weights(unclipped / "checkpoints" / "last.ckpt")
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the clipping was active


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


TINY_CLI = ["data.seq_len=128", "data.vocab_size=128", "data.batch_size=2", "data.val_samples=2",
            "model.d_model=32", "model.n_layers=1", "sparse.block_size=16", "sparse.topk=3",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_cli_run_writes_config_logs_and_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *TINY_CLI, f"paths.log_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_cli_multirun_gives_each_job_its_own_directory(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "scorer=taylor2,random", "rla=none", *TINY_CLI,
                           f"paths.log_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_spla_taylor2_topk_none", "1_spla_random_topk_none"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_logger_none_trains_without_tensorboard(tmp_path):
    metrics = train(make_cfg(["logger=none", "trainer.max_steps=2"], tmp_path))
    assert metrics["global_step"] == 2 and not (tmp_path / "tensorboard").exists()
