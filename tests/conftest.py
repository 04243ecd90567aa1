"""Shared fixtures. Every test runs in its own temporary working directory,
so runs/, checkpoints and other files a Trainer writes never leak."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run in temporary directories: resolve a relative data directory once, now.
if os.environ.get("DLTRAIN_MNIST_DIR"):
    os.environ["DLTRAIN_MNIST_DIR"] = os.path.abspath(os.environ["DLTRAIN_MNIST_DIR"])


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core tests see only the plugins they register: installed distributions
    (tests of their own live in plugins/) are not autoloaded here."""
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")


# --- MNIST example fixtures (tests/test_mnist_example.py) ------------------------

MNIST_DIR_ENV = "DLTRAIN_MNIST_DIR"
MNIST_RAW_FILES = (
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="session")
def mnist_real_dir() -> Path:
    """The real MNIST from ``$DLTRAIN_MNIST_DIR`` (relative paths: from the repo root); else skip."""
    import os

    setting = os.environ.get(MNIST_DIR_ENV)
    if not setting:
        pytest.skip(
            f"real MNIST not configured: set {MNIST_DIR_ENV} to a directory holding MNIST/raw/ "
            "(CI uses ../shared/data)"
        )
    path = Path(setting)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path
    missing = [f for f in MNIST_RAW_FILES if not (path / f).is_file()]
    if missing:
        pytest.skip(f"{MNIST_DIR_ENV}={setting!r} ({path}) lacks {', '.join(missing)}")
    return path


@pytest.fixture(scope="session")
def mnist_fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable fake MNIST (600 train, 100 test images) in torchvision's layout."""
    from mnist_fakes import write_fake_mnist

    return write_fake_mnist(tmp_path_factory.mktemp("mnist_fake"))


# --- installed plugin distributions (progress, metric log, CLI: issue 8) ---------------


@pytest.fixture(autouse=True)
def _no_installed_entry_point_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the core suite as if no plugin distribution were installed.

    Distributions such as dltrain-tensorboard register entry points that every
    Trainer would load; their own tests (plugins/*/tests) exercise that. Tests
    that install a fake distribution delete this variable themselves.
    """
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
