"""Scale-out pieces: the FSDP2 strategy, ``torch.compile`` of the blocks, Hydra-safe launching, clean-up.

Everything runs through Lightning: ``trainer=ddp`` is Lightning's ``DDPStrategy``, ``trainer=fsdp`` is
:class:`FSDP2Strategy`, a ``ModelParallelStrategy`` that applies ``fully_shard`` per transformer block in
``LMModule.configure_model`` (see :func:`configure_model`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from .checkpoint_io import CheckpointError, verify_checkpoint, write_manifest

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                                  "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
SHARDINGS = ("full", "hybrid")


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; expected one of {', '.join(DTYPES)} or null")
    return DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning.

    Every rank is a data-parallel rank (no tensor parallelism). Each ``TransformerBlock`` is one FSDP unit
    (its parameters are all-gathered just before it runs and freed after); the embeddings, final norm
    and LM head form the root unit.

    Args:
        sharding: ``full`` shards every parameter over all ranks; ``hybrid`` shards within a node and
            replicates across nodes (HSDP: all-gathers stay on the node's NVLink, only gradients cross nodes).
        param_dtype: dtype parameters are all-gathered and computed in (``MixedPrecisionPolicy``); ``auto``
            is bf16 when the trainer's precision is bf16 (``bf16-mixed``), else the parameters' own (fp32).
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps bf16 runs' gradients exact to fp32).
        reshard_after_forward: free a block's gathered parameters after its forward (ZeRO-3, less memory);
            false keeps them until its backward (less communication).
        save_distributed_checkpoint: a checkpoint is a folder with one shard file per rank (resumable on any
            number of ranks; ``python -m spla_lit.training.consolidate`` makes one file of it); false
            gathers a single file on rank 0.
        Other arguments: as ``ModelParallelStrategy``.
    """

    def __init__(self, sharding: str = "full", param_dtype: str | None = "auto", reduce_dtype: str | None = "fp32",
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        if sharding not in SHARDINGS:
            raise ValueError(f"trainer.strategy.sharding: expected one of {', '.join(SHARDINGS)}, got {sharding!r}")
        if param_dtype != "auto":
            _dtype(param_dtype, "trainer.strategy.param_dtype")
        _dtype(reduce_dtype, "trainer.strategy.reduce_dtype")
        self.sharding, self.param_dtype, self.reduce_dtype = sharding, param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" mesh is (nodes, devices per node) with a tensor-parallel inner dim;
        # we run data parallel only, so the mesh is (1 replica group x world) or (nodes x devices) for HSDP.
        if self.sharding == "full":
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        else:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes, self.num_processes
        super().setup_environment()

    def _resolved_param_dtype(self) -> torch.dtype | None:
        if self.param_dtype == "auto":
            precision = str(getattr(self.precision_plugin, "precision", ""))
            return torch.bfloat16 if precision.startswith("bf16") else None
        return _dtype(self.param_dtype, "trainer.strategy.param_dtype")

    def shard(self, net: nn.Module) -> None:
        """``fully_shard`` each transformer block of ``net``, then ``net`` itself (the root unit)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"] if self.sharding == "full" else self.device_mesh
        mp = MixedPrecisionPolicy(param_dtype=self._resolved_param_dtype(),
                                  reduce_dtype=_dtype(self.reduce_dtype, "trainer.strategy.reduce_dtype"))
        blocks = sharding_units(net)
        if not blocks:
            raise TypeError(f"{type(net).__name__} has no TransformerBlock to shard")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # the root's parameters are needed again at once by the backward: keep them gathered
        fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        log.info("FSDP2: %d blocks + root sharded over %s ranks (%s, param dtype %s, reduce dtype %s)",
                 len(blocks), mesh.size(), self.sharding, mp.param_dtype, mp.reduce_dtype)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Write the shard folder next to ``filepath`` first and swap it in once every rank is done, so
        an interrupted save never leaves a half-written checkpoint under the final name."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier("fsdp2_save_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("fsdp2_save_written")
        if self.is_global_zero:
            write_manifest(partial)  # the shards' checksums, verified by load_checkpoint and consolidate
            swap_in(partial, path)
        self.barrier("fsdp2_save_done")

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the checkpoint on rank 0 (checksums, stored config: ``checkpoint_io``), then load it."""
        error = self.broadcast(verify_checkpoint(checkpoint_path) if self.is_global_zero else None)
        if error:
            raise CheckpointError(error)
        return super().load_checkpoint(checkpoint_path, weights_only)


def swap_in(new: Path, path: Path) -> None:
    """Replace ``path`` (file or folder, if any) by ``new``; at worst a crash leaves ``.<name>.old``."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def sharding_units(net: nn.Module) -> list[nn.Module]:
    """The modules sharded (and compiled) one by one: the transformer blocks."""
    from ..models.transformer import TransformerBlock

    return [m for m in net.modules() if isinstance(m, TransformerBlock)]


def writes_single_file(strategy: Strategy | str | None) -> bool:
    """Whether ``strategy`` saves checkpoints as one file through the ``CheckpointIO`` plugin (so the atomic
    plugin applies); sharded strategies write folders themselves."""
    if isinstance(strategy, ModelParallelStrategy):
        return not strategy._save_distributed_checkpoint
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return strategy._state_dict_type == "full"
    if isinstance(strategy, DeepSpeedStrategy):
        return False
    return not (isinstance(strategy, str) and strategy.startswith(("fsdp", "deepspeed")))


# ----------------------------------------------------------------------------------------------- compile


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` of each transformer block (``trainer.compile*`` in the config).

    ``fullgraph=True`` makes any graph break an error (use it where a block must compile whole, e.g. the
    dense baseline); otherwise breaks are allowed and reported by :class:`~.callbacks.CompileReport`.
    """

    mode: str | None = None
    fullgraph: bool = False
    backend: str = "inductor"
    dynamic: bool | None = None


def compile_blocks(net: nn.Module, options: CompileOptions) -> int:
    """Compile every transformer block of ``net`` in place (``Module.compile``: parameter names, state
    dicts and checkpoints are unchanged). Returns the number of blocks compiled."""
    blocks = sharding_units(net)
    # Forget code compiled by an earlier run in this process (a multirun, a notebook): its cached graphs
    # would be reused without re-checking fullgraph.
    torch._dynamo.reset()
    for block in blocks:
        block.compile(backend=options.backend, mode=options.mode, fullgraph=options.fullgraph,
                      dynamic=options.dynamic)
    log.info("torch.compile: %d blocks (backend=%s, mode=%s, fullgraph=%s)", len(blocks), options.backend,
             options.mode, options.fullgraph)
    return len(blocks)


def configure_model(module: Any) -> None:
    """``LightningModule.configure_model`` for the LM: compile the blocks (if asked), then shard them (under
    :class:`FSDP2Strategy`). Idempotent: Lightning calls the hook again on every ``fit``/``validate``."""
    net = module.net
    if getattr(net, "_spla_configured", False):
        return
    options: CompileOptions | None = getattr(module, "compile_options", None)
    if options is not None:
        compile_blocks(net, options)  # before fully_shard: the order torch recommends (AC, compile, FSDP)
    strategy = module._trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, FSDP2Strategy):
        strategy.shard(net)
    elif isinstance(strategy, ModelParallelStrategy):
        raise TypeError("use spla_lit.training.distributed.FSDP2Strategy (trainer=fsdp) to shard the LM; "
                        "a plain ModelParallelStrategy does not know how to parallelize it")
    net._spla_configured = True


# ------------------------------------------------------------------------------------------- launching

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


def install_hydra_launch_fix() -> None:
    """Make Lightning's subprocess launcher use :func:`hydra_subprocess_cmd` (idempotent)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_subprocess_cmd


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
