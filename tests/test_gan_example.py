"""The GAN example (examples/gan/): the DCGAN through dltrain equals its hand-written twin, and resumes bit for bit.

It runs on the real MNIST from ``$DLTRAIN_MNIST_DIR`` when set (a subset of it),
else on small generated files in MNIST's format.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "gan"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))

SMALL = ["--subset", "512", "--batch-size", "32", "--width", "8", "--log-every", "4"]


def _load(script: str) -> ModuleType:
    name = f"gan_example_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    real = os.environ.get("DLTRAIN_MNIST_DIR")
    if real and (Path(real) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(real)
    from mnist_fakes import write_fake_mnist

    return write_fake_mnist(tmp_path_factory.mktemp("gan_mnist"))


def _args(script: str, *argv: str) -> argparse.Namespace:
    module = _load(script)
    parser = module.build_parser("test")
    if hasattr(module, "add_options"):
        module.add_options(parser)
    return parser.parse_args(list(argv))  # type: ignore[no-any-return]


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for net in ("discriminator", "generator"):
        sa, sb = a["optimizers"][net], b["optimizers"][net]
        assert sa["param_groups"] == sb["param_groups"]
        for index, values in sa["state"].items():
            for key, value in values.items():
                assert torch.equal(value, sb["state"][index][key]), (net, index, key)


def test_the_dltrain_gan_and_its_plain_twin_end_with_identical_weights_and_optimizers(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(data_dir), *SMALL, "--steps", "20"]
    through_dltrain = _load("train").train(_args("train", *argv))
    by_hand = _load("plain_pytorch").train(_args("plain_pytorch", *argv))
    _same_state(through_dltrain, by_hand)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[:5] == lines[5:]  # the same loss lines, digit for digit


def test_a_gan_killed_mid_epoch_resumes_bit_identically(data_dir: Path, tmp_path: Path) -> None:
    """SIGKILL while it trains (16 batches an epoch, checkpoints every 3 steps), then --resume last."""
    common = ["--data-dir", str(data_dir), *SMALL, "--steps", "40", "--checkpoint-every", "3"]
    env = {**os.environ, "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(EXAMPLE_DIR / "train.py")]
    straight = tmp_path / "straight.pt"
    subprocess.run(
        [*script, *common, "--checkpoint-dir", str(tmp_path / "a"), "--save", str(straight)],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    run = subprocess.Popen(
        [*script, *common, "--checkpoint-dir", str(tmp_path / "b")],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert run.stdout is not None
    for line in run.stdout:  # "step 20: ..." is printed after the checkpoint of step 18 committed
        if line.startswith("step 20:"):
            run.send_signal(signal.SIGKILL)
            break
    assert run.wait(timeout=60) == -signal.SIGKILL
    resumed = tmp_path / "resumed.pt"
    done = subprocess.run(
        [*script, *common, "--checkpoint-dir", str(tmp_path / "b"), "--resume", "last", "--save", str(resumed)],
        env=env, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.stdout.splitlines()[-1].startswith("step 40:")
    _same_state(torch.load(resumed, weights_only=True), torch.load(straight, weights_only=True))


def test_the_gan_without_data_says_where_it_looked(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE_DIR / "train.py"), "--data-dir", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "MNIST not found" in result.stderr and "train-images-idx3-ubyte" in result.stderr
