"""What a person watching a run sees: one line per epoch, or a live bar in a terminal."""

from __future__ import annotations

import io
import re
import sys
from typing import Any

import pytest
import torch

import dltrain
from dltrain import ConfigError, RunKind, State
from dltrain.default_plugins import progress
from dltrain.default_plugins.progress import BarProgress, LineProgress, format_value, resolve_mode
from dltrain.testing import tiny_loader, tiny_model

LINE = re.compile(r"^epoch (\d+)/(\d+)  train_loss \d\.\d{4}(?P<val>.*)  \(\d+\.\d s\)$")


def fit(trainer: dltrain.Trainer, *, val: bool = True, samples: int = 32) -> dltrain.History:
    model = tiny_model()
    return trainer.fit(
        model,
        tiny_loader(samples=samples, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16, seed=1) if val else None,
    )


def make_trainer(**config: Any) -> dltrain.Trainer:
    config.setdefault("device", "cpu")
    config.setdefault("run_dir", None)
    return dltrain.Trainer(**config)


def test_line_mode_prints_one_line_per_epoch_with_its_validation(capsys: pytest.CaptureFixture[str]) -> None:
    history = fit(make_trainer(progress="line", max_epochs=3))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines, 1):
        match = LINE.match(line)
        assert match, line
        assert match.group(1, 2) == (str(epoch), "3")
        assert re.fullmatch(r"  val_loss \d\.\d{4}  val_accuracy \d\.\d{4}", match["val"]), line
    assert f"val_loss {history['val_loss'][-1]:.4f}" in lines[-1]


def test_an_epoch_without_validation_gets_its_line_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    fit(make_trainer(progress="line", max_epochs=3, val_every_n_epochs=2))
    lines = capsys.readouterr().out.splitlines()
    assert ["val_loss" in line for line in lines] == [False, True, True]  # epoch 3 is the last


def test_standalone_evaluations_print_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = make_trainer(progress="line")
    model = tiny_model()
    trainer.validate(model, tiny_loader(), loss_fn=torch.nn.CrossEntropyLoss())
    trainer.test(model, tiny_loader(), loss_fn=torch.nn.CrossEntropyLoss())
    trainer.predict(model, tiny_loader())
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"validate  val_loss \d\.\d{4}  val_accuracy \d\.\d{4}  \(\d+\.\d s\)", lines[0])
    assert re.fullmatch(r"test  test_loss \d\.\d{4}  test_accuracy \d\.\d{4}  \(\d+\.\d s\)", lines[1])
    assert re.fullmatch(r"predict  4 batches  \(\d+\.\d s\)", lines[2])


def test_a_stopped_fit_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    class StopAfterOne:
        @dltrain.hookimpl
        def on_train_epoch_end(self, trainer: dltrain.Trainer) -> None:
            trainer.request_stop("enough for today")

    fit(make_trainer(progress="line", max_epochs=5, plugins=[StopAfterOne()]), val=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1/5") and lines[1] == "stopped: enough for today"


def test_a_step_limited_run_shows_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    fit(make_trainer(progress="line", max_steps=6), val=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("epoch 1  step 4/6  train_loss ")


def test_the_line_of_a_failed_epoch_is_still_printed(capsys: pytest.CaptureFixture[str]) -> None:
    class FailAtSecondEpoch:
        @dltrain.hookimpl
        def on_train_epoch_start(self, state: State) -> None:
            if state.epoch == 1:
                raise RuntimeError("disk full")

    with pytest.raises(dltrain.PluginError, match="disk full"):
        fit(make_trainer(progress="line", max_epochs=3, plugins=[FailAtSecondEpoch()]), val=False)
    assert capsys.readouterr().out.startswith("epoch 1/3  train_loss")


def test_off_prints_nothing_and_registers_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = make_trainer(progress="off")
    assert trainer.plugin_manager.get_plugin("progress") is None
    fit(trainer)
    assert capsys.readouterr().out == ""


def test_only_rank_zero_prints() -> None:
    out = io.StringIO()
    plugin = LineProgress(max_epochs=1, stream=out)
    state = State(run=RunKind.FIT, rank=1, world_size=2)
    plugin.on_train_epoch_start(state)
    plugin.on_epoch_end(state, {"train_loss": 0.5})
    plugin.on_fit_end(state)
    assert out.getvalue() == ""


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_draws_a_bar_in_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert type(make_trainer().plugin_manager.get_plugin("progress")) is LineProgress
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    assert type(make_trainer().plugin_manager.get_plugin("progress")) is BarProgress
    monkeypatch.setattr(progress, "_tqdm_available", lambda: False)
    assert resolve_mode("auto", FakeTerminal()) == "line"


def test_a_bar_without_tqdm_is_an_error_that_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_tqdm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'torch-dltrain\[progress\]'"):
        make_trainer(progress="bar")


def test_the_bar_leaves_the_same_lines_and_shows_the_running_loss() -> None:
    pytest.importorskip("tqdm")
    terminal = FakeTerminal()
    bar = BarProgress(max_epochs=2, stream=terminal, refresh_s=0.0)
    fit(make_trainer(progress="off", max_epochs=2, plugins=[bar]))
    text = terminal.getvalue()
    assert "epoch 1/2:" in text and "batch/s" in text and "loss " in text  # the live bar
    assert "validating:" in text
    lines = [line.split("\r")[-1].strip() for line in text.split("\n")]
    epoch_lines = [line for line in lines if line.startswith("epoch ") and "(" in line and "s)" in line]
    assert len(epoch_lines) == 2 and all(LINE.match(line) for line in epoch_lines), epoch_lines


def test_the_bar_reads_the_loss_from_the_device_only_when_it_refreshes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("tqdm")
    reads: list[int] = []
    original = torch.Tensor.__float__

    def counting(self: torch.Tensor) -> float:
        reads.append(1)
        return original(self)

    def fit_counting(refresh_s: float) -> int:
        reads.clear()
        bar = BarProgress(max_epochs=1, stream=FakeTerminal(), refresh_s=refresh_s)
        trainer = make_trainer(progress="off", plugins=[bar])
        monkeypatch.setattr(torch.Tensor, "__float__", counting)
        fit(trainer, val=False, samples=160)  # 20 steps
        monkeypatch.setattr(torch.Tensor, "__float__", original)
        return len(reads)

    baseline = fit_counting(refresh_s=3600.0)  # never refreshes during the epoch
    assert fit_counting(refresh_s=0.0) == baseline + 20


def test_values_read_well() -> None:
    assert format_value(0.31214) == "0.3121"
    assert format_value(1234.5) == "1234.5000"
    assert format_value(2.5e-5) == "2.500e-05"
    assert format_value(0.0) == "0.0000"
    assert format_value(float("nan")) == "nan"
