"""Real text to token shards: the tokenizer trainer, prepare's round trip, re-runs, interruptions, the CLIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hydra_utils import ROOT
from textdata import SHARD_TOKENS, make_corpus

import spla_lit.data.prepare as prepare_module
from spla_lit.data.corpus import STDLIB_SKIP_DIRS, read_documents, resolve_inputs, stdlib_files
from spla_lit.data.prepare import prepare
from spla_lit.data.shards import MANIFEST, TokenShards, read_manifest, token_dtype
from spla_lit.data.train_tokenizer import BOS, EOS, PAD, train_tokenizer

Tokenizer = pytest.importorskip("tokenizers", reason='the hf extra: pip install "spla[hf]"').Tokenizer


def _shard_files(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard_*.bin"))}


def _ids(tokenizer, doc: str) -> list[int]:
    return tokenizer.encode(doc, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_round_trips_and_loads_in_transformers(tokenizer_dir, corpus):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    assert 259 < tok.get_vocab_size() <= 320
    unseen = "Zebra 🦓 x=1;\n\tλ → ∞ \x00 ﷽"  # byte-level: characters never seen in training encode too
    for doc in corpus[1][:4] + [unseen]:
        assert tok.decode(_ids(tok, doc)) == doc

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tokenizer_dir))
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (2, 1, 0)
        assert hf(unseen, add_special_tokens=False)["input_ids"] == _ids(tok, unseen)
        assert hf.decode(_ids(tok, corpus[1][0])) == corpus[1][0]


def test_train_tokenizer_rejects_bad_arguments(tmp_path, corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(str(corpus[0]), vocab_size=100, out=tmp_path)
    with pytest.raises(ValueError, match="input"):
        train_tokenizer(str(tmp_path / "missing"), vocab_size=300, out=tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_round_trip_txt_jsonl_parquet(prepared, corpus, tokenizer_dir):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    shards = TokenShards(prepared)
    docs = corpus[1]
    assert shards.eos_id == 2 and shards.vocab_size == tok.get_vocab_size() and shards.dtype == np.uint16
    assert shards.num_documents == len(docs) == 3 + 6 + 5  # empty jsonl text, blank line and null row skipped
    assert len(shards.manifest["shards"]) == -(-shards.num_tokens // SHARD_TOKENS) > 2
    # one read of the whole stream crosses every shard boundary
    stream = shards.read(0, shards.num_tokens)
    expected = [i for doc in docs for i in _ids(tok, doc) + [2]]
    assert stream.tolist() == expected
    for i, doc in enumerate(docs):  # document boundaries kept, EOS after each document
        a, b = shards.offsets[i], shards.offsets[i + 1]
        assert stream[a:b].tolist() == _ids(tok, doc) + [2]
        assert shards.read(int(a), int(b)).tolist() == _ids(tok, doc) + [2]
    m = read_manifest(prepared)
    assert m["num_tokens"] == len(expected) and m["stats"]["tokens_per_second"] > 0
    assert [Path(f["path"]).name for f in m["key"]["inputs"]] == ["a.txt", "b.txt", "d.txt", "e.jsonl", "f.parquet"]
    assert not list(prepared.glob(".tmp-*"))


def test_rerun_is_a_no_op_and_changes_retokenize(tmp_path, tokenizer_dir, monkeypatch):
    src = tmp_path / "corpus"
    make_corpus(src, seed=1)
    out = tmp_path / "out"
    first = prepare(str(src), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    before = _shard_files(out)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a no-op re-run must not tokenize")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_ShardWriter", no_tokenizing)
        assert prepare(str(src), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False) == first
    assert _shard_files(out) == before

    # a changed input tokenizes again; fewer tokens than before: the old run's last shards go
    (src / "a.txt").write_text("short")
    (src / "b.txt").unlink()
    shutil.rmtree(src / "c")
    second = prepare(str(src), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    assert second["num_tokens"] < first["num_tokens"] and second["data_hash"] != first["data_hash"]
    assert list(_shard_files(out)) == [s["file"] for s in second["shards"]]
    assert TokenShards(out).num_documents == 1 + 6 + 5

    # another tokenizer (or eos, shard size) tokenizes again
    other = tmp_path / "tok2"
    train_tokenizer(str(src), vocab_size=280, out=other, progress=False)
    third = prepare(str(src), other, out, shard_tokens=SHARD_TOKENS, progress=False)
    assert third["key"]["tokenizer_sha256"] != second["key"]["tokenizer_sha256"]
    assert prepare(str(src), other, out, shard_tokens=1000, progress=False)["key"]["shard_tokens"] == 1000


def test_interrupted_prepare_leaves_no_half_written_shard(tmp_path, corpus, tokenizer_dir, monkeypatch):
    out = tmp_path / "out"
    prepare(str(corpus[0]), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    (corpus[0] / "c" / "d.txt").touch()  # the input changed: the next run rewrites the shards
    real_write = prepare_module.atomic_write
    written = []

    def failing_write(path, write):
        if len(written) == 2:  # the third shard: half its bytes reach the disk, then the run dies
            def half(f):
                f.write(b"\x01\x00" * (SHARD_TOKENS // 2))
                raise KeyboardInterrupt

            return real_write(path, half)
        written.append(path)
        return real_write(path, write)

    monkeypatch.setattr(prepare_module, "atomic_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus[0]), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    assert not (out / MANIFEST).exists()  # the old manifest went first: never old manifest + new shards
    assert not list(out.glob(".tmp-*"))
    # the old run's files are gone, the new run's first two shards are whole
    assert {p.name: p.stat().st_size for p in out.iterdir()} == {"shard_00000.bin": 2 * SHARD_TOKENS,
                                                                  "shard_00001.bin": 2 * SHARD_TOKENS}
    with pytest.raises(ValueError, match=r"data.path: .* \(no manifest.json: prepare never finished"):
        TokenShards(out)

    monkeypatch.setattr(prepare_module, "atomic_write", real_write)
    done = prepare(str(corpus[0]), tokenizer_dir, out, shard_tokens=SHARD_TOKENS, progress=False)
    clean = prepare(str(corpus[0]), tokenizer_dir, tmp_path / "clean", shard_tokens=SHARD_TOKENS, progress=False)
    assert done["data_hash"] == clean["data_hash"]


def test_uint16_and_uint32_shards(tmp_path):
    from tokenizers import models, pre_tokenizers

    assert (token_dtype(2**16), token_dtype(2**16 + 1)) == ("uint16", "uint32")
    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "doc.txt").write_text("w69999 w3 w65536 w65535 nope")
    m = prepare(str(tmp_path / "doc.txt"), tmp_path / "big.json", tmp_path / "out", progress=False)
    shards = TokenShards(tmp_path / "out")
    assert m["dtype"] == "uint32" and m["eos"] == "</s>" and shards.dtype == np.uint32
    assert shards.read(0, 6).tolist() == [69999, 3, 65536, 65535, 70_000, 70_001]
    assert (tmp_path / "out" / "shard_00000.bin").stat().st_size == 6 * 4


def test_prepare_rejects_bad_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"text_key: .*bad.jsonl:2"):
        prepare(str(tmp_path / "bad.jsonl"), tokenizer_dir, tmp_path / "o1", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"input: .*bad.jsonl:2 is not a JSON line"):
        prepare(str(tmp_path / "bad.jsonl"), tokenizer_dir, tmp_path / "o1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="input: folder .* has no file ending in"):
        prepare(str(tmp_path / "empty"), tokenizer_dir, tmp_path / "o2", progress=False)
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="input: .* hold no text"):
        prepare(str(tmp_path / "empty"), tokenizer_dir, tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="tokenizer: .* does not exist"):
        prepare(str(tmp_path / "bad.jsonl"), tmp_path, tmp_path / "o3", progress=False)
    with pytest.raises(ValueError, match="eos: '<nope>' is not a token"):
        prepare(str(tmp_path / "empty"), tokenizer_dir, tmp_path / "o4", eos="<nope>", progress=False)
    with pytest.raises(ValueError, match="shard_tokens"):
        prepare(str(tmp_path / "empty"), tokenizer_dir, tmp_path / "o5", shard_tokens=0, progress=False)
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_stdlib_corpus_is_the_sorted_library_sources():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 200 and "os.py" in rel and "json/decoder.py" in rel
    assert all(f.suffix == ".py" and not STDLIB_SKIP_DIRS.intersection(Path(r).parts[:-1]) for f, r in zip(files, rel))
    assert resolve_inputs(["stdlib"]) == [f.resolve() for f in files]


def test_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path, tokenizer_dir):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    extra = r'the optional package .{name}.: pip install "spla\[hf\]"'
    with pytest.raises(ImportError, match="prepare needs " + extra.format(name="tokenizers")):
        prepare("stdlib", tokenizer_dir, tmp_path / "out")
    with pytest.raises(ImportError, match="train_tokenizer needs " + extra.format(name="tokenizers")):
        train_tokenizer("stdlib", 300, tmp_path / "out")
    with pytest.raises(ImportError, match="reading .parquet input needs " + extra.format(name="pyarrow")):
        list(read_documents(tmp_path / "t.parquet"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ command lines


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_trains_a_tokenizer_and_prepares(tmp_path, corpus):
    r = _cli("spla_lit.data.train_tokenizer", f"input={corpus[0] / 'a.txt'},{corpus[0] / 'e.jsonl'}",
             "vocab_size=300", "out=tok", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = ("spla_lit.data.prepare", f"input=[{corpus[0] / 'a.txt'},{corpus[0] / 'e.jsonl'}]", "tokenizer=tok",
            "out=data")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and TokenShards(tmp_path / "data").num_documents == 1 + 6
    assert json.loads((tmp_path / "data" / MANIFEST).read_text())["eos"] == EOS
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["input=x", "tokenizer=t", "out=o", "shard=3"], "error: shard: unknown key"),
    (["input=x", "tokenizer=t"], "error: out: required"),
    (["input=x", "tokenizer=t", "out=o", "shard_tokens=0"], "error: shard_tokens: must be >= 1"),
    (["input=x", "tokenizer=t", "out=o", "progress=maybe"], "error: progress: expected true or false"),
    (["input=missing.txt", "tokenizer=missing", "out=o"], "error: tokenizer: missing does not exist"),
])
def test_cli_errors_name_the_key(tmp_path, args, message):
    r = _cli("spla_lit.data.prepare", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
