"""What a newcomer sees: the HPARAMS tab, a progress bar in steps, a clean console, config warnings, and no
run folder left by a rejected config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra_utils import ROOT, make_cfg

from spla_lit.config import config_warnings
from spla_lit.training import StepProgressBar
from spla_lit.training.run import build, discard_rejected_run, make_trainer, train


def _event_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_hparams_tab_lists_the_runs_knobs_against_its_final_validation_metrics(tmp_path):
    from tensorboard.plugins.hparams import metadata

    metrics = train(make_cfg(["trainer.max_steps=4", "trainer.val_check_interval=2", "sparse.topk=4"], tmp_path))
    acc = _event_accumulator(tmp_path / "tensorboard")
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {"hp/val_loss", "hp/val_ppl", "hp/val_answer_acc",
                                                             "hp/val_exact_match", "hp/global_step"}
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert hparams["attention"] == "SPLAAttention" and hparams["sparse.topk"] == 4 and hparams["seed"] == 1234
    (final,) = acc.Scalars("hp/val_loss")
    assert final.value == pytest.approx(metrics["val/loss"])


def _cfg_with_progress_bar(tmp_path, *overrides):
    return make_cfg(["data.seq_len=128", "data.batch_size=2", "data.vocab_size=128", "data.val_samples=2",
                     "model.d_model=32", "model.n_layers=1", "sparse.block_size=16", "sparse.topk=3",
                     "trainer.val_check_interval=2", "optim.warmup_steps=2", "logger=none", *overrides],
                    tmp_path, tiny=False)


def _fit(cfg):
    datamodule, module = build(cfg)
    trainer = make_trainer(cfg, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return trainer


def test_progress_bar_counts_optimizer_steps_out_of_max_steps_also_after_a_resume(tmp_path):
    trainer = _fit(_cfg_with_progress_bar(tmp_path / "a", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2"))
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (4, 4) and task.description.strip().endswith("Step")
    resumed = _fit(_cfg_with_progress_bar(tmp_path / "b", "trainer.max_steps=6", "trainer.accumulate_grad_batches=2",
                                          f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'step000002.ckpt'}"))
    task = resumed.progress_bar_callback.train_progress_bar
    assert (task.completed, task.total) == (6, 6)  # was "40/19": batches of the epoch against steps left


@pytest.mark.slow
def test_the_console_shows_steps_and_no_noise(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "data.seq_len=128", "data.vocab_size=128", "data.val_samples=2",
                           "model.d_model=32", "model.n_layers=1", "sparse.block_size=16", "sparse.topk=3",
                           "trainer.max_steps=3", "trainer.val_check_interval=3", f"paths.log_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Step" in out and "3/3" in out  # the progress bar, in steps
    assert "Epoch 0/-2" not in out and "Total FLOPs" not in out  # Lightning's own bar and summary said these
    assert "Training FLOPs per sequence of 128 tokens" in out
    assert "tokens/s and TFLOP/s are logged" in out  # the MFU note, whole
    for noise in ("weights_only` was not set", "litlogger", "limit_val_batches", "LeafSpec", "Warning"):
        assert noise not in out, noise


def test_config_warnings_name_the_key(tmp_path):
    assert config_warnings(make_cfg(["data.seq_len=128", "sparse.block_size=16", "sparse.topk=7"])) == []
    (message,) = config_warnings(make_cfg(["data.seq_len=128", "sparse.block_size=16", "sparse.topk=8"]))
    assert message.startswith("sparse.topk: 8 is at least the 8 key blocks of data.seq_len=128")
    gpu = ["trainer=gpu"]
    assert config_warnings(make_cfg(gpu)) == []  # the defaults run on the kernels
    for overrides, start in [(["scorer=random"], "scorer.method=random: the fused block selection kernel declines"),
                             (["scorer=oracle"], "scorer.method=oracle:"),
                             (["scorer.covariance=full"], "scorer.covariance=full:"),
                             (["sparse.query_block=2"], "sparse.query_block > 1:"),
                             (["rla.feature_map=taylor", "model.head_dim=16"],
                              "rla.feature_map: taylor at head dim 16 gives 273 features"),
                             (["rla=explicit"], "rla.mode: explicit reads every unselected block")]:
        (message,) = config_warnings(make_cfg(gpu + overrides))
        assert message.startswith(start), message
        assert config_warnings(make_cfg(gpu + overrides + ["impl=reference"])) == []  # asked for: no warning
        assert config_warnings(make_cfg(overrides)) == []  # on the CPU the reference runs anyway


def test_a_config_rejected_before_building_leaves_nothing(tmp_path):
    logs = tmp_path / "logs"
    run = logs / "train" / "runs" / "2026-01-01_00-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}")
    (run / "train.log").write_text("invalid config: ...")
    discard_rejected_run(run, logs)
    assert not logs.exists()
    (run / "tensorboard").mkdir(parents=True)  # a run that wrote something of its own is kept
    discard_rejected_run(run, logs)
    assert (run / "tensorboard").exists()
    discard_rejected_run(tmp_path / "elsewhere", logs)  # never outside log_dir
    assert (run / "tensorboard").exists()
