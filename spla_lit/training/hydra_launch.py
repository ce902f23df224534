"""Hydra-safe launching of Lightning's DDP/FSDP child processes, and clean-up between the jobs of a multirun.

PATCH OF A PRIVATE LIGHTNING FUNCTION. Lightning's ``_SubprocessScriptLauncher`` starts ranks 1..N-1 of a
Hydra app with the command of ``lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd``
(re-exported there from ``lightning.fabric.strategies.launchers.subprocess_script``), looked up as a module
global at call time. :func:`install_hydra_launch_fix` replaces that global with :func:`hydra_subprocess_cmd`.
Written against Lightning 2.6.6 (:data:`WRITTEN_FOR_LIGHTNING`), where it is
``_hydra_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]`` (command, cwd).
``tests/training/test_hydra_launch.py`` fails if the function moves, changes signature or stops being called
by the launcher, and :func:`install_hydra_launch_fix` warns at run time in that case.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Iterator

import torch

WRITTEN_FOR_LIGHTNING = "2.6.6"
# The module global the launcher calls, and its parameters.
PATCHED_MODULE = "lightning.pytorch.strategies.launchers.subprocess_script"
PATCHED_NAME = "_hydra_subprocess_cmd"
PATCHED_PARAMETERS = ("local_rank",)

# Environment variables Lightning's launcher sets in the launching process itself: left behind, the next job
# of a Hydra multirun would see LOCAL_RANK and take its processes as launched externally (and hang).
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides the child command sets itself (or that would restart a sweep).
_CHILD_DROPS = ("hydra.run.dir", "hydra.job.name", "hydra.output_subdir", "hydra.mode", "hydra.sweep.dir",
                "hydra.sweep.subdir")
_CONFIG_FLAGS = ("--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd")


def hydra_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Command (and cwd) that Lightning's DDP launcher runs for rank ``local_rank`` of a Hydra job.

    Lightning's own version re-runs ``sys.argv``: in a multirun that holds ``-m`` and the whole sweep, so
    every child would start a sweep of its own, in another folder. This one runs exactly the current job:
    its resolved overrides, single-run mode, ``hydra.run.dir`` = the job's output folder (shared by all
    ranks), no second ``.hydra`` folder, and a per-rank log file name.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # keep --config-name/--config-path/... (with their values)
        if arg.split("=", 1)[0] in _CONFIG_FLAGS:
            command += [arg] if "=" in arg or i + 1 == len(argv) else [arg, argv[i + 1]]
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if o.split("=", 1)[0].lstrip("+~") not in _CHILD_DROPS]
    command += [f'hydra.run.dir="{hc.runtime.output_dir}"', f"hydra.job.name={hc.job.name}_rank{local_rank}",
                "hydra.output_subdir=null"]
    return command, get_original_cwd()


def launch_hook_problem() -> str | None:
    """Why the patch would not take effect with the installed Lightning (None: it does): the function is
    gone, its parameters changed, or the launcher no longer calls it by that module-global name."""
    import lightning

    where = f"Lightning {lightning.__version__} (spla's patch was written for {WRITTEN_FOR_LIGHTNING})"
    try:
        module = importlib.import_module(PATCHED_MODULE)
    except ImportError:
        return f"{PATCHED_MODULE} is gone in {where}"
    original = getattr(module, PATCHED_NAME, None)
    if original is None:
        return f"{PATCHED_MODULE}.{PATCHED_NAME} is gone in {where}"
    parameters = tuple(inspect.signature(original).parameters)
    if parameters != PATCHED_PARAMETERS:
        return f"{PATCHED_MODULE}.{PATCHED_NAME} takes {parameters}, not {PATCHED_PARAMETERS}, in {where}"
    launcher = getattr(module, "_SubprocessScriptLauncher", None)
    call_site = getattr(launcher, "_call_children_scripts", None)
    if call_site is None or PATCHED_NAME not in call_site.__code__.co_names:
        return f"_SubprocessScriptLauncher._call_children_scripts no longer calls {PATCHED_NAME} in {where}"
    return None


def install_hydra_launch_fix() -> None:
    """Make Lightning's subprocess launcher use :func:`hydra_subprocess_cmd` (idempotent). If the installed
    Lightning no longer has the patched function, warn: a multirun with ``trainer=ddp|fsdp`` could then
    start a whole sweep in every child process."""
    problem = launch_hook_problem()
    if problem is not None:
        warnings.warn(f"spla cannot patch Lightning's Hydra launcher: {problem}; multiruns with several "
                      "processes per job may relaunch the whole sweep in each child", stacklevel=2)
        return
    setattr(importlib.import_module(PATCHED_MODULE), PATCHED_NAME, hydra_subprocess_cmd)


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Run one training job; afterwards destroy the process group it created and restore the launch
    environment variables, so that the next job of a multirun (or of a notebook) starts clean."""
    was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    ok = False
    try:
        yield
        ok = True
    finally:
        if not was_initialized and torch.distributed.is_available() and torch.distributed.is_initialized():
            if ok:  # after a failure some ranks may be gone: no barrier then
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
