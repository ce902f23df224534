"""Every TensorBoard tag README names exists in a run's event file."""

from __future__ import annotations

import re

import pytest
from hydra_utils import ROOT, make_cfg

from spla_lit.training.run import train

# A backticked TensorBoard tag: a known top-level section, then path parts; <name> stands for any one part.
TAG = re.compile(r"`((?:train|val|fidelity|compile|hp|lr-\w+)/[\w/<>.-]+)`")
# Tags logged only in a setting a CPU test run does not have, and the words README must give as that condition.
CONDITIONAL = {"train/peak_memory_gib": "GPU", "compile/graph_breaks": "compile"}


def readme_tags() -> set[str]:
    return set(TAG.findall((ROOT / "README.md").read_text()))


def test_readme_names_the_real_tags():
    assert {"train/rla/gate_abs", "train/rla/residual_share", "val/loss", "hp/val_loss"} <= readme_tags()
    assert "`rla/gate_abs`" not in (ROOT / "README.md").read_text()  # the tag is train/rla/gate_abs


@pytest.mark.slow
def test_every_tag_readme_names_is_in_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # fidelity callbacks and a peak FLOP/s (so MFU is logged on the CPU): every tag of README's sections
    train(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks=fidelity",
                    "+callbacks.throughput.peak_flops=1e12"], tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = set(acc.Tags()["scalars"])
    text = (ROOT / "README.md").read_text()
    missing = []
    for tag in sorted(readme_tags()):
        if tag in CONDITIONAL:
            paragraph = next(p for p in text.split("\n\n") if f"`{tag}`" in p)
            assert CONDITIONAL[tag] in paragraph, f"README names {tag} without saying it needs {CONDITIONAL[tag]}"
            continue
        pattern = re.compile("^" + re.sub(r"<[^>]+>", "[^/]+", re.escape(tag).replace(r"\<", "<").replace(r"\>", ">"))
                             + "$")
        if not any(pattern.match(t) for t in logged):
            missing.append(tag)
    assert not missing, f"README names tags no run logs: {missing}; logged: {sorted(logged)}"
