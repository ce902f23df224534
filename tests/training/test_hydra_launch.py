"""The patch of Lightning's private Hydra launch command (``spla_lit/training/hydra_launch.py``).

These tests fail when a Lightning upgrade moves the patched function, changes its signature or stops calling
it from the launcher, so CI catches it rather than a user's multirun relaunching its sweep in every child.
"""

from __future__ import annotations

import inspect
import sys

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra_utils import make_cfg
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.strategies.launchers import subprocess_script as fabric_script
from lightning.pytorch.strategies.launchers import subprocess_script
from omegaconf import open_dict, read_write

from spla_lit.training import hydra_launch
from spla_lit.training.hydra_launch import hydra_subprocess_cmd, install_hydra_launch_fix, launch_hook_problem


def test_lightning_still_defines_the_patched_function_with_its_signature():
    original = fabric_script._hydra_subprocess_cmd  # defined there, re-exported where the launcher calls it
    assert subprocess_script._hydra_subprocess_cmd in (original, hydra_subprocess_cmd)
    assert list(inspect.signature(original).parameters) == ["local_rank"]
    assert list(inspect.signature(hydra_subprocess_cmd).parameters) == ["local_rank"]
    assert launch_hook_problem() is None


def test_lightnings_launcher_takes_the_child_command_from_the_patched_global(monkeypatch):
    """Lightning's own child-spawning code, with ``Popen`` faked: under Hydra, rank k's command and cwd come
    from the module global that :func:`install_hydra_launch_fix` replaces."""
    asked, spawned = [], []

    def child_command(local_rank):
        asked.append(local_rank)
        return ["child", str(local_rank)], "/job/cwd"

    class Popen:
        def __init__(self, command, env, cwd):
            spawned.append((command, cwd, env["LOCAL_RANK"]))

    for key in hydra_launch._LAUNCH_ENV:  # the launcher sets them in this process: restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(subprocess_script, "_hydra_subprocess_cmd", child_command)
    monkeypatch.setattr(subprocess_script.subprocess, "Popen", Popen)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    launcher = subprocess_script._SubprocessScriptLauncher(LightningEnvironment(), num_processes=3, num_nodes=1)
    launcher._call_children_scripts()
    assert asked == [1, 2]
    assert spawned == [(["child", "1"], "/job/cwd", "1"), (["child", "2"], "/job/cwd", "2")]


def test_install_replaces_the_global_and_warns_when_lightning_changed(monkeypatch):
    monkeypatch.setattr(subprocess_script, "_hydra_subprocess_cmd", fabric_script._hydra_subprocess_cmd)
    install_hydra_launch_fix()
    assert subprocess_script._hydra_subprocess_cmd is hydra_subprocess_cmd
    install_hydra_launch_fix()  # idempotent
    assert subprocess_script._hydra_subprocess_cmd is hydra_subprocess_cmd

    def renamed(rank):
        return [], ""

    monkeypatch.setattr(subprocess_script, "_hydra_subprocess_cmd", renamed)
    with pytest.warns(UserWarning, match=r"takes \('rank',\).*written for 2\.6\.6"):
        install_hydra_launch_fix()
    assert subprocess_script._hydra_subprocess_cmd is renamed  # nothing patched blindly
    monkeypatch.delattr(subprocess_script, "_hydra_subprocess_cmd")
    with pytest.warns(UserWarning, match="is gone"):
        install_hydra_launch_fix()


def test_child_command_reruns_the_current_job_only(monkeypatch, tmp_path):
    """A multirun job's child: its own overrides, single-run mode in the job's folder, a per-rank log name;
    no ``-m``, no sweep settings, no second ``.hydra`` folder."""
    cfg = make_cfg(["trainer=ddp", "sparse.topk=4", "hydra.sweep.dir=/sweeps/x"], tiny=False)
    with read_write(cfg.hydra), open_dict(cfg.hydra):  # what Hydra fills in when it runs the job
        cfg.hydra.runtime.output_dir, cfg.hydra.runtime.cwd = str(tmp_path / "job"), str(tmp_path)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["/src/train.py", "-m", "--config-name", "train", "trainer=ddp,fsdp"])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    command, cwd = hydra_subprocess_cmd(2)
    assert command == [sys.executable, "/src/train.py", "--config-name", "train", "trainer=ddp", "sparse.topk=4",
                       f'hydra.run.dir="{tmp_path / "job"}"', "hydra.job.name=train_rank2", "hydra.output_subdir=null"]
    assert cwd == str(tmp_path)
