"""Map-style dataset and Lightning DataModule over the generated task mixture (no downloads).

Sample ``i`` of a dataset is a pure function of ``(seed, i)``: it is generated on the fly from a numpy
Generator seeded with ``[seed, i]``, so any index can be produced in any order, by any worker, and the
data order of a run is reproducible (and resumable from an index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .tasks import TASKS, Sample, Task, make_task
from .vocab import Vocab

DEFAULT_MIXTURE = {"niah": 0.4, "mqar": 0.3, "variable_tracking": 0.3}
# Validation samples use seed + VAL_SEED_OFFSET: a stream disjoint from the training one (seeds are
# [seed, index] entropy, so streams differ unless the seeds coincide).
VAL_SEED_OFFSET = 1_000_003


def _plain(obj: Any) -> Any:
    """Hydra DictConfig / nested mappings -> plain dicts."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


class SyntheticTaskDataset(Dataset):
    """``num_samples`` generated sequences of a task mixture.

    Args:
        seq_len: model input length; samples are generated with ``seq_len + 1`` tokens.
        num_samples: dataset length (virtual: nothing is stored).
        mixture: task name -> weight (>= 0, normalised); names are keys of :data:`.tasks.TASKS`.
        seed: sample seed (>= 0); item ``i`` uses ``numpy.random.default_rng([seed, i])``, which first
            draws the task, then generates it.
        vocab_size: see :class:`.vocab.Vocab`.
        language_seed: seed of the filler Markov chain (keep it equal for train and eval).
        task_kwargs: task name -> constructor kwargs, e.g. ``{"mqar": {"num_pairs": 32}}``.

    Item ``i`` is a dict: ``input_ids`` long [seq_len] (tokens[:-1]), ``labels`` long [seq_len]
    (tokens[1:]), ``answer_mask`` bool [seq_len] (True where ``labels`` is an answer token), ``task_id``
    long [] (index into ``self.task_names``, the sorted mixture names).
    """

    def __init__(self, seq_len: int, num_samples: int, mixture: Mapping[str, float], seed: int,
                 vocab_size: int = 512, language_seed: int = 0,
                 task_kwargs: Mapping[str, Mapping[str, Any]] | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        mixture = _plain(mixture)
        if not isinstance(mixture, dict) or not mixture:
            raise ValueError(f"mixture must be a non-empty mapping task name -> weight, got {mixture!r}")
        unknown = sorted(set(mixture) - set(TASKS))
        if unknown:
            raise ValueError(f"mixture: unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
        weights = [float(mixture[k]) for k in sorted(mixture)]
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {mixture}")
        task_kwargs = _plain(task_kwargs or {})
        bad = sorted(set(task_kwargs) - set(TASKS))
        if bad:
            raise ValueError(f"task_kwargs: unknown task(s) {bad}; known tasks: {sorted(TASKS)}")

        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        self.vocab = Vocab(vocab_size)
        self.task_names: list[str] = sorted(mixture)
        self.weights = np.asarray(weights) / sum(weights)
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0  # guard against rounding: every u in [0, 1) maps to a task
        self.tasks: list[Task] = [make_task(n, self.vocab, language_seed=language_seed, **task_kwargs.get(n, {}))
                                  for n in self.task_names]
        for name, task in zip(self.task_names, self.tasks):
            if seq_len + 1 < task.min_length:
                raise ValueError(f"seq_len={seq_len} is too short for task {name!r}: it needs "
                                 f"seq_len >= {task.min_length - 1} with its current settings")

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[int, Sample]:
        """(task id, raw :class:`Sample` of ``seq_len + 1`` tokens) of item ``index``."""
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        task_id = min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.tasks) - 1)
        return task_id, self.tasks[task_id].generate(rng, self.seq_len + 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        task_id, s = self.sample(index)
        tokens = torch.tensor(s.tokens, dtype=torch.long)
        answer = torch.tensor(s.answer, dtype=torch.bool)
        return {"input_ids": tokens[:-1], "labels": tokens[1:], "answer_mask": answer[1:],
                "task_id": torch.tensor(task_id, dtype=torch.long)}


class OffsetSequentialSampler(Sampler[int]):
    """Indices ``start, start + 1, ..., end - 1`` in order, optionally sharded over data-parallel ranks.

    With ``num_replicas = W`` rank ``r`` yields ``start + r, start + r + W, ...``, ``(end - start) // W``
    indices per rank (equal counts, so ranks never wait on each other): after ``n`` indices per rank the
    consumed samples are exactly ``[start, start + n * W)``.
    """

    def __init__(self, start: int, end: int, num_replicas: int = 1, rank: int = 0):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if end < 0:
            raise ValueError(f"end must be >= 0, got {end}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got {rank}")
        self.start, self.end, self.num_replicas, self.rank = int(start), int(end), int(num_replicas), int(rank)

    def __len__(self) -> int:
        return max(0, self.end - self.start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        first = self.start + self.rank
        return iter(range(first, first + len(self) * self.num_replicas, self.num_replicas))


class IndexedDataModule(L.LightningDataModule):
    """Loader machinery shared by the data modules: map-style datasets read by index, in order.

    Subclasses define ``train_dataset`` and ``val_dataset`` (each with ``task_names``, see ``LMModule``) and may
    set ``collate_fn``. Training reads indices ``start_index, start_index + 1, ...`` (a dataset that wants
    a shuffled order maps its index to a shuffled item itself, deterministically), sharded over the
    data-parallel ranks by :class:`OffsetSequentialSampler`; validation reads all indices in order.

    Exact resume: the data position is ``samples_per_step = batch_size * accumulate_grad_batches * world``
    indices per optimizer step. :meth:`state_dict` (stored in every Lightning checkpoint) records the
    position reached, so a resumed run continues at the exact next sample even with another world size;
    without a stored position it is ``global_step * samples_per_step``. ``data_identity()`` names what the
    position means (e.g. the window length); a checkpoint of other data is refused on load.

    Multi-GPU: build the Trainer with ``use_distributed_sampler=False`` so Lightning does not wrap the
    sampler.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(self, batch_size: int, num_workers: int = 0):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.start_index = 0
        # (training index, optimizer step) of a restored checkpoint: the position is counted from there
        self._resume_point = (0, 0)

    @property
    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    @property
    def val_dataset(self) -> Dataset:
        raise NotImplementedError

    def data_identity(self) -> dict[str, Any]:
        """What a stored data position refers to (plain values); a resumed run must match it."""
        return {}

    def samples_per_step(self, accumulate_grad_batches: int = 1, world_size: int | None = None) -> int:
        """Training indices consumed per optimizer step (``world_size`` None: the attached trainer's)."""
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        world = self._world()[0] if world_size is None else world_size
        if world < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        return self.batch_size * int(accumulate_grad_batches) * int(world)

    def set_start_step(self, global_step: int, accumulate_grad_batches: int = 1,
                       world_size: int | None = None) -> None:
        """Resume at the data position of optimizer step ``global_step``.

        Sets ``start_index = global_step * samples_per_step`` (counted from a restored checkpoint's stored
        position, if any). Call before the train loader is built.
        """
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        index, step = self._resume_point
        if global_step < step:
            raise ValueError(f"global_step {global_step} is before the restored data position (step {step})")
        self.start_index = index + (int(global_step) - step) * self.samples_per_step(accumulate_grad_batches,
                                                                                      world_size)

    def state_dict(self) -> dict[str, Any]:
        """The data position of the attached trainer's step (Lightning stores it in checkpoints)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"index": self.start_index, "step": 0, **self.data_identity()}
        index, step = self._resume_point
        per_step = self.samples_per_step(trainer.accumulate_grad_batches)
        return {"index": index + (trainer.global_step - step) * per_step, "step": int(trainer.global_step),
                **self.data_identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position of a checkpoint (before the train loader is built)."""
        ours = self.data_identity()
        for key, value in ours.items():
            if state_dict.get(key) != value:
                raise ValueError(f"data.{key}: the checkpoint's data position was counted with {key}="
                                 f"{state_dict.get(key)!r}, this run has {value!r}; resume with the same data")
        self._resume_point = (int(state_dict["index"]), int(state_dict["step"]))
        self.start_index = self._resume_point[0]

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the attached trainer, (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, ds: Dataset, sampler: Sampler[int], drop_last: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Lightning builds the loader after restoring a checkpoint: start at its exact data position.
            self.set_start_step(trainer.global_step, trainer.accumulate_grad_batches)
        world, rank = self._world()
        sampler = OffsetSequentialSampler(self.start_index, len(self.train_dataset), world, rank)
        return self._loader(self.train_dataset, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        return self._loader(self.val_dataset, OffsetSequentialSampler(0, len(self.val_dataset), world, rank),
                            drop_last=False)


class SyntheticDataModule(IndexedDataModule):
    """Train / val loaders over the generated task mixture.

    Training item ``i`` comes from seed ``seed``; validation from ``seed + VAL_SEED_OFFSET`` (disjoint
    stream) with ``val_mixture`` (default: ``mixture``). ``train_samples=None`` means 10**9 virtual
    samples (generated on the fly). Training reads indices in order from ``start_index`` (no shuffling
    needed: every index is an independent random sample); see :class:`IndexedDataModule` for resuming and
    multi-GPU sharding.

    Batches: dicts of ``input_ids`` / ``labels`` long [B, seq_len], ``answer_mask`` bool [B, seq_len],
    ``task_id`` long [B] (index into ``train_dataset.task_names`` / ``val_dataset.task_names``).
    """

    def __init__(self, seq_len: int = 512, batch_size: int = 8, train_samples: int | None = None,
                 val_samples: int = 64, mixture: Mapping[str, float] | None = None,
                 val_mixture: Mapping[str, float] | None = None, vocab_size: int = 512, seed: int = 1234,
                 language_seed: int = 0, num_workers: int = 0,
                 task_kwargs: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__(batch_size, num_workers)
        self.seq_len = seq_len
        self.train_samples = 10**9 if train_samples is None else train_samples
        self.val_samples = val_samples
        self.mixture = _plain(mixture) if mixture is not None else dict(DEFAULT_MIXTURE)
        self.val_mixture = _plain(val_mixture) if val_mixture is not None else dict(self.mixture)
        self.vocab_size = vocab_size
        self.seed = seed
        self.language_seed = language_seed
        self.task_kwargs = _plain(task_kwargs or {})
        self._train: SyntheticTaskDataset | None = None
        self._val: SyntheticTaskDataset | None = None
        self.vocab = Vocab(vocab_size)
        # fail fast on bad arguments (building the datasets is cheap: nothing is generated up front)
        self.setup()

    @property
    def train_dataset(self) -> SyntheticTaskDataset:
        if self._train is None:
            self._train = SyntheticTaskDataset(self.seq_len, self.train_samples, self.mixture, self.seed,
                                               self.vocab_size, self.language_seed, self.task_kwargs)
        return self._train

    @property
    def val_dataset(self) -> SyntheticTaskDataset:
        if self._val is None:
            self._val = SyntheticTaskDataset(self.seq_len, self.val_samples, self.val_mixture,
                                             self.seed + VAL_SEED_OFFSET, self.vocab_size, self.language_seed,
                                             self.task_kwargs)
        return self._val

    def setup(self, stage: str | None = None) -> None:
        _ = (self.train_dataset, self.val_dataset)  # build (and validate) both


def eval_dataloader(task: str, length: int, num_samples: int, seed: int, *, batch_size: int = 8,
                    vocab_size: int = 512, language_seed: int = 0,
                    task_kwargs: Mapping[str, Any] | None = None, num_workers: int = 0) -> DataLoader:
    """Loader of ``num_samples`` samples of one task with model input length ``length`` (in order).

    ``task_kwargs`` are the constructor kwargs of that task (e.g. ``{"depth": 0.5}`` for NIAH). Batches
    as in :class:`SyntheticDataModule`, with ``task_id`` all 0. Use the training ``language_seed``.
    """
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; known tasks: {sorted(TASKS)}")
    ds = SyntheticTaskDataset(length, num_samples, {task: 1.0}, seed, vocab_size, language_seed,
                              {task: dict(task_kwargs or {})})
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
