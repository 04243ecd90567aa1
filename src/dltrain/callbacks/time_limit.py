"""``TimeLimit``: stop before a wall-clock limit, leaving room for the final checkpoint."""

from __future__ import annotations

import datetime
import math
import re
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from dltrain._loop import unwrap_model
from dltrain._markers import hookimpl
from dltrain._warnings import warn
from dltrain.errors import ConfigError
from dltrain.state import Phase, RunKind

if TYPE_CHECKING:
    from dltrain.config import CheckpointConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["TimeLimit", "format_duration", "parse_duration"]

#: Write speed assumed for a checkpoint before a save was measured, in bytes per second.
ASSUMED_WRITE_SPEED = 100e6

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_UNIT_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])")
_CLOCK = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})")


def parse_duration(value: float | str | datetime.timedelta) -> float:
    """Seconds, from a number of seconds, a ``timedelta``, or a string.

    Strings: ``"5400"`` (seconds), units ``d``, ``h``, ``m``, ``s`` in that
    order (``"4h"``, ``"90m"``, ``"1h30m"``, ``"3600s"``, ``"1.5h"``,
    ``"1d12h"``), or a clock as batch schedulers write limits, ``"H:MM:SS"``
    or ``"D-HH:MM:SS"`` (``"1:30:00"``, ``"2-00:00:00"``).

    Raises:
        ConfigError: the value is not a positive duration in one of these forms.
    """
    seconds: float | None = None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        clock = _CLOCK.fullmatch(text)
        parts = _UNIT_PART.findall(text)
        if re.fullmatch(r"\d+(?:\.\d*)?", text):
            seconds = float(text)
        elif clock:
            days, hours, minutes, secs = (int(g) if g else 0 for g in clock.groups())
            seconds = days * 86400.0 + hours * 3600.0 + minutes * 60.0 + secs
        elif parts and _UNIT_PART.sub("", text).strip() == "":
            units = [unit for _, unit in parts]
            if units == sorted(set(units), key="dhms".index):  # each unit once, largest first
                seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"TimeLimit: cannot read {value!r} as a positive duration; write seconds (5400), a "
            f"string such as '90m', '1h30m', '4h', '3600s', '1d12h', or a clock '1:30:00' / '2-00:00:00'"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``5412`` -> ``"1h30m12s"``; under a minute, ``"48.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


class TimeLimit:
    """Stops a fit before ``seconds`` have passed, with time left for the final checkpoint.

    For jobs with a wall-clock limit (a cluster's ``--time``): the fit ends
    cleanly before the scheduler kills it, the ``checkpoint`` plugin saves the
    final state (``save_on_fit_end``), and ``fit(..., resume="last")`` in the
    next job continues exactly. Configure checkpointing, or a warning says the
    stop will not be saved.

    The clock starts when fit starts (its ``on_setup``, before a resumed
    checkpoint is loaded): time spent before, in imports or building the
    data, is not counted, so subtract it from the job's limit. A resumed run
    starts a new clock: give each job its own limit.

    When it stops: it measures, as the run goes, how long a training step
    takes (the slowest of the last 32), the first step of an epoch, a
    validation, and a checkpoint save (by wrapping the ``checkpoint`` plugin's
    ``on_train_batch_end``, ``on_epoch_end`` and ``on_fit_end``, so the
    measured time is the whole save). At each point where the loop can stop
    (after each optimizer step, after an epoch's training, after an epoch) it
    asks to stop when the time left is less than::

        safety * (time until the next such point + one save) + margin

    The next point is one step later (under torchrun, where a stop takes
    effect up to ``state.stop_delay_steps`` steps after it is asked for, that
    many more), the validation and the epoch-end save after an epoch's
    training, or the next epoch's first step after an epoch. Until a save was measured, a save is taken to last ``save_seconds``,
    or the time to write three times the model's size (the weights and up to
    two optimizer moments per weight) at 100 MB/s. The measurements are in
    every checkpoint, so a resumed run knows them from its first step. The
    checkpoint plugin reports its last save's whole duration (snapshot and
    background write) as ``last_save_seconds``, which counts as a measurement
    too. With asynchronous saves (``checkpoint.async_save``, the default) "one
    save" counts twice: the final save first waits for the one in flight.

    Under torchrun every process measures and decides on its own clock, and a
    stop any of them asks for stops all at the same step. Only rank 0 writes
    a checkpoint: the others count a save where the checkpoint policy has one
    (they build its payload), and rank 0's write shows in their next step.

    Args:
        seconds: The limit: seconds, a ``timedelta`` or a string (``"4h"``,
            ``"90m"``, ``"1h30m"``, ``"3600s"``, ``"1:30:00"``; see
            :func:`parse_duration`).
        margin: Seconds always kept in reserve, for what is not measured
            (teardown, loggers flushing, the process exiting).
        safety: The factor applied to the measured durations (1.5: a step or
            a save may take half as long again as measured).
        save_seconds: How long a save takes, until one is measured (None: an
            estimate from the states' size).
        clock: The clock, a function returning seconds (``time.monotonic``);
            tests give a fake one.

    Attributes:
        step_seconds: The slowest of the recent training steps, or None.
        save_seconds: The slowest save measured (or carried from a checkpoint), or None.
        validation_seconds: The slowest validation, or None.
        stopped: Whether this plugin asked the current fit to stop.
    """

    name = "time_limit"

    def __init__(
        self,
        seconds: float | str | datetime.timedelta,
        margin: float = 30.0,
        safety: float = 1.5,
        save_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = parse_duration(seconds)
        if not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise ConfigError(f"TimeLimit: margin must be a number of seconds >= 0, got {margin!r}")
        if not isinstance(safety, (int, float)) or not 1 <= safety < math.inf:
            raise ConfigError(f"TimeLimit: safety must be a number >= 1, got {safety!r}")
        if save_seconds is not None and (not isinstance(save_seconds, (int, float)) or save_seconds < 0):
            raise ConfigError(
                f"TimeLimit: save_seconds must be a number of seconds >= 0, got {save_seconds!r}"
            )
        self.margin, self.safety, self._clock = float(margin), float(safety), clock
        self._assumed_save = None if save_seconds is None else float(save_seconds)
        self._reset()

    def _reset(self) -> None:
        self.step_seconds: float | None = None
        self.first_step_seconds: float | None = None
        self.validation_seconds: float | None = None
        self.save_seconds: float | None = None
        self.stopped = False
        self._stopped_at: float | None = None
        self._final_save: float | None = None
        self._steps: deque[float] = deque(maxlen=32)
        self._start: float | None = None
        self._last_check: float | None = None
        self._first_in_epoch = True
        self._seen_step = 0
        self._eval_start: float | None = None
        self._checkpoint: Any = None
        self._estimated_save = 0.0

    def time_left(self) -> float | None:
        """Seconds left before the limit in the current fit, or None outside a fit."""
        return None if self._start is None else self.limit - (self._clock() - self._start)

    # -- the clock and what it measures ------------------------------------------------------

    @hookimpl
    def on_setup(self, state: State) -> None:
        """A fit starts the clock (and forgets an earlier fit's measurements; a resume restores them)."""
        if state.run is RunKind.FIT:
            self._reset()
            self._start = self._clock()

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Find the checkpoint plugin, warn when nothing will save the stop, and check the time left."""
        self._checkpoint = trainer.get_plugin("checkpoint")
        cfg = trainer.config.checkpoint
        if state.is_global_zero and (self._checkpoint is None or cfg is None or not cfg.save_on_fit_end):
            fix = (
                "set checkpoint.save_on_fit_end=True"
                if cfg is not None
                else "set TrainerConfig.checkpoint (e.g. checkpoint={'dir': 'checkpoints'})"
            )
            warn(
                f"TimeLimit stops the fit before its limit, but nothing saves it then: {fix} to resume it later"
            )
        if self._checkpoint is not None:
            self._estimated_save = _state_bytes(trainer) / ASSUMED_WRITE_SPEED
        self._seen_step = state.global_step
        self._check(trainer, state, self.first_step_seconds or self.step_seconds or 0.0)

    @hookimpl
    def on_train_epoch_start(self) -> None:
        """The first step of an epoch is timed from here."""
        self._last_check, self._first_in_epoch = self._clock(), True

    @hookimpl(wrapper=True)
    def on_train_batch_end(self, trainer: Trainer, state: State) -> Generator[None, None, None]:
        """Around every plugin's batch end (a step-triggered save included): time the step and the
        save; after an optimizer step, stop when the next step and a save would not fit."""
        before, last = self._clock(), self._last_saved()
        result = yield
        after = self._clock()
        stepped = state.micro_step == 0 and state.global_step != self._seen_step
        policy = self._policy(trainer)
        every = policy.every_n_steps if policy is not None else None
        self._saved(
            last, after - before, scheduled=bool(stepped and every and state.global_step % every == 0)
        )
        if stepped:
            self._seen_step = state.global_step
            if self._last_check is not None:
                taken = before - self._last_check
                if self._first_in_epoch:
                    self.first_step_seconds = max(self.first_step_seconds or 0.0, taken)
                else:
                    self._steps.append(taken)
                    self.step_seconds = max(self._steps)
            self._last_check, self._first_in_epoch = after, False
            steps_ahead = 1 + state.stop_delay_steps  # under torchrun a stop lands some steps late
            self._check(trainer, state, steps_ahead * (self.step_seconds or self.first_step_seconds or 0.0))
        return result

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer, state: State) -> None:
        """Before the validation: stop now when it and the epoch's save would not fit."""
        cfg, epoch_save = trainer.config.checkpoint, 0.0
        if cfg is not None and cfg.every_n_epochs and (state.epoch + 1) % cfg.every_n_epochs == 0:
            epoch_save = self._save_estimate(trainer)
        self._check(trainer, state, (self.validation_seconds or 0.0) + epoch_save)

    @hookimpl
    def on_eval_epoch_start(self, state: State) -> None:
        """Time the fit's validations."""
        self._eval_start = (
            self._clock() if state.run is RunKind.FIT and state.phase is Phase.VALIDATE else None
        )

    @hookimpl
    def on_eval_epoch_end(self) -> None:
        """Time the fit's validations."""
        if self._eval_start is not None:
            taken = self._clock() - self._eval_start
            self.validation_seconds = max(self.validation_seconds or 0.0, taken)
            self._eval_start = None

    @hookimpl(wrapper=True)
    def on_epoch_end(self, trainer: Trainer, state: State) -> Generator[None, None, None]:
        """Around the epoch's end (its save included): stop when the next epoch's first step would not fit."""
        before, last = self._clock(), self._last_saved()
        result = yield
        policy = self._policy(trainer)
        every = policy.every_n_epochs if policy is not None else None
        self._saved(last, self._clock() - before, scheduled=bool(every and (state.epoch + 1) % every == 0))
        self._check(trainer, state, self.first_step_seconds or self.step_seconds or 0.0)
        return result

    @hookimpl(wrapper=True)
    def on_fit_end(self, trainer: Trainer, state: State) -> Generator[None, None, None]:
        """Around the final save: time it, and say how the limit was kept."""
        before, last = self._clock(), self._last_saved()
        result = yield
        policy = self._policy(trainer)
        self._saved(last, self._clock() - before, scheduled=bool(policy and policy.save_on_fit_end))
        if self.stopped and state.is_global_zero and self._stopped_at is not None:
            ended = self.limit - (self.time_left() or 0.0)
            saved = ""
            if self._final_save is not None:
                saved = f"the final checkpoint took {format_duration(self._final_save)}; "
            elif (self._last_saved() or {}).get("step") == state.global_step:
                saved = "its last step was saved already; "  # e.g. stopped right after an epoch's save
            print(
                f"time limit: stopped {format_duration(self._stopped_at)} into {format_duration(self.limit)}; "
                f"{saved}fit ended {format_duration(max(self.limit - ended, 0.0))} before the limit",
                flush=True,
            )
        self._start = None
        return result

    # -- deciding -----------------------------------------------------------------------

    def _policy(self, trainer: Trainer) -> CheckpointConfig | None:
        """When the checkpoint plugin saves (None: it does not)."""
        return trainer.config.checkpoint if self._checkpoint is not None else None

    def _last_saved(self) -> Any:
        return getattr(self._checkpoint, "last", None)

    def _saved(self, last_before: Any, taken: float, scheduled: bool) -> None:
        """Record ``taken`` as a save's duration when the checkpoint plugin saved meanwhile (its ``last``
        changed), or when its policy saves here: only rank 0 writes, but every rank builds the
        payload (and takes the stop decision), so every rank counts the save. A scheduled save that
        did not happen (nothing new to save) counts as a short one; the slowest is what is kept."""
        written = self._checkpoint is not None and getattr(self._checkpoint, "last", None) != last_before
        if not (written or (scheduled and self._checkpoint is not None)):
            return
        self.save_seconds = max(self.save_seconds or 0.0, taken)
        if written and self.stopped:
            self._final_save = taken

    def _save_estimate(self, trainer: Trainer) -> float:
        """The time a final save may take: one save, or two when saves are asynchronous (the
        final one first waits for the one still in flight)."""
        if self._checkpoint is None:
            return 0.0
        reported = getattr(self._checkpoint, "last_save_seconds", None)
        measured = [s for s in (self.save_seconds, reported) if isinstance(s, (int, float))]
        if measured:
            one = float(max(measured))
        else:
            one = self._assumed_save if self._assumed_save is not None else self._estimated_save
        policy = self._policy(trainer)
        return 2 * one if policy is not None and policy.async_save else one

    def _check(self, trainer: Trainer, state: State, next_gap: float) -> None:
        """Ask to stop when the time left is less than the reserve for ``next_gap`` and a save."""
        if state.stop_requested or self._start is None:
            return
        save = self._save_estimate(trainer)
        reserve = self.safety * (next_gap + save) + self.margin
        elapsed = self._clock() - self._start
        left = self.limit - elapsed
        if left < reserve:
            self.stopped, self._stopped_at = True, elapsed
            trainer.request_stop(
                f"time limit {format_duration(self.limit)}: {format_duration(elapsed)} passed, and "
                f"{format_duration(max(left, 0.0))} left is less than the {format_duration(reserve)} kept "
                f"for the next step and the final checkpoint"
            )

    # -- checkpoints ---------------------------------------------------------------------

    @hookimpl
    def state_dict(self) -> dict[str, Any]:
        """The measured durations (not the clock: a resumed run starts its own)."""
        return {
            "step_seconds": self.step_seconds,
            "first_step_seconds": self.first_step_seconds,
            "validation_seconds": self.validation_seconds,
            "save_seconds": self.save_seconds,
        }

    @hookimpl
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Start from the durations an earlier run measured."""

        def number(key: str) -> float | None:
            value = state_dict.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        self.step_seconds = number("step_seconds")
        self.first_step_seconds = number("first_step_seconds")
        self.validation_seconds = number("validation_seconds")
        self.save_seconds = number("save_seconds")
        if self.step_seconds is not None:
            self._steps.append(self.step_seconds)


def _state_bytes(trainer: Trainer) -> int:
    """About what a checkpoint writes: three times the model's tensors (the weights, and up to
    two moments per weight in the optimizer's state, which is still empty when fit starts)."""
    tensors = unwrap_model(trainer.model).state_dict().values()
    return 3 * sum(int(t.numel()) * int(t.element_size()) for t in tensors)
