"""``data=tokens``: language modelling on prepared token shards (``python -m spla_lit.data.prepare``).

The documents are split once into a held-out set and a training set (whole documents, chosen by
``split_seed``); each set's documents, in corpus order, form one token stream, cut into windows of
``seq_len + 1`` tokens that overlap by one (window ``w`` starts at ``w * seq_len``; ``input_ids`` is its
first ``seq_len`` tokens, ``labels`` its last ``seq_len``, so every token but the first is a label exactly
once per epoch). Training visits the windows of epoch ``e`` in the order of a permutation seeded by
``(seed, e)``; validation reads them in order.

``document_mask=True`` packs each batch into one row and passes ``cu_seqlens``, so that no token attends
across a document boundary: every document's segment starts at the EOS token that precedes it (it plays
the part of a BOS token), and the last token of a segment predicts that EOS (the end of its document).
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .datamodule import IndexedDataModule
from .shards import TokenShards, read_concatenated

# Virtual training length (indices), rounded down to whole epochs: training stops at trainer.max_steps.
TRAIN_SAMPLES = 10**12


class TokenWindowDataset(Dataset):
    """Windows over the stream of some whole documents of prepared shards.

    Args:
        shards: the prepared data.
        documents: sorted indices of the documents that make the stream (e.g. one split).
        seq_len: model input length; windows hold ``seq_len + 1`` tokens.
        shuffle_seed: None: item ``i`` is window ``i`` (``len`` = number of windows). Else item ``i`` is
            window ``perm_e[i % W]`` of epoch ``e = i // W``, ``perm_e`` the permutation of the ``W`` windows
            seeded by ``(shuffle_seed, e)``, and ``len`` spans many epochs (:data:`TRAIN_SAMPLES`).
        document_mask: also return ``segment_starts``.

    Item: ``input_ids`` / ``labels`` long ``[seq_len]``; with ``document_mask``, ``segment_starts`` long ``[S]``:
    the positions (in ``1 .. seq_len - 1``, increasing) where a new document's segment starts.
    """

    def __init__(self, shards: TokenShards, documents: np.ndarray, seq_len: int, *,
                 shuffle_seed: int | None = None, document_mask: bool = False):
        documents = np.asarray(documents, dtype=np.int64)
        if documents.ndim != 1 or not len(documents) or (np.diff(documents) <= 0).any():
            raise ValueError("documents must be a non-empty sorted 1-D array of distinct document indices")
        starts, ends = shards.offsets[documents], shards.offsets[documents + 1]
        # contiguous documents merge into one range of the shards' stream
        new = np.concatenate([[True], starts[1:] != ends[:-1]])
        self._range_starts = starts[new]
        range_ends = ends[np.concatenate([new[1:], [True]])]
        self._piece_starts = np.concatenate([[0], np.cumsum(range_ends - self._range_starts)])
        self.doc_starts = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])  # in this stream
        self.shards, self.documents, self.seq_len, self.document_mask = shards, documents, seq_len, document_mask
        self.num_tokens = int(self._piece_starts[-1])
        self.num_windows = (self.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"data.seq_len: {seq_len} needs at least {seq_len + 1} tokens, the split has "
                             f"{self.num_tokens}")
        self.shuffle_seed = shuffle_seed
        self.task_names: list[str] = []  # plain text: no per-task answer metrics (see LMModule)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        if self.shuffle_seed is None:
            return self.num_windows
        return TRAIN_SAMPLES // self.num_windows * self.num_windows

    def window(self, index: int) -> int:
        """The window item ``index`` reads."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.shuffle_seed is None:
            return index
        epoch, pos = divmod(index, self.num_windows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.num_windows))
        return int(self._perm[1][pos])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of this stream."""
        return read_concatenated(self._piece_starts, start, stop, lambda i, a, b: self.shards.read(
            int(self._range_starts[i]) + a, int(self._range_starts[i]) + b), self.shards.dtype)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.window(int(index)) * self.seq_len
        tokens = torch.from_numpy(self.read(start, start + self.seq_len + 1).astype(np.int64))
        item = {"input_ids": tokens[:-1], "labels": tokens[1:]}
        if self.document_mask:
            # a document starting at p has its segment start at p - 1 (its EOS); keep those in 1..seq_len-1
            lo = np.searchsorted(self.doc_starts, start + 2, side="left")
            hi = np.searchsorted(self.doc_starts, start + self.seq_len, side="right")
            item["segment_starts"] = torch.from_numpy(self.doc_starts[lo:hi] - 1 - start)
        return item


def collate_windows(items: list[dict[str, torch.Tensor]], document_mask: bool = False) -> dict[str, torch.Tensor]:
    """Batch of ``B`` windows: ``input_ids`` / ``labels`` long ``[B, N]``; with ``document_mask``, one packed row
    ``[1, B * N]`` and ``cu_seqlens`` int32 ``[S + 1]``: every window and every document segment inside it is
    its own sequence."""
    input_ids = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    if not document_mask:
        return {"input_ids": input_ids, "labels": labels}
    b, n = input_ids.shape
    cuts = [torch.zeros(1, dtype=torch.int64)]
    for i, it in enumerate(items):
        cuts += [it["segment_starts"] + i * n, torch.tensor([(i + 1) * n])]
    return {"input_ids": input_ids.reshape(1, b * n), "labels": labels.reshape(1, b * n),
            "cu_seqlens": torch.cat(cuts).to(torch.int32)}


def split_documents(lengths: np.ndarray, val_fraction: float, min_val_tokens: int,
                    split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sorted document indices. Held-out: documents in the order of a permutation
    seeded by ``split_seed`` until they hold ``max(ceil(val_fraction * total), min_val_tokens)`` tokens."""
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction: must be a number in (0, 1), got {val_fraction!r}")
    if len(lengths) < 2:
        raise ValueError(f"data.val_fraction: the data has {len(lengths)} document, a held-out split needs "
                         "at least 2 (prepare the text as several documents, e.g. one .txt file each)")
    order = np.random.default_rng([split_seed]).permutation(len(lengths))
    target = max(math.ceil(val_fraction * int(lengths.sum())), min_val_tokens)
    count = int(np.searchsorted(np.cumsum(lengths[order]), target, side="left")) + 1
    if count >= len(lengths):
        raise ValueError(f"data.val_fraction: the held-out split needs {target} tokens, which leaves no "
                         f"training documents (the data has {int(lengths.sum())} tokens); lower it")
    return np.sort(order[count:]), np.sort(order[:count])


class TokenDataModule(IndexedDataModule):
    """Train / val loaders over prepared token shards (see the module docstring).

    Args:
        path: the prepared folder (``data.path``).
        seq_len, batch_size, num_workers: loader shape.
        vocab_size: the model's vocabulary; None: the tokenizer's (from the manifest). A larger value is
            allowed (e.g. rounded up for speed), a smaller one is an error.
        document_mask: pack batches with ``cu_seqlens`` (documents do not attend to each other).
        val_fraction: share of the tokens held out (whole documents, at least one window).
        split_seed: the held-out documents' seed; keep it fixed to compare runs on the same split.
        seed: the training order.

    Batches: ``input_ids`` / ``labels`` long ``[B, seq_len]``, or ``[1, B * seq_len]`` with ``cu_seqlens``
    (``document_mask``). The data position is stored in checkpoints (see :class:`IndexedDataModule`).
    """

    def __init__(self, path: str | os.PathLike, seq_len: int = 512, batch_size: int = 8,
                 vocab_size: int | None = None, document_mask: bool = False, val_fraction: float = 0.01,
                 split_seed: int = 0, seed: int = 1234, num_workers: int = 0):
        super().__init__(batch_size, num_workers)
        for key, value, low in [("seq_len", seq_len, 1), ("seed", seed, 0), ("split_seed", split_seed, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        if not isinstance(document_mask, bool):
            raise ValueError(f"data.document_mask: must be true or false, got {document_mask!r}")
        self.shards = TokenShards(path)
        if vocab_size is None:
            vocab_size = self.shards.vocab_size
        elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < self.shards.vocab_size:
            raise ValueError(f"data.vocab_size: the tokenizer of {path} has {self.shards.vocab_size} ids, got "
                             f"{vocab_size!r} (leave it at its default, the tokenizer's)")
        self.path, self.seq_len, self.vocab_size = str(path), seq_len, vocab_size
        self.document_mask, self.val_fraction, self.split_seed, self.seed = (document_mask, val_fraction,
                                                                            split_seed, seed)
        if self.shards.num_tokens < 2 * (seq_len + 1):
            raise ValueError(f"data.seq_len: {seq_len} is too long for {path} ({self.shards.num_tokens} tokens): "
                             f"a training and a held-out window need {2 * (seq_len + 1)}")
        train_docs, val_docs = split_documents(np.diff(self.shards.offsets), val_fraction, seq_len + 1, split_seed)
        self._train = TokenWindowDataset(self.shards, train_docs, seq_len, shuffle_seed=seed,
                                         document_mask=document_mask)
        self._val = TokenWindowDataset(self.shards, val_docs, seq_len, document_mask=document_mask)
        self.collate_fn = partial(collate_windows, document_mask=document_mask)

    @property
    def train_dataset(self) -> TokenWindowDataset:
        return self._train

    @property
    def val_dataset(self) -> TokenWindowDataset:
        return self._val

    def data_identity(self) -> dict[str, Any]:
        return {"data_hash": self.shards.data_hash, "seq_len": self.seq_len, "seed": self.seed,
                "val_fraction": self.val_fraction, "split_seed": self.split_seed}

