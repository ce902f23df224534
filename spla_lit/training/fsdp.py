"""FSDP2 through Lightning: :class:`FSDP2Strategy` (``trainer=fsdp``) and its atomic sharded checkpoints.

``trainer=ddp`` is Lightning's own ``DDPStrategy``; this strategy is a ``ModelParallelStrategy`` that applies
``fully_shard`` to the units :func:`~.parallelize.configure_model` hands it (the transformer blocks).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from ..options import check_choice
from .checkpoint_io import CheckpointError, verify_checkpoint, write_manifest

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                                  "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
Sharding = Literal["full", "hybrid"]
SHARDINGS: tuple[str, ...] = get_args(Sharding)


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; expected one of {', '.join(DTYPES)} or null")
    return DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning.

    Every rank is a data-parallel rank (no tensor parallelism). Each unit given to :meth:`shard` (a
    ``TransformerBlock``) is one FSDP unit (its parameters are all-gathered just before it runs and freed
    after); the embeddings, final norm and LM head form the root unit.

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

    def __init__(self, sharding: Sharding = "full", param_dtype: str | None = "auto",
                 reduce_dtype: str | None = "fp32", reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        check_choice("trainer.strategy.sharding", sharding, SHARDINGS)
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

    def shard(self, net: nn.Module, units: Sequence[nn.Module]) -> None:
        """``fully_shard`` each of ``units`` (submodules of ``net``), then ``net`` itself (the root unit)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not units:
            raise TypeError(f"{type(net).__name__} has no sharding unit (TransformerBlock) to shard")
        mesh = self.device_mesh["data_parallel"] if self.sharding == "full" else self.device_mesh
        mp = MixedPrecisionPolicy(param_dtype=self._resolved_param_dtype(),
                                  reduce_dtype=_dtype(self.reduce_dtype, "trainer.strategy.reduce_dtype"))
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # the root's parameters are needed again at once by the backward: keep them gathered
        fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        log.info("FSDP2: %d blocks + root sharded over %s ranks (%s, param dtype %s, reduce dtype %s)",
                 len(units), mesh.size(), self.sharding, mp.param_dtype, mp.reduce_dtype)

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
