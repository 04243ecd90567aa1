"""EarlyStopping on real runs: when it stops, why, and that a resumed run counts what came before."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import ConfigError
from dltrain.callbacks import EarlyStopping
from dltrain.testing import tiny_loader, tiny_model


class Scores:
    """Reports ``val_score`` = ``values[epoch]`` at each validation: a metric whose course the test chooses."""

    name = "scores"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @dltrain.hookimpl
    def compute_metrics(self, state: dltrain.State) -> dict[str, float] | None:
        if state.phase is dltrain.Phase.VALIDATE:
            return {"score": self.values[state.epoch]}
        return None


def fit(*plugins: object, epochs: int = 20, resume: str | None = None, **config: Any) -> dltrain.Trainer:
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=epochs, device="cpu", progress="off", run_dir=None, plugins=list(plugins), **config
    )
    trainer.fit(
        model,
        tiny_loader(),  # 4 batches an epoch
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
        resume=resume,
    )
    return trainer


def test_a_run_stops_after_patience_validations_without_improvement() -> None:
    stopping = EarlyStopping(monitor="val_score", patience=3)
    trainer = fit(stopping, Scores([3.0, 2.0, 2.5, 2.1, 2.0, 1.0, 0.5]))
    assert len(trainer.history.epochs) == 5  # 2.0 at epoch 5 equals the best: no improvement
    assert trainer.state is not None
    assert trainer.state.stop_reason == "val_score did not improve for 3 validations (best 2 at epoch 2)"
    assert (stopping.best, stopping.best_epoch, stopping.wait, stopping.stopped_epoch) == (2.0, 2, 3, 5)


def test_max_mode_counts_only_changes_larger_than_min_delta() -> None:
    trainer = fit(
        EarlyStopping(monitor="val_score", mode="max", patience=2, min_delta=0.1),
        Scores([1.0, 2.0, 2.05, 2.0, 3.0]),
    )
    assert [row["val_score"] for row in trainer.history.epochs] == [1.0, 2.0, 2.05, 2.0]


def test_patience_zero_stops_at_the_first_validation_that_does_not_improve() -> None:
    trainer = fit(EarlyStopping(monitor="val_score", patience=0), Scores([1.0, 0.5, 0.7, 0.1]))
    assert len(trainer.history.epochs) == 3
    assert trainer.state is not None and "did not improve for 1 validation " in str(trainer.state.stop_reason)


def test_a_non_finite_value_stops_at_once_unless_told_otherwise() -> None:
    values = [1.0, 0.5, math.nan, 0.4, 0.3]
    trainer = fit(EarlyStopping(monitor="val_score", patience=10), Scores(values))
    assert len(trainer.history.epochs) == 3
    assert trainer.state is not None and trainer.state.stop_reason == (
        "val_score is nan at epoch 3, not a finite number"
    )
    trainer = fit(
        EarlyStopping(monitor="val_score", patience=10, check_finite=False), Scores(values), epochs=5
    )
    assert len(trainer.history.epochs) == 5 and trainer.state is not None
    assert trainer.state.stop_reason == "max_epochs reached"


def test_a_monitor_not_in_the_row_is_an_error_that_lists_the_metrics() -> None:
    with pytest.raises(ConfigError) as raised:
        fit(EarlyStopping(monitor="val_acc"))
    message = str(raised.value)
    assert "'val_acc'" in message and "epoch 1" in message
    assert "'train_loss', 'val_accuracy', 'val_loss'" in message and "set monitor to one of them" in message


def test_epochs_that_do_not_validate_are_waited_for_and_not_counted() -> None:
    # Validation after epochs 2 and 4 only: the monitor is missing from the other rows.
    trainer = fit(
        EarlyStopping(monitor="val_score", patience=1),
        Scores([9.0, 3.0, 9.0, 3.0, 9.0, 3.0]),
        val_every_n_epochs=2,
    )
    assert [row["epoch"] for row in trainer.history.epochs] == [1, 2, 3, 4]
    assert trainer.state is not None and trainer.state.stop_reason == (
        "val_score did not improve for 1 validation (best 3 at epoch 2)"
    )


@pytest.mark.parametrize(
    "interrupt",
    [{"epochs": 3}, {"max_steps": 14}],  # after epoch 3; inside epoch 4 (its 2nd of 4 steps)
    ids=["between-epochs", "inside-an-epoch"],
)
def test_a_resumed_run_counts_the_validations_before_the_interruption(interrupt: dict[str, int]) -> None:
    values = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 1.0]
    whole = fit(EarlyStopping(monitor="val_score", patience=3), Scores(values))
    assert whole.state is not None and len(whole.history.epochs) == 5

    first = fit(
        EarlyStopping(monitor="val_score", patience=3),
        Scores(values),
        checkpoint={"dir": "ckpt"},
        **interrupt,
    )
    assert first.state is not None and first.state.stop_reason != whole.state.stop_reason
    stopping = EarlyStopping(monitor="val_score", patience=3)
    resumed = fit(stopping, Scores(values), checkpoint={"dir": "ckpt"}, resume="last")
    assert resumed.state is not None
    assert resumed.state.stop_reason == whole.state.stop_reason
    assert [row["epoch"] for row in resumed.history.epochs] == [1, 2, 3, 4, 5]
    assert resumed.state.global_step == whole.state.global_step == 20


def test_a_resume_that_monitors_another_metric_starts_counting_afresh() -> None:
    fit(
        EarlyStopping(monitor="val_score", patience=3),
        Scores([3.0, 2.0, 2.5]),
        checkpoint={"dir": "ckpt"},
        epochs=3,
    )
    stopping = EarlyStopping(monitor="val_loss", patience=3)
    with pytest.warns(UserWarning, match="counting starts afresh"):
        fit(stopping, checkpoint={"dir": "ckpt"}, resume="last", epochs=4)
    assert stopping.best_epoch == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "lowest"}, "mode must be 'min' or 'max', got 'lowest'"),
        ({"patience": -1}, "patience must be an integer >= 0, got -1"),
        ({"min_delta": -0.5}, "min_delta must be a finite number >= 0, got -0.5"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_bad_arguments_are_errors_that_name_the_value(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EarlyStopping(**arguments)
