"""Scale-out on the CPU (gloo): DDP and FSDP2 over 2 processes match one process with the same global batch;
sharded checkpoints resume on another number of processes and consolidate into a normal file; a Hydra
multirun launches each distributed job once, in its own folder (``hydra_launch.py``); the strategy's
arguments and its atomic folder swap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_weights import assert_same_weights, net_weights
from hydra.utils import instantiate
from hydra_utils import ROOT, TINY, make_cfg
from omegaconf import OmegaConf

from spla_lit.training.consolidate import is_sharded_checkpoint
from spla_lit.training.consolidate import main as consolidate_main
from spla_lit.training.fsdp import FSDP2Strategy, swap_in, writes_single_file
from spla_lit.training.run import train

# 2 processes x batch 1 vs 1 process x batch 2: the data module shards indices with stride 2, so both see
# samples {2s, 2s + 1} at step s.
TWO_PROCS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "data.batch_size=1"]
ONE_PROC_FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, batch 2, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    metrics = train(make_cfg(["data.batch_size=2"], out))
    assert "train/tflops_per_device" in metrics and "train/mfu" not in metrics  # no known peak on the CPU
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python train.py -m trainer=ddp,fsdp` on 2 CPU processes each: one sweep, two distributed jobs."""
    logs = tmp_path_factory.mktemp("logs")
    proc = subprocess.run([sys.executable, "train.py", "-m", "trainer=ddp,fsdp", *TINY, *TWO_PROCS,
                           f"paths.log_dir={logs}"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1  # no child sweeps
    (sweep_dir,) = (logs / "train" / "multiruns").iterdir()
    assert not (logs / "train" / "runs").exists()  # children ran in the job's folder, not a run folder of their own
    return sweep_dir


@pytest.mark.slow
def test_multirun_launches_each_distributed_job_once_in_its_own_folder(sweep):
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_spla_taylor2_topk_subtract", "1_spla_taylor2_topk_subtract"]
    for job, trainer in zip(jobs, ["ddp", "fsdp"]):
        assert f"trainer={trainer}" in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        assert (sweep / job / "train_rank1.log").exists()  # rank 1 ran this very job, here
        assert not list((sweep / job).rglob("multirun.yaml"))


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(sweep, reference):
    ref_loss = _scalars(reference, "train/loss")
    ref_weights = net_weights(reference / "checkpoints" / "last.ckpt")
    for job in ("0_spla_taylor2_topk_subtract", "1_spla_taylor2_topk_subtract"):
        loss = _scalars(sweep / job, "train/loss")  # the mean over ranks: the global batch's loss
        assert sorted(loss) == sorted(ref_loss) == [0, 1, 2, 3]
        for step in ref_loss:
            assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), (job, step)
        # the clipping norm: FSDP's sharded gradients reduced over their mesh, DDP's all-reduced ones local
        norm, ref_norm = _scalars(sweep / job, "train/grad_norm"), _scalars(reference, "train/grad_norm")
        assert sorted(norm) == sorted(ref_norm) == [0, 1, 2, 3]
        for step in ref_norm:
            assert norm[step] == pytest.approx(ref_norm[step], rel=1e-5), (job, step)
        assert_same_weights(net_weights(sweep / job / "checkpoints" / "last.ckpt"), ref_weights)
        assert _scalars(sweep / job, "train/tokens_per_s")
    # DDP writes one file (atomic plugin), FSDP a folder with one shard per rank
    assert (sweep / "0_spla_taylor2_topk_subtract" / "checkpoints" / "last.ckpt").is_file()
    sharded = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    assert is_sharded_checkpoint(sharded) and len(list(sharded.glob("*.distcp"))) == 2
    assert not list(sharded.parent.glob(".*"))  # no partial or old folders left behind


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_process_at_the_exact_step(sweep, reference, tmp_path):
    ckpt = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    train(make_cfg([*ONE_PROC_FSDP, "data.batch_size=2", f"ckpt_path={ckpt}"], tmp_path))
    assert not torch.distributed.is_initialized()  # the job cleaned up its process group
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 4
    assert_same_weights(net_weights(tmp_path / "checkpoints" / "last.ckpt"),
                        net_weights(reference / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_consolidated_checkpoint_loads_and_resumes_in_the_normal_path(sweep, reference, tmp_path):
    src = sweep / "1_spla_taylor2_topk_subtract" / "checkpoints" / "step000002.ckpt"
    out = tmp_path / "step2.ckpt"
    assert consolidate_main([str(src), str(out)]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors and containers only
    ref = torch.load(reference / "checkpoints" / "step000002.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["spla_config"]["model"] == ref["spla_config"]["model"]
    net = instantiate(OmegaConf.create(ckpt["spla_config"]["model"]))  # as eval rebuilds it
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items()})
    assert_same_weights(net_weights(out), net_weights(reference / "checkpoints" / "step000002.ckpt"))
    # and it resumes at the exact step on one device, without any distributed strategy
    train(make_cfg(["data.batch_size=2", f"ckpt_path={out}"], tmp_path / "resumed"))
    assert_same_weights(net_weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
                        net_weights(reference / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_resume_with_another_global_batch_warns(reference, tmp_path):
    ckpt = reference / "checkpoints" / "step000002.ckpt"
    with pytest.warns(UserWarning, match="samples per optimizer step"):
        train(make_cfg(["data.batch_size=1", "trainer.max_steps=3", f"ckpt_path={ckpt}"], tmp_path))


@pytest.mark.parametrize(("kwargs", "key"), [({"sharding": "zero3"}, "trainer.strategy.sharding"),
                                             ({"param_dtype": "int8"}, "trainer.strategy.param_dtype"),
                                             ({"reduce_dtype": "bf17"}, "trainer.strategy.reduce_dtype")])
def test_strategy_arguments_are_checked_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        FSDP2Strategy(**kwargs)


def test_only_single_file_strategies_get_the_atomic_checkpoint_plugin():
    assert writes_single_file("auto") and writes_single_file("ddp") and writes_single_file(None)
    assert not writes_single_file("fsdp") and not writes_single_file("deepspeed_stage_3")
    assert not writes_single_file(FSDP2Strategy())  # writes its shard folder itself (atomically: swap_in)
    assert writes_single_file(FSDP2Strategy(save_distributed_checkpoint=False))


def test_swap_in_replaces_a_folder_or_a_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "last.ckpt"
    for old_kind, new_kind in [(None, "dir"), ("dir", "dir"), ("dir", "file"), ("file", "dir")]:
        new = tmp_path / ".last.ckpt.partial"
        if new_kind == "dir":
            new.mkdir()
            (new / "shard.distcp").write_text(f"replaces {old_kind}")
        else:
            new.write_text(f"replaces {old_kind}")
        swap_in(new, path)
        text = (path / "shard.distcp" if new_kind == "dir" else path).read_text()
        assert text == f"replaces {old_kind}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
