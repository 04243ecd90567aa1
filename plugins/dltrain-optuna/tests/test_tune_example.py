"""examples/mnist/tune.py: a real study of short trials on a small fake MNIST, stored in SQLite."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install -e plugins/dltrain-optuna")
pytest.importorskip("torchvision", reason="the MNIST example reads MNIST through torchvision")

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_DIR = ROOT / "examples" / "mnist"
TESTS_DIR = ROOT / "tests"

# The script imports its sibling modules (mnist_data, ...), as when run directly; mnist_fakes
# writes small MNIST files in the original format.
for folder in (EXAMPLE_DIR, TESTS_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from mnist_fakes import write_fake_mnist  # noqa: E402  (needs TESTS_DIR on sys.path)

# A fake MNIST of 600 training images: 500 to train on, 100 to validate on.
SMALL = ["--train-samples", "500", "--val-samples", "100", "--epochs", "2", "--device", "cpu"]
TRIAL_LINE = re.compile(r"^trial (\d+): (.*); lr=\S+, batch_size=\d+, width=\d+$")


def _load_tune() -> ModuleType:
    name = "mnist_example_tune"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / "tune.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    return write_fake_mnist(tmp_path / "mnist")


def test_a_study_prunes_the_worse_trials_prints_the_best_and_continues_where_it_stopped(
    fake_mnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tune = _load_tune()
    storage = "sqlite:///tune.db"
    common = ["--data-dir", str(fake_mnist), *SMALL, "--storage", storage, "--study-name", "small"]

    # The sampler and the training are seeded: the same six trials every time. After the two
    # startup trials, a trial whose first-epoch loss is above the median of the finished trials'
    # is pruned (here trials 4 and 5, by 0.03 and 0.04: far above float noise).
    assert tune.main([*common, "--trials", "6", "--startup-trials", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    study = optuna.load_study(study_name="small", storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 6
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    for trial in study.trials:
        assert TRIAL_LINE.match(out[trial.number]), out[trial.number]
        if trial.state is optuna.trial.TrialState.PRUNED:
            assert out[trial.number].startswith(f"trial {trial.number}: pruned after epoch 1, val_loss")
            assert list(trial.intermediate_values) == [1]  # stopped after its first epoch
        else:
            assert list(trial.intermediate_values) == [1, 2]
    best = study.best_trial
    assert out[6] == f"best trial {best.number}: val_loss {best.value:.4f}" + (
        f" (val_accuracy {100 * best.user_attrs['val_accuracy']:.2f} %)"
    )
    assert out[7:] == [f"  {name}: {value}" for name, value in best.params.items()]
    assert set(best.params) == {"lr", "batch_size", "width"}

    # The same command with a larger --trials continues the stored study.
    assert tune.main([*common, "--trials", "7", "--startup-trials", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "study 'small': 6 trials finished before; running 1 more"
    assert out[1].startswith("trial 6: ")
    trials = optuna.load_study(study_name="small", storage=storage).trials
    assert len(trials) == 7
    assert trials[6].params != trials[0].params  # the continued search draws new points


def test_missing_data_exits_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tune = _load_tune()
    assert tune.main(["--data-dir", str(tmp_path / "nowhere"), *SMALL, "--trials", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_more_samples_than_images_is_an_error_naming_both(
    fake_mnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tune = _load_tune()
    args = ["--data-dir", str(fake_mnist), "--train-samples", "550", "--val-samples", "100", "--trials", "1"]
    assert tune.main(args) == 2
    assert "--train-samples 550 + --val-samples 100 is more than the 600 training images" in (
        capsys.readouterr().err
    )
