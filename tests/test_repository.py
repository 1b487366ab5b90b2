"""The README's two commands exist and CI runs exactly the README's test command."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    install_and_train, install_and_test = commands
    assert "scripts/train.py" in install_and_train and "pip install" in install_and_train
    assert "pytest" in install_and_test and "pip install" in install_and_test
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci_script


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "detreg_keras", "scripts", "tests", "export", "serving"):
        assert (REPO_ROOT / name).exists(), name
