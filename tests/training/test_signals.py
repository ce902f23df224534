"""Ctrl-C and SIGTERM finish the optimizer step, write a checkpoint, log its path and exit with 128 + signal;
resuming from it continues exactly (the same weights and losses as a run never interrupted). Lightning's
SLURM requeue handler stays in place."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra_utils import ROOT, make_cfg

from spla_lit.training import GracefulStop, TrainingInterrupted
from spla_lit.training.run import build, make_trainer, train

TINY = ["data.seq_len=128", "data.vocab_size=128", "data.batch_size=2", "data.val_samples=2", "model.d_model=32",
        "model.n_layers=1", "sparse.block_size=16", "sparse.topk=3", "trainer.max_steps=30",
        "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "optim.warmup_steps=2", "scorer=random"]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def _losses(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _interrupt(run: Path, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``train.py`` in ``run``, send ``signum`` once it wrote its first checkpoint, wait for the exit."""
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"hydra.run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "step000004.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), signum


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, signum):
    interrupted = tmp_path / "interrupted"
    proc, _ = _interrupt(interrupted, signum)
    assert proc.returncode == 128 + signum, proc.stdout[-3000:]
    last = interrupted / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 4 <= step < 30
    assert f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint: {last}" in proc.stdout
    assert "Traceback" not in proc.stdout and not list(interrupted.rglob("*.tmp"))
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM from here on; the exact resume is checked once
    resumed, full = tmp_path / "resumed", tmp_path / "full"
    for run, extra in ((resumed, [f"ckpt_path={last}"]), (full, [])):
        done = subprocess.run([sys.executable, "train.py", *TINY, *extra, f"hydra.run.dir={run}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(full / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    after = {s: v for s, v in full_losses.items() if s >= step}  # Lightning logs step s + 1 at s
    assert after and {s: resumed_losses[s] for s in after} == after
    assert _losses(interrupted) == {s: v for s, v in full_losses.items() if s < step}


class _Probe(L.Callback):
    """Sends itself ``signum`` at ``at_step`` and records the signal handlers in place during training."""

    def __init__(self, signum: int | None = None, at_step: int = 1) -> None:
        self.signum, self.at_step, self.handlers = signum, at_step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        if self.signum and trainer.global_step == self.at_step:
            signal.raise_signal(self.signum)


def _fit(cfg, probe: _Probe):
    datamodule, module = build(cfg)
    trainer = make_trainer(cfg, module)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    return trainer, next(c for c in trainer.callbacks if isinstance(c, GracefulStop))


def test_in_process_stop_keeps_lightnings_slurm_requeue_handler(tmp_path, monkeypatch):
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "123", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    probe = _Probe(signal.SIGTERM, at_step=2)
    trainer, stop = _fit(make_cfg(["trainer.max_steps=6", "trainer.val_check_interval=3"], tmp_path), probe)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    requeue = probe.handlers[signal.SIGUSR1]
    assert any(getattr(h, "__name__", "") == "_slurm_sigusr_handler_fn" for h in requeue.signal_handlers)
    assert probe.handlers[signal.SIGTERM].__qualname__.startswith("GracefulStop")
    assert probe.handlers[signal.SIGINT].__qualname__.startswith("GracefulStop")
    assert isinstance(stop.interrupted, TrainingInterrupted) and stop.interrupted.step == 3  # its step finished
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert {s: signal.getsignal(s) for s in before} == before  # restored after training


def test_run_raises_training_interrupted_and_a_second_ctrl_c_aborts(tmp_path, monkeypatch):
    real = GracefulStop.on_train_batch_end

    def twice(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2 and not self.received:
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: at once, no checkpoint
            self.on_train_start(trainer, pl_module)  # (re-arm for the rest of this test)
            self.received = signal.SIGINT
        real(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(GracefulStop, "on_train_batch_end", twice)
    with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGINT at step 3; checkpoint: .*last\.ckpt") as e:
        train(make_cfg(["trainer.max_steps=6", "trainer.val_check_interval=3"], tmp_path))
    assert e.value.signum == signal.SIGINT and Path(e.value.checkpoint).exists()
