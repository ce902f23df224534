"""``generate.py`` (ids and text prompts, through a checkpoint) and ``eval.py decode=generate``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra_utils import CONF, ROOT, make_cfg

from spla_lit.config import ConfigError
from spla_lit.data.train_tokenizer import train_tokenizer
from spla_lit.eval.loading import load_model
from spla_lit.eval.runner import evaluate
from spla_lit.eval.sweep import eval_config
from spla_lit.inference.cli import run
from spla_lit.training.run import train

VOCAB = 300  # room for a byte-level BPE tokenizer (>= 259 ids)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2", f"data.vocab_size={VOCAB}"], out))
    return out / "checkpoints" / "last.ckpt"


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=list(overrides))


def test_generate_from_ids_equals_the_model(ckpt, tmp_path, capsys):
    results = run(_cfg([f"ckpt_path={ckpt}", "prompt_ids=[[1,17,42,9,3],[1,5]]", "max_new_tokens=6", "device=cpu",
                        f"output_dir={tmp_path}"]))
    net = load_model(ckpt).net
    want = net.generate(torch.tensor([[1, 17, 42, 9, 3], [1, 5, 0, 0, 0]]), 6, prompt_lengths=[5, 2])
    assert [r["continuation_ids"] for r in results["rows"]] == want.tolist()
    assert results["throughput"]["decode_steps"] == 5 and results["throughput"]["tokens_per_s"] > 0
    assert json.loads((tmp_path / "generation.json").read_text())["rows"] == results["rows"]
    assert "tokens/s" in capsys.readouterr().out


def test_generate_text_prompt_with_a_tokenizer(ckpt, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    return 0\n" * 50 + "the cat sat on the mat\n" * 50)
    tok_dir = tmp_path / "tok"
    train_tokenizer(str(corpus), vocab_size=270, out=tok_dir, progress=False)
    results = run(_cfg([f"ckpt_path={ckpt}", "prompt='def main('", f"tokenizer={tok_dir}", "max_new_tokens=5",
                        "device=cpu", f"output_dir={tmp_path / 'out'}"]))
    row = results["rows"][0]
    assert row["prompt"] == "def main(" and isinstance(row["continuation"], str)
    assert results["eos_token_id"] == 2  # </s> of the tokenizer's config
    with pytest.raises(ConfigError, match="^prompt: no tokenizer"):
        run(_cfg([f"ckpt_path={ckpt}", "prompt='x'", "device=cpu", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="^prompt_ids / prompt"):
        run(_cfg([f"ckpt_path={ckpt}", "device=cpu", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="^prompt_ids: prompt 0"):
        run(_cfg([f"ckpt_path={ckpt}", f"prompt_ids=[1,{VOCAB}]", "device=cpu", f"output_dir={tmp_path}"]))


@pytest.mark.slow
def test_generate_cli(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "generate.py", f"ckpt_path={ckpt}", "prompt_ids=[1,2,3]",
                           "max_new_tokens=4", "device=cpu", f"output_dir={tmp_path}",
                           f"paths.log_dir={tmp_path / 'logs'}"],  # Hydra's run folder too: nothing in the checkout
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuation" in proc.stdout and "tokens/s" in proc.stdout
    assert len(json.loads((tmp_path / "generation.json").read_text())["rows"][0]["continuation_ids"]) == 4


def test_eval_decode_generate_reports_both(ckpt, tmp_path):
    results = evaluate(eval_config([f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "decode=generate",
                                    "lengths=[64]", "num_samples=3", "tasks=[niah_single,variable_tracking]",
                                    "perplexity.enabled=false", "fidelity.enabled=false", "plot=false",
                                    "device=cpu"]))
    tf, gen = results["ruler"], results["ruler_generate"]
    assert tf["decode"] == "teacher_forced" and gen["decode"] == "generate"
    # exact match of the whole answer: greedy generation is right iff teacher forcing is (same prefixes)
    assert gen["per_task"] == tf["per_task"]
    assert "generated: every answer decoded greedily" in (tmp_path / "results.md").read_text()
    with pytest.raises(ConfigError, match="^decode:"):
        evaluate(eval_config([f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "decode=sampled"]))
