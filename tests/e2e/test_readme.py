"""README's commands are the ones CI runs."""

from __future__ import annotations

import re

from hydra_utils import ROOT


def _commands(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, f"README section {section!r} has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for section in ("Install", "Test"):
        (command,) = _commands(section)
        assert command in ci, f"{section}: {command!r} is not in .ci/run"


def test_readme_main_command_is_plain_train():
    assert _commands("Train") == ["python train.py"]
