"""eval.py on a newcomer's machine: suite sizes follow the device, a progress bar counts every evaluated token
(stage = task @ length), and a missing ckpt_path is one line naming it."""

from __future__ import annotations

import pytest
import torch
from hydra_utils import make_cfg

from spla_lit.config import ConfigError
from spla_lit.eval import runner
from spla_lit.eval.progress import EvalProgress
from spla_lit.eval.runner import evaluate, suite_sizes
from spla_lit.eval.sweep import eval_config
from spla_lit.training.run import train


def test_suite_sizes_follow_the_device_unless_given():
    cfg = eval_config(["ckpt_path=x"])
    assert suite_sizes(cfg, torch.device("cpu")) == ([512, 1024], 10)
    assert suite_sizes(cfg, torch.device("cuda")) == ([1024, 2048, 4096], 50)
    assert suite_sizes(eval_config(["ckpt_path=x", "lengths=[64]", "num_samples=3"]), torch.device("cuda")) == ([64], 3)


def test_eval_without_ckpt_path_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^ckpt_path: missing; give ckpt_path="):
        evaluate(eval_config([f"output_dir={tmp_path}", "device=cpu"]))


class Recording(EvalProgress):
    """The real bar, also recording the tokens counted per stage."""

    made: list[Recording] = []

    def __init__(self, total: int, enabled: bool = True) -> None:
        super().__init__(total, enabled)
        self.seen: dict[str, int] = {}
        self.current = "start"
        Recording.made.append(self)

    def stage(self, description: str) -> None:
        super().stage(description)
        self.current = description

    def advance(self, tokens: int) -> None:
        super().advance(tokens)
        self.seen[self.current] = self.seen.get(self.current, 0) + tokens


def test_the_progress_bar_counts_every_evaluated_token(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(make_cfg(["trainer.max_steps=1", "trainer.val_check_interval=1"], run))
    monkeypatch.setattr(runner, "EvalProgress", Recording)
    evaluate(eval_config([f"ckpt_path={run}", f"output_dir={tmp_path / 'eval'}", "lengths=[64,128]", "num_samples=2",
                          "tasks=[niah_single,variable_tracking]", "perplexity.num_samples=2",
                          "fidelity.num_samples=1", "device=cpu", "plot=false"]))
    (bar,) = Recording.made
    assert bar.seen == {"niah_single @ 64": 128, "variable_tracking @ 64": 128, "niah_single @ 128": 256,
                        "variable_tracking @ 128": 256, "perplexity @ 128": 256, "fidelity @ 128": 128}
    assert bar.total == sum(bar.seen.values())
