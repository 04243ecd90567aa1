"""Built-in plugin ``progress``: what a person watching the run sees.

Two displays, chosen by ``TrainerConfig.progress``:

- ``"line"``: one plain line per epoch, and one per standalone evaluation::

      epoch 3/10  train_loss 0.3121  val_loss 0.2933  val_accuracy 0.9150  (4.9 s)

  Nothing runs per step, so it costs nothing, and logs of CI jobs, files and
  notebooks hold one line per epoch.
- ``"bar"``: the same lines, plus a live ``tqdm`` bar while an epoch runs
  (batches done/total, rate, ETA and the epoch's running mean loss). The bar
  disappears when the epoch's line is printed, so the scrollback holds the
  lines only. The running loss is summed on the device and read once per
  refresh (at most every ``refresh_s`` seconds), never once per step.

``"auto"`` (the default) picks the bar when stdout is a terminal and tqdm is
installed, else the line. Only the process of rank 0 prints. tqdm is
imported when the first bar is drawn, never by ``import dltrain``.

An epoch's line is printed by ``on_epoch_end``, once its validation (if any)
has run, so it holds the training and validation metrics together.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from dltrain._markers import hookimpl
from dltrain._running import RunningMean
from dltrain.errors import ConfigError
from dltrain.state import Phase, RunKind

if TYPE_CHECKING:
    from collections.abc import Generator

    from dltrain.config import TrainerConfig
    from dltrain.state import State, StepOutput
    from dltrain.trainer import Trainer

__all__ = ["BarProgress", "LineProgress", "format_metrics", "format_value", "resolve_mode"]

ProgressMode = Literal["bar", "line", "off"]


def format_value(value: float) -> str:
    """A metric value for people: 4 decimals, or scientific notation when very small or large."""
    if value == 0 or (math.isfinite(value) and 1e-3 <= abs(value) < 1e5):
        return f"{value:.4f}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``train_loss 0.3121  val_accuracy 0.9102``: names and values, two spaces apart."""
    return "  ".join(f"{name} {format_value(value)}" for name, value in metrics.items())


def _tqdm_available() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


def resolve_mode(setting: str, stream: Any = None) -> ProgressMode:
    """Turn ``TrainerConfig.progress`` into the display to use.

    ``"auto"`` is ``"bar"`` when ``stream`` (default: stdout) is a terminal
    and tqdm is installed, else ``"line"``.

    Raises:
        ConfigError: ``"bar"`` was asked for but tqdm is not installed.
    """
    if setting == "auto":
        tty = _isatty(sys.stdout if stream is None else stream)
        return "bar" if tty and _tqdm_available() else "line"
    if setting == "bar" and not _tqdm_available():
        raise ConfigError(
            "progress='bar' needs tqdm, which is not installed: pip install 'torch-dltrain[progress]', "
            "or use progress='line' (one line per epoch) or 'auto'"
        )
    if setting not in ("bar", "line", "off"):
        raise ConfigError(f"progress={setting!r} is not one of 'auto', 'bar', 'line', 'off'")
    return setting  # type: ignore[return-value]


class LineProgress:
    """Prints one line per epoch and per standalone evaluation (rank 0 only).

    Args:
        max_epochs: The run's epoch limit, shown as ``epoch 3/10`` (None: ``epoch 3``).
        max_steps: The run's step limit, shown as ``step 1500/2000`` when set.
        stream: Where to print; None means ``sys.stdout`` at the time of printing.
    """

    name = "progress"

    def __init__(
        self, max_epochs: int | None = None, max_steps: int | None = None, stream: TextIO | None = None
    ) -> None:
        self._max_epochs = max_epochs
        self._max_steps = max_steps
        self._stream = stream
        self._started = 0.0

    # -- output ---------------------------------------------------------------

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _print(self, line: str) -> None:
        print(line, file=self._out(), flush=True)

    def _epoch_label(self, state: State) -> str:
        label = f"epoch {state.epoch + 1}"
        if self._max_epochs is not None:
            label += f"/{self._max_epochs}"
        if self._max_steps is not None:
            label += f"  step {state.global_step}/{self._max_steps}"
        return label

    # -- hooks -----------------------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Say where the metric log goes, when the ``metric_log`` plugin writes one."""
        if not state.is_global_zero:
            return
        run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
        if isinstance(run_path, Path):
            shown = run_path.relative_to(Path.cwd()) if run_path.is_relative_to(Path.cwd()) else run_path
            self._print(f"logging metrics to {shown}")

    @hookimpl
    def on_train_epoch_start(self, state: State) -> None:
        """Start the epoch's clock."""
        self._started = time.monotonic()

    @hookimpl
    def on_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Print the epoch's line: its training and validation metrics."""
        if state.is_global_zero:
            parts = [
                self._epoch_label(state),
                format_metrics(metrics),
                f"({time.monotonic() - self._started:.1f} s)",
            ]
            self._print("  ".join(p for p in parts if p))

    @hookimpl
    def on_eval_epoch_start(self, state: State) -> None:
        """Start the clock of a standalone evaluation."""
        if state.run is not RunKind.FIT:
            self._started = time.monotonic()

    @hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Print a standalone evaluation's line (a fit's validation is on its epoch's line)."""
        if not state.is_global_zero or state.run is RunKind.FIT:
            return
        seconds = f"({time.monotonic() - self._started:.1f} s)"
        if state.phase is Phase.PREDICT:
            self._print(f"predict  {state.batch_idx + 1} batches  {seconds}")
        else:
            self._print(f"{state.phase.value}  {format_metrics(metrics)}  {seconds}")

    @hookimpl
    def on_fit_end(self, state: State) -> None:
        """Say why the fit stopped, when it stopped early."""
        if state.is_global_zero and state.stop_requested and state.stop_reason:
            self._print(f"stopped: {state.stop_reason}")


class BarProgress(LineProgress):
    """A live tqdm bar per epoch and per evaluation, then the same lines as :class:`LineProgress`.

    Args:
        max_epochs: The run's epoch limit (None when the run is limited by steps).
        max_steps: The run's step limit, if any.
        limit_train_batches: Training batches per epoch at most (the bar's total).
        limit_val_batches: Evaluation batches at most.
        stream: Where to draw; None means ``sys.stdout`` when a bar is created.
        refresh_s: Smallest interval between two refreshes of a bar, in seconds.
            Each refresh reads the running loss from the device once.
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        stream: TextIO | None = None,
        refresh_s: float = 0.2,
    ) -> None:
        super().__init__(max_epochs, max_steps, stream)
        self._limits = {Phase.TRAIN: limit_train_batches}
        self._eval_limit = limit_val_batches
        self._refresh_s = refresh_s
        self._lengths: dict[Phase, int | None] = {}
        self._bar: Any = None
        self._next_refresh = 0.0
        self._loss = RunningMean()

    # -- bars ------------------------------------------------------------------

    def _total(self, phase: Phase) -> int | None:
        length = self._lengths.get(phase)
        limit = self._limits.get(phase) if phase is Phase.TRAIN else self._eval_limit
        if length is None:
            return limit
        return length if limit is None else min(length, limit)

    def _open(self, description: str, total: int | None, initial: int = 0) -> None:
        from tqdm import tqdm

        self._close()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=description,
            file=self._out(),
            leave=False,  # the epoch's line replaces the bar
            dynamic_ncols=True,
            unit="batch",
            mininterval=0,  # refreshes are throttled here, not by tqdm
            miniters=1,
        )
        self._next_refresh = time.monotonic() + self._refresh_s

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- hooks -----------------------------------------------------------------

    @hookimpl(wrapper=True)
    def prepare_data(self, data: Any, phase: Phase) -> Generator[None, Any, Any]:
        """Remember the length of the data each phase finally uses (the bar's total)."""
        result = yield
        final = data if result is None else result
        try:
            self._lengths[phase] = len(final)
        except TypeError:  # an iterable without a length: the bar shows no total
            self._lengths[phase] = None
        return result

    @hookimpl
    def on_train_epoch_start(self, state: State) -> None:
        """Open this epoch's bar."""
        super().on_train_epoch_start(state)
        self._loss = RunningMean()
        if state.is_global_zero:
            self._open(self._epoch_label(state), self._total(Phase.TRAIN), initial=state.batch_idx)

    @hookimpl
    def on_train_batch_end(self, state: State, output: StepOutput) -> None:
        """Add the loss on the device; refresh the bar when ``refresh_s`` has passed."""
        bar = self._bar
        if bar is None:
            return
        if output.loss is not None:
            self._loss.add(output.loss)
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self._refresh_s
        mean = self._loss.read(reset=False)  # the only host sync of the display, once per refresh
        if mean is not None:
            bar.set_postfix_str(f"loss {format_value(mean)}", refresh=False)
        bar.update(state.batch_idx + 1 - bar.n)

    @hookimpl
    def on_train_epoch_end(self) -> None:
        """Close the epoch's bar."""
        self._close()

    @hookimpl
    def on_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Close any bar; print the epoch's line."""
        self._close()
        super().on_epoch_end(state, metrics)

    @hookimpl
    def on_eval_epoch_start(self, state: State) -> None:
        """Open the evaluation's bar."""
        super().on_eval_epoch_start(state)
        if state.is_global_zero:
            bar, self._bar = self._bar, None  # keep no train bar open below the eval bar
            if bar is not None:
                bar.close()
            label = "validating" if state.phase is Phase.VALIDATE else state.phase.value
            self._open(label, self._total(state.phase))

    @hookimpl
    def on_eval_batch_end(self, state: State) -> None:
        """Refresh the evaluation's bar when ``refresh_s`` has passed."""
        bar = self._bar
        if bar is None:
            return
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self._refresh_s
            bar.update(state.batch_idx + 1 - bar.n)

    @hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Close the bar; print the epoch's or the evaluation's line."""
        self._close()
        super().on_eval_epoch_end(state, metrics)

    @hookimpl
    def on_teardown(self) -> None:
        """Close any bar left open (an exception)."""
        self._close()


def make_plugin(config: TrainerConfig) -> LineProgress | None:
    """The factory the plugin manager calls: the display ``config.progress`` asks for, or None."""
    mode = resolve_mode(config.progress)
    if mode == "off":
        return None
    if mode == "bar":
        return BarProgress(
            config.max_epochs,
            config.max_steps,
            limit_train_batches=config.limit_train_batches,
            limit_val_batches=config.limit_val_batches,
        )
    return LineProgress(config.max_epochs, config.max_steps)
