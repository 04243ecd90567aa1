"""Failure handling, as a user meets it: NaN losses, errors in code, Ctrl-C and preemption.

- ``on_nonfinite``: a loss that turns NaN or infinite at a known batch, under
  each policy ("raise", "skip", "stop"), with and without checkpoints.
- Errors raised by a plugin or by the model say where they came from and keep
  the original traceback.
- SIGINT and SIGTERM during fit (the built-in ``signals`` plugin): a clean stop
  at a step boundary, a checkpoint, then ``KeyboardInterrupt`` or exit status
  143; the previous handlers come back. SIGTERM is also sent to real
  processes: one training script (exit status, checkpoint, exact resume), and
  one process of a two-process torchrun job (all stop at the same step).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import dltrain
from dltrain import DltrainError, NonFiniteError, PluginError, hookimpl
from dltrain.checkpoint import list_checkpoints, load_for_resume
from dltrain.default_plugins.signals import (
    DistributedSignalsPlugin,
    SignalsPlugin,
    _already_exiting,
    make_plugin,
)
from dltrain.testing import HookRecorder, tiny_loader, tiny_model

SCRIPTS = Path(__file__).resolve().parent / "_failure_scripts"
NAN, INF = float("nan"), float("inf")
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
NOTES = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
BATCH_HOOKS = (
    "transfer_batch",
    "on_train_batch_start",
    "training_step",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_eval_batch_start",
    "eval_step",
    "on_eval_batch_end",
    "agree_on_stop",  # after every step, too
)


# -- helpers -------------------------------------------------------------------------


def make_trainer(**settings: Any) -> dltrain.Trainer:
    """A quiet CPU Trainer; 8 batches an epoch with :func:`fit`."""
    defaults: dict[str, Any] = {
        "max_epochs": 2,
        "device": "cpu",
        "seed": 0,
        "progress": "off",
        "run_dir": None,
        "autoload_plugins": False,
    }
    return dltrain.Trainer(**{**defaults, **settings})


def fit(
    trainer: dltrain.Trainer,
    model: nn.Module | None = None,
    *,
    val: bool = False,
    momentum: float = 0.0,
    resume: str | None = None,
) -> dltrain.History:
    """Fit a tiny classifier on 64 samples in batches of 8."""
    model = model or tiny_model()
    return trainer.fit(
        model,
        tiny_loader(batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16, seed=1) if val else None,
        resume=resume,
    )


def notes(exc: BaseException) -> list[str]:
    """The notes dltrain added to ``exc`` (Python 3.11+)."""
    return list(getattr(exc, "__notes__", []))


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Poison:
    """Multiplies the loss of chosen training batches, ``(epoch, batch_idx)``, by ``factor``.

    A loss that becomes NaN (or infinite) at a known batch; so do its gradients.
    """

    name = "poison"

    def __init__(self, *at: tuple[int, int], factor: float = NAN) -> None:
        self.at, self.factor = set(at), factor

    @hookimpl(wrapper=True)
    def training_step(self, state: dltrain.State) -> Generator[None, Any, Any]:
        output = yield
        if (state.epoch, state.batch_idx) in self.at:
            output.loss = output.loss * self.factor
        return output


class NanGradient:
    """Adds ``sqrt(0 * w)`` to the loss at ``(epoch, batch_idx)``: the loss stays finite, gradients are NaN."""

    name = "nan_gradient"

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    @hookimpl(wrapper=True)
    def training_step(self, state: dltrain.State, model: nn.Module) -> Generator[None, Any, Any]:
        output = yield
        if (state.epoch, state.batch_idx) == self.at:
            weight = next(model.parameters())
            output.loss = output.loss + torch.sqrt(weight.sum() * 0.0)
        return output


class WeightWatch:
    """Records, per training batch, whether the weights changed and the global step after it."""

    name = "weight_watch"

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.steps: list[int] = []
        self._before: list[torch.Tensor] = []

    @hookimpl
    def on_train_batch_start(self, trainer: dltrain.Trainer) -> None:
        self._before = [p.detach().clone() for p in trainer.model.parameters()]

    @hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        now = list(trainer.model.parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self._before, now, strict=True)))
        self.steps.append(state.global_step)


class SendSignal:
    """Raises ``signal`` ``times`` times in this process at the end of training batch ``(epoch, batch)``."""

    name = "send_signal"

    def __init__(self, epoch: int, batch: int, sig: int = signal.SIGINT, times: int = 1) -> None:
        self.at, self.sig, self.times = (epoch, batch), sig, times

    @hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        if (state.epoch, state.batch_idx) == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.sig)


@pytest.fixture
def default_handlers() -> Iterator[None]:
    """Checks that a test leaves SIGINT and SIGTERM as it found them."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    yield
    after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    for sig, handler in zip((signal.SIGINT, signal.SIGTERM), before, strict=True):
        signal.signal(sig, handler)
    assert after == before, "fit did not restore the signal handlers"


# =====================================================================================
# Non-finite losses: on_nonfinite = "raise" | "skip" | "stop"
# =====================================================================================


def test_a_nan_loss_raises_naming_epoch_step_batch_and_value() -> None:
    """The default policy; the loss is read once per interval, yet the exact batch is named."""
    seen: list[BaseException] = []

    class Watch:
        @hookimpl
        def on_exception(self, exception: BaseException) -> None:
            seen.append(exception)

    trainer = make_trainer(plugins=[Poison((1, 5)), Watch()])
    with pytest.raises(NonFiniteError) as info:
        fit(trainer)
    message = str(info.value)
    assert message.startswith("the loss became nan at epoch 2, global step 13, batch 5")
    assert "gradient_clip_val" in message and "on_nonfinite='skip'" in message and "'stop'" in message
    assert "log_every_n_steps" in message
    # Read at the epoch's end (log_every_n_steps=50): training went on until then.
    assert trainer.state is not None and trainer.state.global_step == 16
    assert "non-finite weights now in: ['0.weight'" in message
    assert isinstance(info.value, DltrainError) and seen == [info.value]


def test_log_every_n_steps_1_raises_right_after_that_step() -> None:
    trainer = make_trainer(log_every_n_steps=1, plugins=[Poison((0, 3), factor=INF)])
    with pytest.raises(NonFiniteError, match=r"^the loss became inf at epoch 1, global step 3, batch 3"):
        fit(trainer)
    assert trainer.state is not None and trainer.state.global_step == 4


def test_several_bad_batches_name_the_first_and_count_the_rest() -> None:
    trainer = make_trainer(plugins=[Poison((0, 2), (0, 6))])
    with pytest.raises(NonFiniteError) as info:
        fit(trainer)
    assert "at epoch 1, global step 2, batch 2" in str(info.value)
    assert "more non-finite loss(es) until global step 8" in str(info.value)


@pytest.mark.parametrize("as_on", ["cpu", "accelerator"])
@pytest.mark.parametrize("log_every", [1, 50])
def test_a_nan_gradient_from_a_finite_loss_is_blamed_on_its_batch_whatever_the_interval(
    log_every: int, as_on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its step spoils the weights, so the next batch's loss is NaN: the blame stays on the gradient's.
    On the CPU each loss is read as it comes; on an accelerator each step keeps a gradient flag."""
    if as_on == "accelerator":
        monkeypatch.setattr("dltrain._step_runner.reads_losses_as_they_come", lambda device: False)
    trainer = make_trainer(log_every_n_steps=log_every, plugins=[NanGradient(0, 2)])
    with pytest.raises(NonFiniteError) as info:
        fit(trainer)
    message = str(info.value)
    assert message.startswith(
        "a gradient became NaN or inf at epoch 1, global step 2, batch 2, though its loss was finite"
    )
    assert "non-finite weights now in: ['0.weight'" in message
    if log_every == 1:  # checked right after that step: no loss has seen the spoiled weights yet
        assert trainer.state is not None and trainer.state.global_step == 3
        assert "the loss became non-finite later" not in message
    else:  # checked at the epoch's end: every later loss was NaN
        assert "(the loss became non-finite later, at global step 3)" in message


def test_a_rollback_skips_the_batch_whose_gradient_was_not_finite(tmp_path: Path) -> None:
    """The rolled-back run skips the gradient's batch, not the next one (whose loss was NaN)."""
    rollbacks: list[str] = []

    class Rollbacks:
        @hookimpl
        def on_rollback(self, reason: str) -> None:
            rollbacks.append(reason)

    trainer = make_trainer(
        on_nonfinite="rollback",
        checkpoint={"dir": str(tmp_path / "ckpt"), "every_n_steps": 1, "async_save": False},
        plugins=[NanGradient(0, 2), Rollbacks()],
    )
    model = tiny_model()
    with pytest.warns(UserWarning, match="rolled back"):
        fit(trainer, model)
    assert all_finite(model) and len(rollbacks) == 1
    assert rollbacks[0].startswith("a gradient became NaN or inf at epoch 1, global step 2, batch 2")
    assert "batch 2 of epoch 1 will be skipped" in rollbacks[0]


def test_skip_applies_no_step_for_a_bad_batch_and_counts_it() -> None:
    watch = WeightWatch()
    model = tiny_model()
    trainer = make_trainer(on_nonfinite="skip", plugins=[Poison((0, 2), (1, 5)), watch])
    with pytest.warns(UserWarning, match=r"on_nonfinite='skip' skipped 2 of 16 optimizer steps") as record:
        history = fit(trainer, model, momentum=0.9)
    assert trainer.state is not None and trainer.state.skipped_steps == 2
    assert [i for i, changed in enumerate(watch.changed) if not changed] == [2, 8 + 5]
    assert watch.steps == list(range(1, 17))  # a skipped step still counts toward global_step
    assert all_finite(model)
    assert history["train_skipped_steps"] == [1.0, 2.0]  # the running count, per epoch
    assert all(math.isfinite(v) for v in history["train_loss"])  # skipped batches leave the mean
    assert record[0].filename == __file__  # points at the fit call


def test_skip_also_skips_a_step_whose_loss_is_finite_but_gradients_are_not() -> None:
    model = tiny_model()
    trainer = make_trainer(on_nonfinite="skip", plugins=[NanGradient(0, 2)])
    with pytest.warns(UserWarning, match="skipped 1 of 16"):
        fit(trainer, model)
    assert all_finite(model)


def test_skip_skips_the_whole_accumulation_group_of_a_bad_micro_batch() -> None:
    watch = WeightWatch()
    trainer = make_trainer(
        on_nonfinite="skip", accumulate_grad_batches=2, max_epochs=1, plugins=[Poison((0, 2)), watch]
    )
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        fit(trainer)
    # Micro-batches 2 and 3 form step 2: neither changes the weights.
    assert watch.changed == [False, True, False, False, False, True, False, True]


def test_skip_does_not_step_a_per_step_scheduler_for_a_skipped_step() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = make_trainer(
        on_nonfinite="skip", scheduler_interval="step", max_epochs=1, plugins=[Poison((0, 0))]
    )
    with pytest.warns(UserWarning):
        trainer.fit(
            model,
            tiny_loader(batch_size=8),
            optimizer=optimizer,
            loss_fn=nn.CrossEntropyLoss(),
            scheduler=scheduler,
        )
    assert optimizer.param_groups[0]["lr"] == 0.5**7


def test_stop_ends_the_run_cleanly_naming_the_batch_and_skips_that_epochs_validation() -> None:
    recorder = HookRecorder(skip=BATCH_HOOKS)
    trainer = make_trainer(on_nonfinite="stop", max_epochs=3, plugins=[Poison((1, 3)), recorder])
    history = fit(trainer, val=True)
    state = trainer.state
    assert state is not None and state.stop_requested
    assert state.stop_reason is not None
    assert state.stop_reason.startswith("non-finite loss (nan) at epoch 2, global step 11, batch 3")
    assert [row["epoch"] for row in history.epochs] == [1, 2]
    assert "val_loss" in history.epochs[0] and "val_loss" not in history.epochs[1]
    assert recorder.calls[-2:] == ["on_fit_end", "on_teardown"]
    assert "on_exception" not in recorder.calls


@pytest.mark.parametrize("policy", ["raise", "skip", "stop"])
def test_every_policy_copes_with_an_empty_parameter(policy: str) -> None:
    class WithEmpty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.unused = tiny_model(), nn.Parameter(torch.empty(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x) + self.unused.sum()
            return out

    trainer = make_trainer(on_nonfinite=policy, log_every_n_steps=1)
    fit(trainer, WithEmpty())
    assert trainer.state is not None and trainer.state.stop_reason == "max_epochs reached"


def test_no_checkpoint_with_nan_weights_is_written_and_resume_takes_the_last_good_one(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    checkpoint = {"dir": directory, "every_n_steps": 1, "keep_last": 3}
    trainer = make_trainer(
        on_nonfinite="stop", log_every_n_steps=1, checkpoint=checkpoint, plugins=[Poison((0, 3))]
    )
    with pytest.warns(UserWarning, match=r"not saving a checkpoint at global step 4: the model has NaN"):
        fit(trainer)
    assert trainer.state is not None and trainer.state.global_step == 4
    assert [info.global_step for info in list_checkpoints(directory)] == [1, 2, 3]
    for info in list_checkpoints(directory):
        payload, _ = load_for_resume(str(info.payload_path), None)
        assert all(bool(torch.isfinite(t).all()) for t in payload["model"].values())

    model = tiny_model()
    resumed = make_trainer(on_nonfinite="stop", checkpoint=checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN: nothing to warn about
        fit(resumed, model, resume="last")
    assert resumed.state is not None and resumed.state.global_step == 16 and all_finite(model)


def test_raise_writes_no_checkpoint_after_the_loss_went_bad(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trainer = make_trainer(
        log_every_n_steps=1, checkpoint={"dir": directory, "every_n_steps": 1}, plugins=[Poison((0, 3))]
    )
    with pytest.raises(NonFiniteError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(trainer)
    assert max(info.global_step for info in list_checkpoints(directory)) == 3


# =====================================================================================
# Exceptions from plugins and user code say where they came from
# =====================================================================================


def test_a_third_party_plugin_error_names_plugin_hook_and_place_and_keeps_the_cause() -> None:
    seen: list[BaseException] = []

    class Broken:
        name = "broken"

        @hookimpl
        def on_train_batch_end(self, state: dltrain.State) -> None:
            if state.epoch == 1 and state.batch_idx == 3:
                raise KeyError("missing")  # a bug in the plugin

        @hookimpl
        def on_exception(self, exception: BaseException) -> None:
            seen.append(exception)

    with pytest.raises(PluginError) as info:
        fit(make_trainer(plugins=[Broken()]))
    assert str(info.value) == (
        "plugin 'broken' raised KeyError in hook 'on_train_batch_end' at epoch 2, global step 12, "
        "batch 3 (train): 'missing'"
    )
    cause = info.value.__cause__
    assert isinstance(cause, KeyError)
    frames = [f.name for f in traceback.extract_tb(cause.__traceback__)]
    assert frames[-1] == "on_train_batch_end"  # the original traceback, down to the bad line
    assert seen == [info.value]


def test_a_plugin_wrapper_that_raises_is_named_too() -> None:
    class Timer:
        name = "timer"

        @hookimpl(wrapper=True)
        def training_step(self) -> Generator[None, Any, Any]:
            yield
            raise ZeroDivisionError("timer bug")

    with pytest.raises(
        PluginError, match=r"^plugin 'timer' raised ZeroDivisionError in hook 'training_step'"
    ):
        fit(make_trainer(plugins=[Timer()]))


@NOTES
def test_an_error_in_the_models_forward_keeps_its_type_and_gains_a_note() -> None:
    class Fragile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 11:
                raise ArithmeticError("the model broke")
            out: torch.Tensor = self.net(x)
            return out

    with pytest.raises(ArithmeticError, match="the model broke") as info:
        fit(make_trainer(), Fragile())
    assert notes(info.value) == [
        "dltrain: raised in hook 'training_step' (model forward or loss_fn) at epoch 2, global step 10, "
        "batch 2 (train)"
    ]
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "forward"


@NOTES
def test_an_error_during_validation_says_validate() -> None:
    class EvalOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                raise ValueError("no eval")
            out: torch.Tensor = self.net(x)
            return out

    with pytest.raises(ValueError, match="no eval") as info:
        fit(make_trainer(), EvalOnly(), val=True)
    assert notes(info.value)[0].endswith("at epoch 1, global step 8, batch 0 (validate)")


@NOTES
def test_an_error_in_a_built_in_plugin_names_that_plugin_not_the_model() -> None:
    trainer = make_trainer()
    metrics = trainer.plugin_manager.get_plugin("metrics")

    def broken_update(*args: Any) -> None:
        raise OSError("disk full")

    metrics._update = broken_update  # type: ignore[attr-defined]
    with pytest.raises(OSError) as info:
        fit(trainer)
    assert notes(info.value) == [
        "dltrain: raised in built-in plugin 'metrics', hook 'on_train_batch_end' at epoch 1, "
        "global step 1, batch 0 (train)"
    ]


@NOTES
def test_an_error_from_the_data_is_user_code_with_its_place() -> None:
    class Flaky(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if i == 20:
                raise FileNotFoundError("image 20 is gone")
            return torch.randn(8), torch.tensor(i % 3)

    model = tiny_model()
    with pytest.raises(FileNotFoundError) as info:
        make_trainer().fit(
            model,
            torch.utils.data.DataLoader(Flaky(), batch_size=8),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )
    assert notes(info.value) == ["dltrain: raised in user code at epoch 1, global step 2, batch 1 (train)"]


@NOTES
def test_every_on_exception_runs_even_when_one_of_them_raises() -> None:
    calls: list[str] = []

    class Sloppy:
        @hookimpl
        def on_exception(self) -> None:
            calls.append("sloppy")
            raise RuntimeError("cleanup failed")

    class Careful:
        @hookimpl
        def on_exception(self) -> None:
            calls.append("careful")

        @hookimpl
        def on_teardown(self) -> None:
            calls.append("teardown")

    with pytest.raises(NonFiniteError) as info:
        fit(make_trainer(plugins=[Careful(), Sloppy(), Poison((0, 0))]))
    assert calls == ["sloppy", "careful", "teardown"]
    assert any("plugin 'Sloppy' also raised in on_exception" in n for n in notes(info.value))


# =====================================================================================
# SIGINT (Ctrl-C) and SIGTERM (preemption)
# =====================================================================================


@POSIX
def test_ctrl_c_finishes_the_step_saves_and_raises_keyboard_interrupt(
    tmp_path: Path, default_handlers: None, capfd: pytest.CaptureFixture[str]
) -> None:
    recorder = HookRecorder(skip=BATCH_HOOKS)
    directory = tmp_path / "ckpt"
    trainer = make_trainer(
        max_epochs=3,
        checkpoint={"dir": directory, "every_n_epochs": None},
        plugins=[SendSignal(1, 2), recorder],
    )
    with pytest.raises(KeyboardInterrupt) as info:
        fit(trainer, val=True)
    assert str(info.value) == (
        "dltrain: fit stopped by SIGINT at epoch 2, global step 11; continue with fit(..., resume='last')"
    )
    state = trainer.state
    assert state is not None and state.global_step == 11 and state.stop_reason == "SIGINT received"
    # The stopped epoch is closed without validation; then fit end (the checkpoint
    # plugin's save calls state_dict), and only then the exception and teardown.
    last_epoch = recorder.calls[len(recorder.calls) - recorder.calls[::-1].index("on_train_epoch_start") :]
    assert last_epoch == [
        "compute_metrics",
        "on_train_epoch_end",
        "on_epoch_end",
        "on_fit_end",
        "gather_model_state",
        "state_dict",
        "on_exception",
        "on_teardown",
    ]
    assert [(i.global_step, i.trigger) for i in list_checkpoints(directory)] == [(11, "fit_end")]
    err = capfd.readouterr().err
    assert "dltrain: SIGINT received: stopping after the current step and saving a checkpoint" in err
    assert "press Ctrl-C again to abort at once" in err


@POSIX
def test_fit_resumes_from_the_step_ctrl_c_stopped_at(tmp_path: Path, default_handlers: None) -> None:
    checkpoint = {"dir": tmp_path / "ckpt", "every_n_epochs": None}
    with pytest.raises(KeyboardInterrupt):
        fit(make_trainer(checkpoint=checkpoint, plugins=[SendSignal(0, 4)]), momentum=0.9)
    watch = WeightWatch()
    resumed = make_trainer(checkpoint=checkpoint, plugins=[watch])
    model = tiny_model()
    fit(resumed, model, momentum=0.9, resume="last")
    assert watch.steps == list(range(6, 17))

    reference = tiny_model()
    fit(make_trainer(), reference, momentum=0.9)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@POSIX
def test_a_second_ctrl_c_aborts_at_once(tmp_path: Path, default_handlers: None) -> None:
    recorder = HookRecorder(skip=BATCH_HOOKS)
    directory = tmp_path / "ckpt"
    trainer = make_trainer(
        checkpoint={"dir": directory, "every_n_epochs": None}, plugins=[recorder, SendSignal(0, 4, times=2)]
    )
    with pytest.raises(KeyboardInterrupt, match="second SIGINT: aborted at once") as info:
        fit(trainer)
    # Raised inside the hook that was running, by the handler itself.
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "_handle" and "on_train_batch_end" in frames
    assert "on_fit_end" not in recorder.calls
    assert recorder.calls[-2:] == ["on_exception", "on_teardown"]
    assert list_checkpoints(directory) == []


@POSIX
def test_sigterm_saves_then_raises_system_exit_143(tmp_path: Path, default_handlers: None) -> None:
    directory = tmp_path / "ckpt"
    trainer = make_trainer(
        checkpoint={"dir": directory, "every_n_epochs": None}, plugins=[SendSignal(0, 2, signal.SIGTERM)]
    )
    with pytest.raises(SystemExit) as info:
        fit(trainer)
    assert info.value.code == 143
    assert [i.global_step for i in list_checkpoints(directory)] == [3]
    # The process is on its way out: a repeat of SIGTERM is ignored, not a death by signal.
    assert signal.getsignal(signal.SIGTERM) is _already_exiting
    signal.raise_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what default_handlers expects back


@POSIX
def test_without_checkpointing_the_interrupt_says_nothing_was_saved(default_handlers: None) -> None:
    with pytest.raises(KeyboardInterrupt, match="checkpointing is off, so nothing was saved"):
        fit(make_trainer(plugins=[SendSignal(0, 1)]))


@POSIX
def test_ctrl_c_during_validation_stops_after_that_validation(default_handlers: None) -> None:
    class CtrlCInValidation:
        @hookimpl
        def on_eval_batch_end(self, state: dltrain.State) -> None:
            if state.epoch == 0 and state.batch_idx == 0:
                signal.raise_signal(signal.SIGINT)

    trainer = make_trainer(max_epochs=3, plugins=[CtrlCInValidation()])
    with pytest.raises(KeyboardInterrupt):
        fit(trainer, val=True)
    assert trainer.state is not None and trainer.state.global_step == 8
    assert [sorted(row) for row in trainer.history.epochs] == [
        ["epoch", "train_loss", "val_accuracy", "val_loss"]
    ]


@POSIX
def test_handlers_are_installed_during_fit_only_and_the_previous_ones_restored(
    default_handlers: None,
) -> None:
    during: list[Any] = []

    def mine(signum: int, frame: Any) -> None: ...

    class Look:
        @hookimpl
        def on_train_epoch_start(self) -> None:
            during.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

        @hookimpl
        def on_validate_start(self) -> None:
            during.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    previous_term = signal.signal(signal.SIGTERM, mine)
    try:
        trainer = make_trainer(max_epochs=1, plugins=[Look()])
        fit(trainer)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        handler = during[0][0]
        assert getattr(handler, "__self__", None) is trainer.plugin_manager.get_plugin("signals")
        assert during[0][1] == handler

        trainer.validate(tiny_model(), tiny_loader(samples=16), loss_fn=nn.CrossEntropyLoss())
        assert during[1] == (signal.default_int_handler, mine)  # validate/test/predict install nothing

        with pytest.raises(NonFiniteError):  # restored after a failed fit too
            fit(make_trainer(plugins=[Poison((0, 0))]))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous_term)


@POSIX
def test_an_ignored_signal_stays_ignored(default_handlers: None) -> None:
    """A shell starts background jobs with SIGINT ignored: Ctrl-C in the terminal is not for them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = make_trainer(plugins=[SendSignal(0, 2)])
        fit(trainer)
        assert trainer.state is not None and trainer.state.global_step == 16
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_fit_in_another_thread_installs_nothing_and_works() -> None:
    results: list[Any] = []

    def train() -> None:
        try:
            results.append(fit(make_trainer(max_epochs=1)))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(results[0], dltrain.History)
    assert signal.getsignal(signal.SIGINT) is before


@POSIX
def test_with_the_plugin_disabled_ctrl_c_interrupts_at_once(default_handlers: None) -> None:
    trainer = make_trainer(disable_plugins=["signals"], plugins=[SendSignal(0, 2)])
    with pytest.raises(KeyboardInterrupt) as info:
        fit(trainer)
    assert str(info.value) == ""  # Python's own, from inside the hook
    assert trainer.state is not None and not trainer.state.stop_requested


def test_importing_dltrain_and_building_a_trainer_install_no_handler(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import signal
        before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        import dltrain
        dltrain.Trainer(run_dir=None, progress="off")
        after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        print(before == after)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_the_final_raise_is_the_outermost_layer_of_on_fit_end(tmp_path: Path) -> None:
    class UserWrapper:
        @hookimpl(wrapper=True)
        def on_fit_end(self) -> Generator[None, None, None]:
            return (yield)

    trainer = make_trainer(checkpoint={"dir": tmp_path}, plugins=[UserWrapper()])
    assert trainer.plugin_manager.implementers("on_fit_end") == [
        "signals (wrapper)",
        "UserWrapper (wrapper)",
        "checkpoint (wrapper)",
    ]
    assert dltrain.BUILTIN_PLUGINS[-1] == "signals"


def test_the_factory_picks_the_distributed_variant_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    config = dltrain.TrainerConfig()
    assert type(make_plugin(config)) is SignalsPlugin
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "localhost",
    }.items():
        monkeypatch.setenv(name, value)
    assert type(make_plugin(config)) is DistributedSignalsPlugin


@POSIX
def test_the_distributed_variant_requests_the_stop_from_a_hook_not_the_handler(
    default_handlers: None,
) -> None:
    """Under a process group the handler only records; the hook asks, where ranks can agree."""
    asked_in: list[str] = []
    plugin = DistributedSignalsPlugin()
    plugin.name = "signals_ddp"

    class Where:
        @hookimpl
        def on_train_batch_end(self, state: dltrain.State) -> None:
            if state.stop_requested and not asked_in:
                asked_in.append(f"batch {state.batch_idx}")

    # Pluggy calls the last registered first: SendSignal, then the plugin, then Where.
    trainer = make_trainer(disable_plugins=["signals"], plugins=[Where(), plugin, SendSignal(0, 2)])
    with pytest.raises(KeyboardInterrupt):
        fit(trainer)
    assert asked_in == ["batch 2"]  # requested by the plugin's hook, within that batch's hook call
    assert trainer.state is not None and trainer.state.global_step == 3
    assert plugin.received is signal.SIGINT


# -- SIGTERM on a real process ----------------------------------------------------------


def _train(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [
        sys.executable,
        str(SCRIPTS / "preempted_train.py"),
        "--out",
        str(tmp_path / f"{name}.pt"),
        *args,
    ]
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hang
        process.kill()
        process.communicate()
        pytest.fail("the training process hung")
    return process.returncode, err


@POSIX
def test_sigterm_on_a_real_process_saves_exits_143_and_resume_continues_exactly(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    reference = _train(tmp_path, "reference", "--ckpt", str(tmp_path / "ref_ckpt"))
    preempted = _train(tmp_path, "preempted", "--ckpt", ckpt, "--term-after", "11")
    code, err = _finish(preempted)
    assert code == 143, err
    assert "dltrain: SIGTERM received: stopping after the current step and saving a checkpoint" in err
    assert (
        "dltrain: stopped by SIGTERM at epoch 2, global step 11; continue with fit(..., resume='last')" in err
    )
    assert "exiting with status 143" in err
    assert torch.load(tmp_path / "preempted.pt")["steps"] == list(range(1, 12))
    assert [(i.global_step, i.trigger) for i in list_checkpoints(ckpt)] == [(11, "fit_end")]

    code, err = _finish(_train(tmp_path, "resumed", "--ckpt", ckpt, "--resume"))
    assert code == 0, err
    resumed = torch.load(tmp_path / "resumed.pt")
    assert resumed["steps"] == list(range(12, 25))
    code, err = _finish(reference)
    assert code == 0, err
    expected = torch.load(tmp_path / "reference.pt")["params"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=0)


@POSIX
@pytest.mark.parametrize("again", ["save", "teardown", "exit"])  # "now": the test after this one
def test_sigterm_twice_on_a_real_process_still_exits_143_after_the_checkpoint(
    tmp_path: Path, again: str
) -> None:
    """A repeat during the final save, during teardown (after fit put the handlers back), after fit
    raised: never a death by SIGTERM (-15)."""
    ckpt = str(tmp_path / "ckpt")
    code, err = _finish(_train(tmp_path, "twice", "--ckpt", ckpt, "--term-after", "5", "--again", again))
    assert code == 143, err
    assert "dltrain: stopped by SIGTERM at epoch 1, global step 5" in err
    assert [(i.global_step, i.trigger) for i in list_checkpoints(ckpt)] == [(5, "fit_end")]
    assert torch.load(tmp_path / "twice.pt")["steps"] == list(range(1, 6))  # the script's own save ran
    ignored = "dltrain: SIGTERM received again after the final checkpoint: ignored, the process is exiting"
    assert (ignored in err) == (again in ("teardown", "exit"))


@POSIX
def test_sigterm_sent_from_outside_again_and_again_exits_143(tmp_path: Path) -> None:
    """Twice in quick succession, then every 5 ms until the process is gone: training, the final
    save, teardown and interpreter shutdown all see it; the exit stays 143."""
    ready = tmp_path / "ready"
    ckpt = tmp_path / "ckpt"
    process = _train(tmp_path, "flood", "--ckpt", str(ckpt), "--ready", str(ready), "--slow", "0.02")
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), "the training process never started training"
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGTERM)
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.005)
    code, err = _finish(process)
    assert code == 143, err
    (info,) = list_checkpoints(ckpt)
    assert info.trigger == "fit_end" and "exiting with status 143" in err


@POSIX
def test_a_configured_preemption_signal_stops_saves_and_exits_128_plus_its_number(tmp_path: Path) -> None:
    """SLURM's --signal=USR1@90: SIGUSR1 is handled like SIGTERM, the status is 128 + 10 on Linux."""
    ckpt = str(tmp_path / "ckpt")
    code, err = _finish(
        _train(
            tmp_path, "usr1", "--ckpt", ckpt, "--term-after", "5", "--signal", "SIGUSR1", "--again", "exit"
        )
    )
    assert code == 128 + signal.SIGUSR1, err
    assert "dltrain: SIGUSR1 received: stopping after the current step and saving a checkpoint" in err
    assert f"exiting with status {128 + signal.SIGUSR1}" in err
    assert [(i.global_step, i.trigger) for i in list_checkpoints(ckpt)] == [(5, "fit_end")]
    code, err = _finish(_train(tmp_path, "resumed", "--ckpt", ckpt, "--resume"))
    assert code == 0, err
    assert torch.load(tmp_path / "resumed.pt")["steps"] == list(range(6, 25))


@POSIX
def test_preemption_signals_replace_sigterm_in_process(default_handlers: None, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    trainer = make_trainer(
        checkpoint={"dir": directory, "every_n_epochs": None},
        preemption_signals=("USR2",),
        plugins=[SendSignal(0, 2, signal.SIGUSR2)],
    )
    during: list[Any] = []

    class Look:
        @hookimpl
        def on_train_epoch_start(self) -> None:
            during.append(signal.getsignal(signal.SIGTERM))

    trainer.plugin_manager.register(Look())
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(SystemExit) as info:
            fit(trainer)
        assert info.value.code == 128 + signal.SIGUSR2
        assert during == [signal.SIG_DFL]  # SIGTERM is not a preemption signal here: left alone
        assert [i.global_step for i in list_checkpoints(directory)] == [3]
        assert signal.getsignal(signal.SIGUSR2) is _already_exiting
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_preemption_signals_are_checked_by_the_config() -> None:
    assert dltrain.TrainerConfig(preemption_signals=["usr1", "SIGTERM"]).preemption_signals == (
        "SIGUSR1",
        "SIGTERM",
    )
    with pytest.raises(ValidationError, match="cannot hold 'SIGINT': Ctrl-C has its own handling"):
        dltrain.TrainerConfig(preemption_signals=("SIGINT",))
    with pytest.raises(ValidationError, match="'SIGFOO' is not a signal of this platform"):
        dltrain.TrainerConfig(preemption_signals=("SIGFOO",))
    with pytest.raises(ValidationError, match="cannot hold 'SIGKILL': it cannot be handled"):
        dltrain.TrainerConfig(preemption_signals=("SIGKILL",))


@POSIX
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)
def test_under_torchrun_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",  # a hung collective fails the job before the timeout below
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(SCRIPTS / "ddp_preempted.py"),
        "--out",
        str(tmp_path),
        "--term-rank=1",
        "--term-after=6",
    ]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert job.returncode != 0  # torchrun reports workers that exited with 143 as failed
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # Checked every step (stop_check_every_n_steps=1), without a blocking collective: the exchange
    # started at step 6 is read at step 7, where both ranks stop.
    assert ranks[0]["steps"] == ranks[1]["steps"] == list(range(1, 8)), job.stderr
    assert ranks[1]["reason"] == "SIGTERM received"
    assert ranks[0]["reason"] == "SIGTERM received (on rank 1)"
    assert [r["ended"] for r in ranks] == ["SystemExit(143)", "SystemExit(143)"]
    assert [(i.global_step, i.trigger) for i in list_checkpoints(tmp_path / "ckpt")] == [(7, "fit_end")]
