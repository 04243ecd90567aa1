"""The README's promises: its set-up commands are what CI runs, its Python runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_starts_with_exactly_two_setup_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and README.index("```bash") < README.index("\n## ")
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert "examples/mnist/train.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"```bash\n.*?\n(.*?)\n```", README, re.S).group(1)  # type: ignore[union-attr]
    install, run = test_command.split(" && ")
    for requirement in re.findall(r'"[^"]+"|plugins/\S+', install):
        assert requirement in ci, f"CI does not install {requirement}"
    assert run.split()[-3:] == ["python", "-m", "pytest"]
    assert "python -m pytest" in ci


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), namespace)
