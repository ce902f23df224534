"""README's commands are the ones CI runs, and its Layout names paths that exist."""

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
    # any failing command fails CI, pytest's exit code 5 (no test collected) included
    assert "set -euo pipefail" in ci


def test_readme_layout_names_existing_paths():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", text, re.S)
    assert block, "README has no Layout block"
    parent, named = ROOT, []
    for line in block.group(1).splitlines():
        if not line.strip() or line.startswith(" " * 8):  # a description's continuation line
            continue
        indented = line.startswith("  ")
        names = re.match(r"\s*(\S.*?)(?:\s{2,}|$)", line).group(1).split(", ")
        for name in names:
            path = (parent if indented else ROOT) / name
            assert path.exists(), f"README Layout names {name!r}, which is not at {path.relative_to(ROOT)}"
            named.append(path)
        if not indented:
            parent = ROOT / names[-1]
    assert ROOT / "spla_lit" / "training" in named and ROOT / "kernels" / "spla_kernels" in named


def test_readme_main_command_is_plain_train():
    assert _commands("Train") == ["python train.py"]
