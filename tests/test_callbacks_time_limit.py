"""TimeLimit on real runs with a clock the test drives: it stops in time, and the stop is saved."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import ConfigError
from dltrain.callbacks import TimeLimit
from dltrain.callbacks.time_limit import format_duration, parse_duration
from dltrain.checkpoint import list_checkpoints
from dltrain.testing import tiny_loader, tiny_model


class FakeClock:
    """A clock that moves only as the run does: per epoch start, training batch, validation, checkpoint save."""

    name = "fake_clock"

    def __init__(
        self, batch: float = 1.0, validation: float = 0.0, save: float = 5.0, epoch_start: float = 0.0
    ) -> None:
        self.now = 0.0
        self.batch, self.validation, self.save, self.epoch_start = batch, validation, save, epoch_start

    def __call__(self) -> float:
        return self.now

    @dltrain.hookimpl
    def on_train_epoch_start(self) -> None:
        self.now += self.epoch_start

    @dltrain.hookimpl
    def on_train_batch_start(self) -> None:
        self.now += self.batch

    @dltrain.hookimpl
    def on_eval_epoch_start(self) -> None:
        self.now += self.validation

    @dltrain.hookimpl
    def state_dict(self) -> None:  # called by every checkpoint save
        self.now += self.save


def fit(clock: FakeClock, limit: TimeLimit, *, validate: bool = False, **config: Any) -> dltrain.Trainer:
    model = tiny_model()
    # The fake clock charges a save to the training thread: synchronous saves.
    fields: dict[str, Any] = {"checkpoint": {"dir": "ckpt", "async_save": False}, **config}
    trainer = dltrain.Trainer(
        max_epochs=100, device="cpu", progress="off", run_dir=None, plugins=[clock, limit], **fields
    )
    trainer.fit(
        model,
        tiny_loader(),  # 4 batches an epoch
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1) if validate else None,
        resume="last" if list_checkpoints("ckpt") else None,
    )
    return trainer


def test_the_fit_stops_in_time_and_its_last_step_is_saved(capsys: pytest.CaptureFixture[str]) -> None:
    # A step takes 1 s, a save 5 s (one at every epoch's end): an epoch is 9 s.
    clock = FakeClock()
    limit = TimeLimit(seconds=60, margin=0, safety=1, clock=clock)
    trainer = fit(clock, limit)
    state = trainer.state
    assert state is not None and limit.stopped
    assert clock.now <= 60  # the final save included
    assert clock.now > 60 - (1 + 5)  # and not much earlier than needed
    assert list_checkpoints("ckpt")[-1].global_step == state.global_step == 6 * 4 + 1
    assert (limit.step_seconds, limit.save_seconds) == (1.0, 5.0)
    assert state.stop_reason == (
        "time limit 1m0s: 55.0s passed, and 5.0s left is less than the 6.0s kept for the next step and "
        "the final checkpoint"
    )
    assert capsys.readouterr().out.splitlines()[-1] == (
        "time limit: stopped 55.0s into 1m0s; the final checkpoint took 5.0s; fit ended 0.0s before the limit"
    )


def test_a_stop_right_after_an_epochs_save_says_the_last_step_was_saved_already(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An epoch: 3 s to start, 4 one-second steps, a 5 s save; the second ends at 24 s. The next
    # epoch's first step (4 s) and a final save would not fit in the 6 s left: the stop comes after
    # the epoch's save, and the final save has nothing new to write.
    clock = FakeClock(epoch_start=3.0)
    limit = TimeLimit(seconds=30, margin=0, safety=1, clock=clock)
    trainer = fit(clock, limit)
    assert trainer.state is not None and trainer.state.global_step == 8 and clock.now == 24
    assert list_checkpoints("ckpt")[-1].global_step == 8
    assert capsys.readouterr().out.splitlines()[-1] == (
        "time limit: stopped 24.0s into 30.0s; its last step was saved already; fit ended 6.0s before the limit"
    )


def test_with_asynchronous_saves_room_is_kept_for_the_save_in_flight_and_the_final_one() -> None:
    clock = FakeClock()
    limit = TimeLimit(seconds=60, margin=0, safety=1, clock=clock)
    trainer = fit(clock, limit, checkpoint={"dir": "ckpt", "async_save": True})
    assert trainer.state is not None and limit.stopped and clock.now <= 60
    assert trainer.state.stop_reason is not None
    # After an epoch's training: its epoch-end save and the final save, each 5 s, each counted twice
    # (10 s with synchronous saves), so the fit stops an epoch earlier than in the test above.
    assert "11.0s left is less than the 20.0s kept" in trainer.state.stop_reason


def test_validation_and_the_safety_factor_are_kept_in_reserve() -> None:
    # 4 s of steps, 10 s of validation, 5 s of saving: an epoch is 19 s; with safety 1.5 and 10 s of margin.
    clock = FakeClock(validation=10.0)
    limit = TimeLimit(seconds="3m", margin=10, safety=1.5, clock=clock)
    trainer = fit(clock, limit, validate=True)
    assert trainer.state is not None and limit.stopped and limit.validation_seconds == 10.0
    assert clock.now <= 180 - 10
    # Stopped before a validation that would not have fit: that epoch validates when resumed.
    last = list_checkpoints("ckpt")[-1]
    assert last.global_step == trainer.state.global_step and last.stage == "validate"


def test_a_resumed_run_knows_the_durations_from_its_first_check() -> None:
    clock = FakeClock()
    fit(clock, TimeLimit(seconds=60, margin=0, safety=1, clock=clock))
    steps = list_checkpoints("ckpt")[-1].global_step
    # A step (1 s) and a save (5 s) need 9 s with safety 1.5: 8 s are not enough for one step.
    again = FakeClock()
    limit = TimeLimit(seconds=8, margin=0, safety=1.5, clock=again)
    trainer = fit(again, limit)
    assert trainer.state is not None and trainer.state.global_step == steps and limit.stopped
    assert again.now == 0 and list_checkpoints("ckpt")[-1].global_step == steps
    # With 10 s: after 1 s, 9 s are left, room for one more step and a save; after 2 s, 8 s are not.
    again = FakeClock()
    trainer = fit(again, TimeLimit(seconds=10, margin=0, safety=1.5, clock=again))
    assert trainer.state is not None and trainer.state.global_step == steps + 2
    assert again.now == 2 + 5 and list_checkpoints("ckpt")[-1].global_step == steps + 2


def test_without_checkpoints_a_warning_says_the_stop_is_not_saved() -> None:
    clock = FakeClock()
    with pytest.warns(UserWarning, match=r"nothing saves it then: set TrainerConfig\.checkpoint"):
        trainer = fit(clock, TimeLimit(seconds=20, margin=0, safety=1, clock=clock), checkpoint=None)
    assert trainer.state is not None and trainer.state.global_step == 20 and clock.now == 20
    with pytest.warns(UserWarning, match="set checkpoint.save_on_fit_end=True"):
        fit(
            FakeClock(),
            TimeLimit(seconds=20, margin=0, clock=FakeClock()),
            checkpoint={"dir": "other", "save_on_fit_end": False},
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5400, 5400.0),
        (1.5, 1.5),
        ("5400", 5400.0),
        ("4h", 14400.0),
        ("90m", 5400.0),
        ("1h30m", 5400.0),
        ("3600s", 3600.0),
        ("1.5h", 5400.0),
        ("1d12h", 129600.0),
        (" 2h 15m ", 8100.0),
        ("1:30:00", 5400.0),
        ("2-00:00:00", 172800.0),
        (datetime.timedelta(hours=1, minutes=30), 5400.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "4x", "30m1h", "1h1h", "h", "-5", 0, "0s", True, "1:30"])
def test_a_bad_duration_is_an_error_that_shows_the_forms(text: Any) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .* as a positive duration; write seconds \(5400\)"):
        TimeLimit(seconds=text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (48.24, 60, 5412, 7200)] == ["48.2s", "1m0s", "1h30m12s", "2h0m0s"]
