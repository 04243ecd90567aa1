"""The ``dltrain`` command, used as people use it: a run file, overrides, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dltrain.cli import main
from dltrain.default_plugins.metric_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]

RUN_FILE = """\
seed: 0
trainer:
  max_epochs: 3
  device: cpu
  progress: line
  log_every_n_steps: 2
model:
  class_path: dltrain.testing:tiny_model
optimizer:
  class_path: torch.optim:SGD
  init_args: {lr: 0.1}
loss:
  class_path: torch.nn:CrossEntropyLoss
data:
  train: {class_path: dltrain.testing:tiny_loader, init_args: {samples: 32, batch_size: 8}}
  val: {class_path: dltrain.testing:tiny_loader, init_args: {samples: 16, seed: 1}}
  test: {class_path: dltrain.testing:tiny_loader, init_args: {samples: 16, seed: 2}}
"""


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(RUN_FILE)
    return path


def edited(run_file: Path, old: str, new: str) -> Path:
    text = run_file.read_text()
    assert old in text
    run_file.write_text(text.replace(old, new))
    return run_file


def fit_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["fit", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_fit_trains_tests_and_keeps_the_run(
    run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", "--config", str(run_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nepoch ") + out.startswith("epoch ") == 3
    assert "test: test_loss " in out and "run folder: runs/" in out
    run = only_run(tmp_path)
    assert json.loads((run / "config.json").read_text())["max_epochs"] == 3
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["model"]["class_path"] == "dltrain.testing:tiny_model" and run_json["seed"] == 0
    kinds = [r["kind"] for r in read_metrics(run)]
    assert kinds.count("epoch") == 3 and kinds[-1] == "test"


@pytest.mark.parametrize(
    "args",
    [
        ["--trainer.max_epochs", "1", "--config", "RUN"],
        ["--config", "RUN", "--trainer.max_epochs=1"],
        ["-c", "RUN", "--trainer.max_epochs", "1", "--optimizer.init_args.lr", "0.5"],
    ],
    ids=["override-first", "override-last-with-equals", "short-option"],
)
def test_overrides_come_before_or_after_the_config(
    run_file: Path, tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *[str(run_file) if a == "RUN" else a for a in args]]) == 0
    epochs = [r for r in read_metrics(only_run(tmp_path)) if r["kind"] == "epoch"]
    assert len(epochs) == 1


def test_yaml_off_is_the_string_off_not_false(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited(run_file, "progress: line", "progress: off")
    assert main(["fit", "-c", str(run_file), "--trainer.accuracy", "never", "--print-config"]) == 0
    assert (
        main(
            [
                "fit",
                "-c",
                str(run_file),
                "--trainer.progress",
                "off",
                "--trainer.compile",
                "false",
                "--print-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("progress: 'off'") == 2 and "compile: false" in out


def test_print_config_shows_the_run_with_overrides_applied(
    run_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["fit", "--config", str(run_file), "--trainer.max_epochs", "7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_epochs: 7" in out and "class_path: torch.optim:SGD" in out and "lr: 0.1" in out
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_an_unknown_key_names_the_closest_valid_one(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fit_error(capsys, "--config", str(run_file), "--trainer.max_epoch", "3")
    assert "unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?" in err
    err = fit_error(capsys, "--config", str(run_file), "--optimiser.init_args.lr", "3")
    assert "did you mean 'optimizer.init_args.lr'?" in err
    err = fit_error(capsys, "--config", str(edited(run_file, "  device: cpu", "  devise: cpu")))
    assert "trainer.devise: unknown key in" in err and "did you mean 'trainer.device'?" in err


def test_a_bad_value_names_its_key_what_is_allowed_and_where_it_came_from(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fit_error(capsys, "--config", str(run_file), "--trainer.max_epochs", "0")
    assert "trainer.max_epochs: Input should be greater than 0 (got 0 from --trainer.max_epochs)" in err
    err = fit_error(capsys, "--config", str(edited(run_file, "progress: line", "progress: fancy")))
    assert "trainer.progress: Input should be 'auto', 'bar', 'line' or 'off'" in err and "run.yaml" in err


def test_a_missing_section_says_what_it_is_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.yaml").write_text("trainer: {max_epochs: 1}\n")
    err = fit_error(capsys, "--config", str(tmp_path / "run.yaml"))
    assert "model: missing; required: The model" in err
    assert "optimizer: missing" in err and "data: missing" in err


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "dltrain.testing:tiny_model",
            "foo.Bar",
            "model.class_path: cannot import 'foo.Bar': module 'foo' not found",
        ),
        ("torch.optim:SGD", "torch.optim:SDG", "'torch.optim' has no attribute 'SDG'; did you mean 'SGD'?"),
        ("torch.optim:SGD", "torch optim", "optimizer.class_path: 'torch optim' is not an import path"),
        (
            "init_args: {lr: 0.1}",
            "init_args: {lrr: 0.1}",
            "optimizer.init_args: torch.optim:SGD does not accept them: got an unexpected keyword "
            "argument 'lrr'; 'lrr': did you mean 'lr'?",
        ),
        (
            "samples: 32, batch_size: 8",
            "samples: 32, batch_size: -1",
            "data.train: dltrain.testing:tiny_loader(...) raised ValueError: batch_size should be",
        ),
    ],
    ids=["no-module", "typo-in-name", "not-a-path", "typo-in-argument", "factory-raised"],
)
def test_import_and_call_errors_name_the_key(
    run_file: Path, old: str, new: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in fit_error(capsys, "--config", str(edited(run_file, old, new)))


def test_a_loss_function_is_used_as_it_is(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited(run_file, "torch.nn:CrossEntropyLoss", "torch.nn.functional:cross_entropy")
    assert main(["fit", "--config", str(run_file), "--trainer.max_epochs", "1"]) == 0


def test_class_paths_are_found_next_to_the_run_file(
    tmp_path: Path, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_models_for_cli_test.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Small(torch.nn.Module):
                def __init__(self, hidden: int = 4):
                    super().__init__()
                    self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 3))

                def forward(self, x):
                    return self.net(x)
            """
        )
    )
    edited(run_file, "class_path: dltrain.testing:tiny_model", "class_path: my_models_for_cli_test:Small")
    moved = project / "run.yaml"
    run_file.rename(moved)
    try:
        assert (
            main(["fit", "-c", str(moved), "--model.init_args.hidden", "6", "--trainer.max_epochs", "1"]) == 0
        )
    finally:
        sys.modules.pop("my_models_for_cli_test", None)
        sys.path[:] = [p for p in sys.path if p != str(project)]


def test_unexpected_arguments_and_a_missing_config_are_explained(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "overrides are written --key value" in fit_error(capsys, "--config", str(run_file), "stray")
    assert "needs a value" in fit_error(capsys, "--config", str(run_file), "--trainer.max_epochs")
    assert "pass --config FILE" in fit_error(capsys)
    assert "does not exist" in fit_error(capsys, "--config", "nope.yaml")


def test_plugins_lists_each_plugin_its_source_and_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("device", "step", "metrics", "metric_log"):
        assert f"  {name} " in out
    assert "builtin" in out and "dltrain.default_plugins.metric_log.MetricLogPlugin" in out
    table = out.split("Hooks, as declared")[1]
    line = next(line for line in table.splitlines() if line.strip().startswith("on_fit_start"))
    assert "metric_log" in line


def test_plugins_uses_the_trainer_section_of_a_run_file(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edited(run_file, "  progress: line", "  progress: off\n  disable_plugins: [metric_log]")
    assert main(["plugins", "--config", str(run_file)]) == 0
    listing = capsys.readouterr().out.split("Hooks, as declared")[0]
    assert "  metrics " in listing and "metric_log" not in listing and "progress" not in listing
    edited(run_file, "progress: off", "progress: fancy")
    assert main(["plugins", "--config", str(run_file)]) == 2
    assert "trainer.progress: Input should be 'auto', 'bar', 'line' or 'off'" in capsys.readouterr().err


def test_config_schema_is_the_json_schema_of_the_run_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"trainer", "model", "optimizer", "loss", "scheduler", "data", "seed"} <= set(schema["properties"])
    assert set(schema["required"]) == {"model", "optimizer", "data"}
    assert "max_epochs" in schema["$defs"]["TrainerConfig"]["properties"]


def test_plot_writes_the_png_and_prints_its_path(
    run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["fit", "--config", str(run_file)]) == 0
    capsys.readouterr()
    assert main(["plot", "runs"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.resolve() == only_run(tmp_path) / "curves.png" and printed.is_file()
    assert main(["plot", "nowhere"]) == 2
    assert "run folder 'nowhere' does not exist" in capsys.readouterr().err


def test_the_mnist_example_runs_from_its_config_file(
    mnist_fake_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DLTRAIN_MNIST_DIR", str(mnist_fake_dir))
    config = ROOT / "examples" / "mnist" / "config.yaml"
    try:
        code = main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--trainer.device", "cpu",
                     "--optimizer.init_args.lr", "0.1"])  # fmt: skip
    finally:
        for name in ("mnist_model", "mnist_run", "mnist_data"):
            sys.modules.pop(name, None)
    assert code == 0, capsys.readouterr().err
    epochs = [r for r in read_metrics(only_run(tmp_path)) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["val_accuracy"] > 0.5


def test_the_installed_command_runs(tmp_path: Path) -> None:
    env = {**os.environ, "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dltrain", "fit", "--trainer.max_epochs", "x"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("dltrain fit: error: invalid run configuration:")
    assert (
        "trainer.max_epochs: Input should be a positive integer or None, not the string 'x' "
        "(got 'x' from --trainer.max_epochs)" in result.stderr
    )


def test_the_mnist_config_without_data_says_what_to_set_in_the_run_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DLTRAIN_MNIST_DIR", str(tmp_path / "nowhere"))
    config = ROOT / "examples" / "mnist" / "config.yaml"
    fix = ["--data.train.init_args.download", "true", "--data.val.init_args.download", "true"]
    try:
        code = main(["fit", "--config", str(config), "--trainer.device", "cpu"])
        # The overrides the message suggests are valid keys of the run file.
        assert main(["fit", "--config", str(config), *fix, "--print-config"]) == 0
    finally:
        for name in ("mnist_model", "mnist_run", "mnist_data"):
            sys.modules.pop(name, None)
    err = capsys.readouterr().err
    assert code == 2
    assert "nowhere" in err and "does not exist" in err
    assert "$DLTRAIN_MNIST_DIR" in err and "download: true" in err and " ".join(fix) in err
    assert "--download " not in err and "--data-dir" not in err  # flags of the scripts, not of dltrain fit


def test_version_is_the_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    import dltrain

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dltrain {expected}"
    assert dltrain.__version__ == expected


def test_verify_resume_checks_a_run_file(
    mnist_fake_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DLTRAIN_MNIST_DIR", str(mnist_fake_dir))
    config = ROOT / "examples" / "mnist" / "config.yaml"
    try:
        code = main(["verify-resume", "--config", str(config), "--steps", "5", "--interrupt-at", "2",
                     "--trainer.device", "cpu"])  # fmt: skip
    finally:
        for name in ("mnist_model", "mnist_run", "mnist_data"):
            sys.modules.pop(name, None)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("resume at step 2 of 5: exact (")
