"""``data=tokens``: windows of prepared shards, the held-out split, seeded order, rank strides, exact resume,
the document mask, the vocabulary from the manifest, and training on it end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hydra_utils import ROOT, TINY, make_cfg

from spla_lit.config import validate_config
from spla_lit.data import TokenDataModule, TokenShards, split_documents
from spla_lit.data.tokens import TRAIN_SAMPLES

N, B = 16, 4


def _dm(path, **kw) -> TokenDataModule:
    return TokenDataModule(str(path), **{"seq_len": N, "batch_size": B, "val_fraction": 0.2, **kw})


def _attach(dm: TokenDataModule, step: int = 0, world: int = 1, rank: int = 0, accumulate: int = 1) -> None:
    """The trainer fields the data module reads (what Lightning sets when fitting)."""
    dm.trainer = SimpleNamespace(global_step=step, world_size=world, global_rank=rank,
                                 accumulate_grad_batches=accumulate)


def _stream(shards: TokenShards, docs: np.ndarray) -> np.ndarray:
    return np.concatenate([shards.read(int(shards.offsets[d]), int(shards.offsets[d + 1])) for d in docs])


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch["input_ids"].reshape(-1, N).tolist()]


def test_windows_are_consecutive_slices_of_each_split(prepared):
    dm = _dm(prepared)
    shards = dm.shards
    for ds in (dm.train_dataset, dm.val_dataset):
        stream = _stream(shards, ds.documents)
        assert ds.num_tokens == len(stream) and ds.num_windows == (len(stream) - 1) // N
        index_of = {ds.window(i): i for i in range(ds.num_windows)}  # validation: in order; training: shuffled
        for w in range(ds.num_windows):
            start = w * N
            item = ds[index_of[w]]
            assert item["input_ids"].tolist() == stream[start:start + N].tolist()
            assert item["labels"].tolist() == stream[start + 1:start + N + 1].tolist()
            assert item["input_ids"].dtype == torch.int64
    assert len(dm.val_dataset) == dm.val_dataset.num_windows
    assert len(dm.train_dataset) == TRAIN_SAMPLES // dm.train_dataset.num_windows * dm.train_dataset.num_windows
    assert dm.vocab_size == shards.vocab_size and dm.val_dataset.task_names == []


def test_held_out_split_is_whole_documents_disjoint_from_training(prepared):
    dm = _dm(prepared)
    train, val = dm.train_dataset.documents, dm.val_dataset.documents
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(dm.shards.num_documents))
    lengths = np.diff(dm.shards.offsets)
    assert lengths[val].sum() >= 0.2 * lengths.sum() and len(val) < len(train)
    # no training window reads a held-out token: the streams are made of disjoint document ranges
    train_tokens = {t for d in train for t in range(dm.shards.offsets[d], dm.shards.offsets[d + 1])}
    assert not any(t in train_tokens for d in val for t in range(dm.shards.offsets[d], dm.shards.offsets[d + 1]))
    assert np.array_equal(_dm(prepared, seed=99).val_dataset.documents, val)  # the training seed keeps the split
    assert not np.array_equal(_dm(prepared, split_seed=5).val_dataset.documents, val)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"val_fraction": 0.0}, "data.val_fraction"), ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"val_fraction": 0.97}, "data.val_fraction: .* leaves no training documents"),
    ({"seq_len": 10**6}, "data.seq_len"), ({"seq_len": 0}, "data.seq_len"), ({"seed": -1}, "data.seed"),
    ({"vocab_size": 100}, "data.vocab_size: the tokenizer of .* has"), ({"document_mask": 1}, "data.document_mask"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_name_the_key(prepared, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(prepared, **kwargs)


def test_held_out_split_needs_two_documents():
    with pytest.raises(ValueError, match="data.val_fraction: the data has 1 document, .* at least 2"):
        split_documents(np.array([1000]), 0.1, 10, 0)
    train, val = split_documents(np.array([5, 50, 5, 5]), 0.01, 10, 0)  # at least one window held out
    assert sorted([*train, *val]) == [0, 1, 2, 3] and np.array([5, 50, 5, 5])[val].sum() >= 10


def test_missing_or_unfinished_data_names_data_path(tmp_path):
    with pytest.raises(ValueError, match=r"data.path: .*\(no such folder\)"):
        TokenDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"data.path: .*\(no manifest.json"):
        TokenDataModule(str(tmp_path))


def test_training_order_is_a_seeded_permutation_per_epoch(prepared):
    ds = _dm(prepared).train_dataset
    w = ds.num_windows
    epoch0, epoch1 = [ds.window(i) for i in range(w)], [ds.window(i) for i in range(w, 2 * w)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(w)) and epoch0 != epoch1 and epoch0 != sorted(epoch0)
    assert [_dm(prepared).train_dataset.window(i) for i in range(w)] == epoch0
    assert [_dm(prepared, seed=7).train_dataset.window(i) for i in range(w)] != epoch0

    a, b, c = _dm(prepared), _dm(prepared), _dm(prepared, seed=7)
    first = [_rows(x) for x in islice(a.train_dataloader(), 3)]
    assert first == [_rows(x) for x in islice(b.train_dataloader(), 3)]
    assert first != [_rows(x) for x in islice(c.train_dataloader(), 3)]


def test_data_parallel_ranks_read_disjoint_strides(prepared):
    one = _dm(prepared)
    _attach(one)
    single = [r for x in islice(one.train_dataloader(), 6) for r in _rows(x)]
    ranks = []
    for rank in range(2):
        dm = _dm(prepared)
        _attach(dm, world=2, rank=rank)
        loader = dm.train_dataloader()
        assert list(islice(loader.sampler, 3)) == [rank, rank + 2, rank + 4]
        ranks.append([r for x in islice(loader, 3) for r in _rows(x)])
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(single)  # together: the same samples, split in two


def test_resume_mid_epoch_yields_the_same_next_batch(prepared):
    dm = _dm(prepared)
    _attach(dm)
    run = list(islice(dm.train_dataloader(), 12))
    assert dm.train_dataset.num_windows > 12 * B  # mid-epoch
    dm.trainer.global_step = 5
    state = dm.state_dict()  # what Lightning stores in the checkpoint
    assert state["index"] == 5 * B and state["step"] == 5 and state["seq_len"] == N

    resumed = _dm(prepared)
    resumed.load_state_dict(state)
    _attach(resumed, step=5)
    assert [_rows(x) for x in islice(resumed.train_dataloader(), 2)] == [_rows(x) for x in run[5:7]]
    resumed.trainer.global_step = 7  # positions keep counting from the restored one
    assert resumed.state_dict()["index"] == 7 * B

    # saved by 2 ranks at step 3 (3 * 4 * 2 samples), resumed by one: the next sample is still exact
    two = _dm(prepared)
    _attach(two, step=3, world=2)
    elastic = _dm(prepared)
    elastic.load_state_dict(two.state_dict())
    _attach(elastic, step=3)
    assert _rows(next(iter(elastic.train_dataloader()))) == _rows(run[6])

    for kwargs, key in [({"seq_len": 32}, "data.seq_len"), ({"seed": 3}, "data.seed"),
                        ({"split_seed": 1}, "data.split_seed")]:
        with pytest.raises(ValueError, match=f"{key}: the checkpoint's data position"):
            _dm(prepared, **kwargs).load_state_dict(state)


def test_document_mask_packs_batches_with_cu_seqlens(prepared):
    plain, masked = _dm(prepared), _dm(prepared, document_mask=True)
    eos = masked.shards.eos_id
    for a, b in zip(islice(plain.train_dataloader(), 4), islice(masked.train_dataloader(), 4)):
        assert b["input_ids"].shape == b["labels"].shape == (1, B * N)
        assert torch.equal(b["input_ids"].view(B, N), a["input_ids"])
        assert torch.equal(b["labels"].view(B, N), a["labels"])
        cu = b["cu_seqlens"]
        assert cu.dtype == torch.int32 and (cu.diff() > 0).all() and cu[0] == 0 and cu[-1] == B * N
        ids = b["input_ids"][0]
        # a segment starts at every window start and at every EOS (the one before each document), nowhere else
        expected = sorted({*range(0, B * N + 1, N), *(p for p in torch.nonzero(ids == eos).flatten().tolist())})
        assert cu.tolist() == expected
    val = next(iter(masked.val_dataloader()))
    assert "cu_seqlens" in val and val["input_ids"].shape[0] == 1


@pytest.mark.parametrize("model", ["dense", "spla", "linear"])
def test_document_mask_keeps_documents_from_attending_to_each_other(prepared, model):
    cfg = make_cfg(_tokens_overrides(prepared, [f"model={model}", "data.document_mask=true", "data.seq_len=64"]),
                   tiny=False)
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model).eval()
    batch = next(b for b in dm.train_dataloader() if len(b["cu_seqlens"]) > dm.batch_size + 2)
    ids, cu = batch["input_ids"], batch["cu_seqlens"]
    bounds = cu.tolist()
    seg = next(i for i in range(len(bounds) - 2)  # a document (not at a window start), not the last segment
               if bounds[i + 1] - bounds[i] > 3 and bounds[i] % 64)
    a, b = bounds[seg], bounds[seg + 1]
    changed = ids.clone()
    changed[0, a + 1:b] = torch.randint(3, dm.vocab_size, (b - a - 1,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = net(ids, cu), net(changed, cu)
        unmasked = net(ids), net(changed)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[a:b] = False
    torch.testing.assert_close(out[0, others], ref[0, others], rtol=0, atol=1e-5)
    assert not torch.allclose(out[0, a + 1:b], ref[0, a + 1:b])
    # without the mask, the tokens after the document see the change (the test can fail)
    assert not torch.allclose(unmasked[0][0, b:], unmasked[1][0, b:])


# ------------------------------------------------------------------------------------------ config, training


def _tokens_overrides(prepared, extra=()) -> list[str]:
    tiny = [o for o in TINY if not o.startswith("data.")]
    return [*tiny, "data=tokens", f"data.path={prepared}", "data.seq_len=64", "data.batch_size=2",
            "data.val_fraction=0.2", "trainer.limit_val_batches=2", *extra]


def test_config_takes_the_vocabulary_from_the_manifest(prepared):
    cfg = make_cfg(_tokens_overrides(prepared), tiny=False)
    vocab = TokenShards(prepared).vocab_size
    assert cfg.data.vocab_size == cfg.model.vocab_size == vocab
    validate_config(cfg)
    assert instantiate(cfg.data).vocab_size == vocab
    rounded = make_cfg(_tokens_overrides(prepared, ["data.vocab_size=384"]), tiny=False)
    assert rounded.model.vocab_size == instantiate(rounded.data).vocab_size == 384
    no_path = [o for o in _tokens_overrides(prepared) if not o.startswith("data.path")]
    with pytest.raises(Exception, match="data.path"):  # omegaconf's error, naming the key
        validate_config(make_cfg(no_path, tiny=False))


@pytest.mark.slow
def test_training_on_prepared_text_resumes_exactly(tmp_path, prepared):
    from spla_lit.training.run import train

    def weights(run):
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt, {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}

    common = ["data.document_mask=true", "trainer.max_steps=4", "scorer=random"]
    metrics = train(make_cfg(_tokens_overrides(prepared, common), tmp_path / "full", tiny=False))
    assert metrics["global_step"] == 4 and "val/ppl" in metrics and "val/answer_acc" not in metrics
    ckpt, full = weights("full")
    assert ckpt["TokenDataModule"]["index"] == 4 * 2 and ckpt["TokenDataModule"]["step"] == 4
    half = tmp_path / "full" / "checkpoints" / "step000002.ckpt"
    train(make_cfg(_tokens_overrides(prepared, [*common, f"ckpt_path={half}"]), tmp_path / "resumed", tiny=False))
    _, resumed = weights("resumed")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_train_cli_on_prepared_text(tmp_path, prepared):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")]))
    overrides = [o for o in _tokens_overrides(prepared) if o != "~callbacks.progress_bar"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "trainer.max_steps=2",
                        f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
