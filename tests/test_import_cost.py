"""``import dltrain`` loads no optional dependency, nor its opt-in parts: each loads only when used.

One fresh interpreter runs a few steps in order and reports, after each, which
optional packages are loaded that were not after importing dltrain's required
dependencies (torch, pluggy, pydantic). That baseline matters: torch itself
may import some of them (``torch.hub`` imports tqdm when it is installed),
which is not dltrain's doing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import pytest

OPTIONAL = ("torchvision", "matplotlib", "tqdm", "rich", "tensorboard", "yaml")
#: dltrain's own opt-in modules: none is imported until a program uses it.
OPT_IN = ("dltrain.callbacks",)

STEPS = {
    "import dltrain": "import dltrain",
    "import dltrain.data": "import dltrain.data",
    "a quiet Trainer": "dltrain.Trainer(device='cpu', progress='off', run_dir=None)",
    "one callback": "from dltrain.callbacks import EarlyStopping",
    # Last, to show the check sees an import when there is one.
    "import the optional packages": "\n".join(
        f"try:\n    import {m}\nexcept ImportError:\n    pass" for m in OPTIONAL
    ),
}

_SCRIPT = """
import json, sys
import torch, pluggy, pydantic

OPTIONAL = set({optional!r})
OPT_IN = {opt_in!r}
baseline = {{n.split(".")[0] for n in sys.modules}} & OPTIONAL
report = {{"baseline": sorted(baseline)}}
for name, code in {steps!r}.items():
    exec(code)
    report[name] = sorted(({{n.split(".")[0] for n in sys.modules}} & OPTIONAL) - baseline)
    report[name + " (opt-in)"] = sorted(n for n in sys.modules if n.startswith(OPT_IN))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """For each step, the optional packages loaded by then beyond the baseline."""
    script = _SCRIPT.format(optional=OPTIONAL, opt_in=OPT_IN, steps=STEPS)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize("step", ["import dltrain", "import dltrain.data", "a quiet Trainer"])
def test_loads_no_optional_dependency(loaded: dict[str, list[str]], step: str) -> None:
    assert loaded[step] == [], f"{step} loaded {loaded[step]}"


@pytest.mark.parametrize("step", ["import dltrain", "import dltrain.data", "a quiet Trainer"])
def test_loads_no_opt_in_module(loaded: dict[str, list[str]], step: str) -> None:
    assert loaded[f"{step} (opt-in)"] == [], f"{step} loaded {loaded[f'{step} (opt-in)']}"


def test_a_callback_loads_its_own_module_alone(loaded: dict[str, list[str]]) -> None:
    assert loaded["one callback (opt-in)"] == ["dltrain.callbacks", "dltrain.callbacks.early_stopping"]


def test_the_check_sees_an_import(loaded: dict[str, list[str]]) -> None:
    installed = {m for m in OPTIONAL if find_spec(m) is not None}
    expected = sorted(installed - set(loaded["baseline"]))
    if not expected:
        pytest.skip("no optional package is installed that torch does not import itself")
    assert loaded["import the optional packages"] == expected
