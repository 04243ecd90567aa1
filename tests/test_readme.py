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
    """CI reads the test command from the README and runs it as it is, in a fresh environment."""
    import subprocess
    import sys

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"```bash\n.*?\n(.*?)\n```", README, re.S).group(1)  # type: ignore[union-attr]
    printed = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_command.py"), "test"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert printed == test_command
    assert test_command.split(" && ")[-1].split()[-3:] == ["python", "-m", "pytest"]
    assert 'README_TEST="$("$WORK/tools/bin/python" .ci/readme_command.py test)"' in ci
    assert 'eval "$README_TEST"' in ci
    assert "venv --quiet --seed" in ci  # a new environment, not this machine's


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), namespace)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def _installed_by(command: str) -> set[str]:
    """The distributions a README ``pip install`` names directly: the project with its extras, and each
    ``-e plugins/<name>`` folder with its own dependencies."""
    import tomllib

    install = command.split(" && ")[0]
    names: set[str] = set()
    for target in re.findall(r'-e\s+"?([^"\s]+)"?', install):
        path, _, extras = target.partition("[")
        project = tomllib.loads((ROOT / path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        names.add(_normalize(project["name"]))
        names |= _requirement_names(project.get("dependencies", []))
        for extra in filter(None, extras.rstrip("]").split(",")):
            names |= _requirement_names(project["optional-dependencies"][extra])
    return names


def test_the_first_command_installs_everything_the_examples_use() -> None:
    """A new user runs the first command, then any script or run file in examples/: each
    third-party package they import, and PyYAML for the YAML run files, must come with it."""
    import ast
    import importlib.metadata
    import sys

    first = re.search(r"```bash\n(.*?)\n", README).group(1)  # type: ignore[union-attr]
    installed = _installed_by(first)
    providers = importlib.metadata.packages_distributions()
    local = {p.stem for p in (ROOT / "examples").rglob("*.py")}
    needed: dict[str, str] = {}
    for script in (ROOT / "examples").rglob("*.py"):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "dltrain":
                    continue
                for dist in providers.get(top, [top]):
                    needed[_normalize(dist)] = f"{script.relative_to(ROOT)} imports {module}"
    if any((ROOT / "examples").rglob("*.yaml")):
        needed["pyyaml"] = "examples/ has YAML run files (dltrain fit --config)"
    missing = {dist: why for dist, why in needed.items() if dist not in installed}
    assert not missing, f"the README's first command does not install: {missing}"
