"""dltrain.callbacks as a package: its names, run files that list plugins, the MNIST example with callbacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dltrain.callbacks
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.cli import main
from dltrain.default_plugins.metric_log import read_metrics
from dltrain.plot import LEARNING_RATE, plot_run, step_series

ROOT = Path(__file__).resolve().parents[1]

RUN_FILE = """\
seed: 0
trainer: {max_epochs: 3, device: cpu, progress: "off", log_every_n_steps: 2}
model: {class_path: dltrain.testing:tiny_model}
optimizer: {class_path: torch.optim:SGD, init_args: {lr: 0.0}}
loss: {class_path: torch.nn:CrossEntropyLoss}
data:
  train: {class_path: dltrain.testing:tiny_loader, init_args: {samples: 32, batch_size: 8}}
  val: {class_path: dltrain.testing:tiny_loader, init_args: {samples: 16, seed: 1}}
plugins:
  - class_path: dltrain.callbacks:EarlyStopping
    init_args: {monitor: val_loss, patience: 1}
  - {class_path: dltrain.callbacks:LearningRateMonitor}
"""


@pytest.mark.parametrize("name", dltrain.callbacks.__all__)
def test_every_public_name_is_documented_and_comes_from_its_own_module(name: str) -> None:
    module = dltrain.callbacks._LAZY[name]
    value = getattr(dltrain.callbacks, name)
    assert value.__module__ == module and value.__doc__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"module 'dltrain\.callbacks' has no attribute 'EarlyStop'"):
        dltrain.callbacks.EarlyStop  # noqa: B018


def test_the_package_imports_a_callback_module_only_when_it_is_used() -> None:
    code = textwrap.dedent(
        """
        import sys
        import dltrain.callbacks
        before = sorted(n for n in sys.modules if n.startswith("dltrain.callbacks."))
        dltrain.callbacks.EMA
        after = sorted(n for n in sys.modules if n.startswith("dltrain.callbacks."))
        print(before, after)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['dltrain.callbacks.ema']"


def test_a_run_file_registers_its_plugins(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(RUN_FILE)
    assert main(["fit", "--config", "run.yaml"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2  # lr 0: nothing improves, patience 1
    assert all(r["lr-default/group0"] == 0.0 for r in rows if r["kind"] == "step")
    assert json.loads((run / "run.json").read_text())["plugins"][1] == {
        "class_path": "dltrain.callbacks:LearningRateMonitor",
        "init_args": {},
    }
    # An override reaches an entry of the list by its index.
    assert main(["fit", "--config", "run.yaml", "--plugins.0.init_args.patience", "5"]) == 0
    newest = max((tmp_path / "runs").iterdir())
    assert len([r for r in read_metrics(newest) if r["kind"] == "epoch"]) == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--plugins.0.init_args.patiense", "3"],
            "plugins[0].init_args: dltrain.callbacks:EarlyStopping does not accept them: got an unexpected "
            "keyword argument 'patiense'; 'patiense': did you mean 'patience'?",
        ),
        (
            ["--plugins.1.class_path", "dltrain.callbacks:LRMonitor"],
            "plugins[1].class_path: cannot import 'dltrain.callbacks:LRMonitor'",
        ),
        (
            ["--plugins.0.init_args.mode", "lowest"],
            "plugins[0]: dltrain.callbacks:EarlyStopping(...) raised ConfigError: EarlyStopping: mode must be "
            "'min' or 'max', got 'lowest'",
        ),
        (
            ["--plugins.1.class_path", "torch.nn:Identity"],
            "plugins[1].class_path: 'torch.nn:Identity' built a Identity, which implements no dltrain hook",
        ),
        (
            ["--plugins.1.class_path", "dltrain.callbacks:EarlyStopping"],
            "plugins[1]: plugins[0] and plugins[1] are both plugins named 'early_stopping'",
        ),
        (["--plugins", "[{init_args: {}}]"], "plugins[0].class_path: missing; required: Import path"),
        (
            ["--plugins.2.class_path", "x:Y"],
            "--plugins.2.class_path: 'plugins' has 2 entries (indexes 0 to 1)",
        ),
        (["--plugins.class_path", "x:Y"], "'plugins' is a list; name an entry by its index"),
    ],
)
def test_a_bad_plugin_entry_is_an_error_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: list[str], message: str
) -> None:
    (tmp_path / "run.yaml").write_text(RUN_FILE)
    assert main(["fit", "--config", "run.yaml", *override]) == 2
    assert message in capsys.readouterr().err


def test_a_run_file_resumes_the_run_its_plugins_stopped(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(RUN_FILE + "  - {class_path: dltrain.callbacks:EMA}\n")
    first = [
        "fit",
        "--config",
        "run.yaml",
        "--trainer.checkpoint",
        "{dir: ckpt}",
        "--trainer.max_epochs",
        "1",
    ]
    assert main(first) == 0
    assert main([*first[:-1], "4", "--resume", "last"]) == 0
    (run,) = (tmp_path / "runs").iterdir()  # the resumed run continues the same folder
    rows = read_metrics(run)
    assert [r["kind"] for r in rows if r["kind"] != "step"] == ["epoch", "resume", "epoch"]
    last = list_checkpoints(tmp_path / "ckpt")[-1]
    payload = load_checkpoint(last.payload_path)
    assert last.global_step == payload["plugins"]["ema"]["updates"] == 8  # 2 epochs of 4 steps
    assert payload["plugins"]["early_stopping"]["wait"] == 1  # lr 0: stopped after the 2nd epoch


def test_dltrain_plugins_lists_the_run_files_plugins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.yaml").write_text(RUN_FILE)
    assert main(["plugins", "--config", "run.yaml"]) == 0
    out = capsys.readouterr().out
    assert "early_stopping  user        dltrain.callbacks.early_stopping.EarlyStopping" in out
    assert "hooks: compute_step_metrics, compute_metrics" in out
    (tmp_path / "bad.yaml").write_text(
        RUN_FILE.replace("{class_path: dltrain.callbacks:LearningRateMonitor}", "{}")
    )
    assert main(["plugins", "--config", "bad.yaml"]) == 2
    assert "plugins[1].class_path: missing" in capsys.readouterr().err


def test_the_mnist_example_with_callbacks_runs_and_its_values_are_logged_and_drawn(
    mnist_fake_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DLTRAIN_MNIST_DIR", str(mnist_fake_dir))
    config = ROOT / "examples" / "mnist" / "config_callbacks.yaml"
    try:
        # 12 steps: a short average (decay 0.5), so that the validation of the average learns
        code = main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--trainer.device", "cpu",
                     "--trainer.log_every_n_steps", "2", "--optimizer.init_args.lr", "0.1",
                     "--plugins.1.init_args.decay", "0.5"])  # fmt: skip
    finally:
        for name in ("mnist_model", "mnist_run", "mnist_data"):
            sys.modules.pop(name, None)
    assert code == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run)
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["val_accuracy"] > 0.3
    assert all(r["lr-default/group0"] == 0.1 and r["grad_norm"] > 0 for r in steps)
    assert {"grad_norm_layer/fc1", "grad_norm_layer/fc2", "grad_norm_layer/fc3"} <= set(steps[0])
    assert epochs[-1]["train_lr-default/group0"] == 0.1
    panels = step_series(rows)
    assert panels[LEARNING_RATE] == ["lr-default/group0"]
    assert panels["grad norm"] == ["grad_norm"]
    assert len(panels["grad norm layer"]) == 3
    pytest.importorskip("matplotlib")
    assert plot_run(run).is_file()
