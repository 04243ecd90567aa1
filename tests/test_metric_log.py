"""Every run keeps its metrics in a folder: config.json and metrics.jsonl, no server."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain import RunKind, State
from dltrain.default_plugins.metric_log import MetricLogPlugin, RunningMean, new_run_path, read_metrics
from dltrain.testing import tiny_loader, tiny_model


def make_trainer(**config: Any) -> dltrain.Trainer:
    config.setdefault("device", "cpu")
    config.setdefault("progress", "off")
    return dltrain.Trainer(**config)


def fit(trainer: dltrain.Trainer, *, samples: int = 64, val: bool = True) -> tuple[dltrain.History, Any]:
    model = tiny_model()
    history = trainer.fit(
        model,
        tiny_loader(samples=samples, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16, seed=1) if val else None,
    )
    return history, model


def run_path_of(trainer: dltrain.Trainer) -> Path:
    plugin = trainer.plugin_manager.get_plugin("metric_log")
    assert isinstance(plugin, MetricLogPlugin) and plugin.run_path is not None
    return plugin.run_path


class LossRecorder:
    """Records each batch's loss (with .item(): a test may sync)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, output: dltrain.StepOutput) -> None:
        assert output.loss is not None
        self.losses.append(output.loss.item())


def test_a_fit_writes_its_config_and_metrics_to_a_new_run_folder(tmp_path: Path) -> None:
    recorder = LossRecorder()
    trainer = make_trainer(max_epochs=2, log_every_n_steps=3, plugins=[recorder])
    history, model = fit(trainer)
    run_path = run_path_of(trainer)
    assert run_path.parent == tmp_path / "runs"
    assert json.loads((run_path / "config.json").read_text()) == trainer.config.to_json_dict()

    rows = read_metrics(run_path)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [8, 16]
    for row, expected in zip(epochs, history.epochs, strict=True):
        assert {k: row[k] for k in expected} == expected  # every epoch metric, same floats

    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [3, 6, 9, 12, 15]
    assert steps[0]["train_loss"] == pytest.approx(sum(recorder.losses[:3]) / 3)
    assert steps[1]["train_loss"] == pytest.approx(sum(recorder.losses[3:6]) / 3)
    assert steps[2]["epoch"] == 2 and steps[0]["lr"] == 0.1
    assert all(isinstance(r["time"], float) for r in rows)

    # An evaluation after the fit appends to the same folder.
    trainer.test(model, tiny_loader(samples=16, seed=2))
    assert run_path_of(trainer) == run_path
    last = read_metrics(run_path)[-1]
    assert last["kind"] == "test" and set(last) == {"kind", "test_loss", "test_accuracy", "time"}


def test_each_fit_gets_its_own_folder_even_in_the_same_second(tmp_path: Path) -> None:
    trainer = make_trainer()
    fit(trainer, val=False)
    first = run_path_of(trainer)
    fit(trainer, val=False)
    second = run_path_of(trainer)
    other = make_trainer()
    fit(other, val=False)
    assert len({first, second, run_path_of(other)}) == 3
    a, b = new_run_path(tmp_path / "r"), new_run_path(tmp_path / "r")
    assert a != b and b.name.startswith(a.name)


def test_runs_started_in_the_same_second_get_the_next_free_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as real_datetime

    from dltrain.default_plugins import metric_log

    class FrozenClock(real_datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return real_datetime.datetime(2026, 11, 28, 13, 5, 12)

    monkeypatch.setattr(metric_log.datetime, "datetime", FrozenClock)
    root = tmp_path / "runs"
    names = [new_run_path(root).name for _ in range(4)]
    assert names == [
        "2026-11-28_13-05-12",
        "2026-11-28_13-05-12_1",
        "2026-11-28_13-05-12_2",
        "2026-11-28_13-05-12_3",
    ]
    (root / "2026-11-28_13-05-12_9").mkdir()  # e.g. made by another process
    (root / "2026-11-28_13-05-12_x").mkdir()  # not a suffix: ignored
    assert new_run_path(root).name == "2026-11-28_13-05-12_10"


def test_a_standalone_evaluation_gets_a_folder_too() -> None:
    trainer = make_trainer()
    trainer.validate(tiny_model(), tiny_loader(), loss_fn=torch.nn.CrossEntropyLoss())
    rows = read_metrics(run_path_of(trainer))
    assert [r["kind"] for r in rows] == ["validate"] and "val_loss" in rows[0]


def test_run_dir_none_writes_nothing(tmp_path: Path) -> None:
    trainer = make_trainer(run_dir=None)
    assert trainer.plugin_manager.get_plugin("metric_log") is None
    fit(trainer)
    assert list(tmp_path.iterdir()) == []


def test_an_epoch_is_on_disk_when_the_next_one_starts() -> None:
    seen: list[list[int]] = []

    class Reader:
        @dltrain.hookimpl
        def on_train_epoch_start(self, trainer: dltrain.Trainer) -> None:
            plugin = trainer.plugin_manager.get_plugin("metric_log")
            path = getattr(plugin, "metrics_path", None)
            rows = read_metrics(path.parent) if path is not None and path.exists() else []
            seen.append([r["epoch"] for r in rows if r["kind"] == "epoch"])

    fit(make_trainer(max_epochs=3, plugins=[Reader()]))
    assert seen == [[], [1], [1, 2]]


def test_a_failed_run_keeps_what_it_logged_and_closes_the_file() -> None:
    class FailAtSecondEpoch:
        @dltrain.hookimpl
        def on_train_epoch_start(self, state: State) -> None:
            if state.epoch == 1:
                raise RuntimeError("boom")

    trainer = make_trainer(max_epochs=3, plugins=[FailAtSecondEpoch()])
    with pytest.raises(dltrain.PluginError):
        fit(trainer, val=False)
    plugin = trainer.plugin_manager.get_plugin("metric_log")
    assert plugin._file is None  # type: ignore[union-attr]
    rows = read_metrics(run_path_of(trainer))
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1]
    assert {k: v for k, v in rows[-1].items() if k != "time"} == {
        "kind": "failed",
        "epoch": 2,
        "step": 8,
        "error": "PluginError: plugin 'FailAtSecondEpoch' raised RuntimeError in hook "
        "'on_train_epoch_start' at epoch 2, global step 8, batch 0 (train): boom",
    }


def test_a_run_that_fails_at_its_first_batch_leaves_a_folder_marked_failed() -> None:
    """Not an empty log that looks like a run about to write: one row saying what failed."""

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("expected 8 features\nsecond line")

    trainer = make_trainer()
    model = Broken()
    with pytest.raises(ValueError, match="expected 8 features"):
        trainer.fit(
            model,
            tiny_loader(batch_size=8),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
    run_path = run_path_of(trainer)
    assert sorted(p.name for p in run_path.iterdir()) == ["config.json", "metrics.jsonl"]
    (row,) = read_metrics(run_path)
    assert (row["kind"], row["epoch"], row["step"], row["error"]) == (
        "failed",
        1,
        0,
        "ValueError: expected 8 features",
    )
    pytest.importorskip("matplotlib")
    from dltrain.plot import plot_run

    with pytest.raises(dltrain.ConfigError, match=r"failed at epoch 1, step 0 before it logged any metrics"):
        plot_run(run_path)


def test_a_clean_stop_is_not_a_failure() -> None:
    class CtrlC:
        @dltrain.hookimpl
        def on_train_batch_end(self, state: State) -> None:
            if state.global_step == 3:
                raise KeyboardInterrupt

    trainer = make_trainer(max_epochs=2, disable_plugins=["signals"], plugins=[CtrlC()])
    with pytest.raises(KeyboardInterrupt):
        fit(trainer, val=False)
    assert [r["kind"] for r in read_metrics(run_path_of(trainer))] == []


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    plugin = MetricLogPlugin(tmp_path / "runs")
    trainer = make_trainer(run_dir=None)
    state = State(run=RunKind.FIT, rank=1, world_size=2)
    plugin.on_fit_start(trainer, state)
    plugin.on_epoch_end(state, {"train_loss": 1.0})
    plugin.on_teardown()
    assert plugin.run_path is None and not (tmp_path / "runs").exists()


def test_rows_stay_valid_json_and_a_cut_last_line_is_skipped(tmp_path: Path) -> None:
    plugin = MetricLogPlugin(tmp_path / "runs")
    trainer = make_trainer(run_dir=None)
    state = State(run=RunKind.FIT)
    plugin.on_fit_start(trainer, state)
    plugin.on_epoch_end(state, {"train_loss": float("nan"), "train_accuracy": float("inf")})
    plugin.on_teardown()
    assert plugin.metrics_path is not None
    with plugin.metrics_path.open("a") as f:
        f.write('{"kind": "step", "ep')  # a run killed mid-write
    rows = read_metrics(plugin.metrics_path.parent)
    assert len(rows) == 1 and math.isnan(rows[0]["train_loss"]) and rows[0]["train_accuracy"] == math.inf
    for line in plugin.metrics_path.read_text().splitlines()[:1]:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_step_rows_sync_once_per_logging_interval_only(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    original = torch.Tensor.__float__

    def counting(self: torch.Tensor) -> float:
        reads.append(1)
        return original(self)

    def reads_for(samples: int, every: int) -> int:
        reads.clear()
        trainer = make_trainer(log_every_n_steps=every)
        monkeypatch.setattr(torch.Tensor, "__float__", counting)
        fit(trainer, samples=samples, val=False)
        monkeypatch.setattr(torch.Tensor, "__float__", original)
        return len(reads)

    assert reads_for(80, every=1000) == reads_for(400, every=1000)  # 10 or 50 steps: same reads
    assert reads_for(400, every=5) - reads_for(80, every=5) == (50 - 10) // 5


def test_running_mean_keeps_values_on_the_device_until_read() -> None:
    mean = RunningMean(fold_every=4)
    assert mean.read() is None
    values = [torch.tensor(float(i), requires_grad=True) * 2 for i in range(10)]
    for v in values:
        mean.add(v)
    assert len(mean) == 10
    assert mean.read(reset=False) == pytest.approx(9.0)
    mean.add(torch.tensor(20.0))
    assert mean.read() == pytest.approx((90 + 20) / 11)
    assert mean.read() is None and len(mean) == 0


def test_a_resumed_fit_continues_the_log_of_its_checkpoint() -> None:
    class CrashAtThirdEpoch:
        @dltrain.hookimpl
        def on_train_epoch_start(self, state: State) -> None:
            if state.epoch == 2:
                raise RuntimeError("power cut")

    def trainer(*plugins: object) -> dltrain.Trainer:
        checkpoint = dltrain.CheckpointConfig(dir=Path("checkpoints"))
        return make_trainer(max_epochs=4, log_every_n_steps=3, checkpoint=checkpoint, plugins=plugins)

    first = trainer(CrashAtThirdEpoch())
    with pytest.raises(dltrain.PluginError, match="power cut"):
        fit(first)
    resumed = trainer()
    model = tiny_model()
    resumed.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16, seed=1),
        resume="last",
    )
    assert run_path_of(resumed) == run_path_of(first)
    rows = read_metrics(run_path_of(resumed))
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [16]
    steps = [r["step"] for r in rows if "step" in r and r["kind"] == "step"]
    assert steps == sorted(set(steps))  # nothing logged twice
