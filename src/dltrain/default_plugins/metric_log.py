"""Built-in plugin ``metric_log``: every run keeps its metrics in a folder, no server needed.

With ``TrainerConfig.run_dir`` set (default ``runs``), a Trainer's first
``fit``, ``validate`` or ``test`` creates a new folder under it, named after
the local time (``runs/2026-11-28_13-05-12``, with ``_1``, ``_2``, ... added
when two runs start in the same second), and writes:

- ``config.json``: the :class:`~dltrain.TrainerConfig` of the run, at start.
- ``metrics.jsonl``: one JSON object per line, each with a ``kind``:

  - ``"step"``, every ``log_every_n_steps`` optimizer steps: ``epoch``,
    ``step`` and the metrics of the ``on_step_metrics`` hook, ``train_loss``
    (the mean over the interval's micro-batches, summed on the device and
    read once per interval for every logger) and ``lr``. Nothing runs per step;
  - ``"epoch"``, after each epoch (and its validation): ``epoch``, ``step``
    and all the epoch's metrics (``train_loss``, ``val_accuracy``, ...);
  - ``"validate"`` / ``"test"``, after a standalone evaluation: its metrics;
  - ``"resume"``: the ``step`` at which a fit resumed from a checkpoint continued;
  - ``"rollback"``: the ``step`` ``on_nonfinite="rollback"`` went back to, and the ``reason``.
  - ``"failed"``, the last row of a run that raised: ``epoch``, ``step`` and
    ``error`` (the exception's type and first line). A run that fails before its
    first step leaves a folder whose log holds this row alone, so a failed run
    is never mistaken for one that has not logged yet. A clean stop (Ctrl-C,
    SIGTERM, a stop request) is not a failure: its last row is its epoch's.

  Every row also has ``time``, seconds of running since the folder was created.

A fit resumed from a checkpoint (``fit(..., resume=...)``) continues the
folder the checkpoint came from when it still exists: the rows the
interrupted run wrote after the checkpoint's step are dropped, a
``"resume"`` row is added, and the log goes on, so it reads as one run.

Later ``validate``/``test`` calls of the same Trainer append to the same
folder; a second ``fit`` starts a new one. The folder of the current run is
``trainer.plugin_manager.get_plugin("metric_log").run_path``. Only rank 0
writes. Rows are flushed at every epoch end and the file is closed at
teardown. :func:`dltrain.plot.plot_run` draws the curves.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dltrain._markers import hookimpl
from dltrain._running import RunningMean
from dltrain.errors import ConfigError
from dltrain.state import RunKind

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["CONFIG_FILE", "METRICS_FILE", "MetricLogPlugin", "RunningMean", "new_run_path", "read_metrics"]
# RunningMean lives in dltrain._running; it is re-exported here, where plugins found it first.

#: Name of the file of metric rows inside a run folder.
METRICS_FILE = "metrics.jsonl"
#: Name of the file holding the run's TrainerConfig inside a run folder.
CONFIG_FILE = "config.json"


def new_run_path(root: Path) -> Path:
    """Create and return a new folder under ``root`` named after the local time.

    ``root/2026-11-28_13-05-12``, or ``..._1``, ``..._2`` when that exists
    (creation is atomic, so two processes never get the same folder). After a
    clash the next free suffix is read from the folder once, so many runs
    started within one second cost one listing, not one attempt per run.
    """
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        (root / stamp).mkdir()
        return root / stamp
    except FileExistsError:
        pass
    prefix = stamp + "_"
    taken = [
        int(entry.name[len(prefix) :])
        for entry in os.scandir(root)
        if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit()
    ]
    start = max(taken, default=0) + 1
    for i in range(start, start + 1000):  # another process may take names meanwhile
        candidate = root / f"{prefix}{i}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"could not create a new run folder under {str(root)!r}: 1000 names in a row are taken")


def _json_value(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> float:
    """Drop the rows logged after ``step`` (by the run that was interrupted); the last kept ``time``."""
    kept: list[str] = []
    last_time = 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(row.get("step"), int) and row["step"] > step:
            continue
        kept.append(line)
        if isinstance(row.get("time"), (int, float)):
            last_time = float(row["time"])
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return last_time


def read_metrics(run_path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``metrics.jsonl``, with ``"nan"``/``"inf"`` strings as floats.

    A last line cut short (a run killed while writing) is skipped.
    """
    rows: list[dict[str, Any]] = []
    path = Path(run_path) / METRICS_FILE
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return rows


class MetricLogPlugin:
    """Writes ``config.json`` and ``metrics.jsonl`` to a new folder under ``run_dir``.

    Args:
        run_dir: The folder that holds one subfolder per run.
        config: The TrainerConfig to store as ``config.json``; None stores
            the Trainer's own config.

    Attributes:
        run_path: The folder of the current run, as an absolute path, set when
            a run starts (None before).
    """

    name = "metric_log"

    def __init__(self, run_dir: str | Path, config: TrainerConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_path: Path | None = None
        self._config = config
        self._file: IO[str] | None = None
        self._t0 = 0.0
        self._resume_from: Path | None = None

    @property
    def metrics_path(self) -> Path | None:
        """The ``metrics.jsonl`` of the current run (None before a run starts)."""
        return None if self.run_path is None else self.run_path / METRICS_FILE

    # -- files -----------------------------------------------------------------

    def _open(self, trainer: Trainer, state: State) -> None:
        if not state.is_global_zero:
            return
        self._close()
        resumed = self._resume_from
        self._resume_from = None
        if state.run is RunKind.FIT and resumed is not None and (resumed / METRICS_FILE).is_file():
            self.run_path = resumed
            self._t0 = time.monotonic() - _truncate_after(resumed / METRICS_FILE, state.global_step)
        elif state.run is RunKind.FIT or self.run_path is None:
            self.run_path = new_run_path(self.run_dir).absolute()
            self._t0 = time.monotonic()
            resumed = None
        # else: an evaluation after a run of this Trainer appends to its folder
        if state.run is RunKind.FIT or not (self.run_path / CONFIG_FILE).exists():
            config = self._config if self._config is not None else trainer.config
            (self.run_path / CONFIG_FILE).write_text(
                json.dumps(config.to_json_dict(), indent=2) + "\n", encoding="utf-8"
            )
        self._file = (self.run_path / METRICS_FILE).open("a", encoding="utf-8")
        if resumed is not None:
            self._write({"kind": "resume", "step": state.global_step}, flush=True)

    def _write(self, row: dict[str, Any], *, flush: bool = False) -> None:
        f = self._file
        if f is None:
            return
        row["time"] = round(time.monotonic() - self._t0, 3)
        f.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        if flush:
            f.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- run hooks ---------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Create the run folder (first, so other plugins can read ``run_path``)."""
        self._open(trainer, state)

    @hookimpl(tryfirst=True)
    def on_validate_start(self, trainer: Trainer, state: State) -> None:
        """Create the run folder, unless a fit of this Trainer already did."""
        self._open(trainer, state)

    @hookimpl(tryfirst=True)
    def on_test_start(self, trainer: Trainer, state: State) -> None:
        """Create the run folder, unless a fit of this Trainer already did."""
        self._open(trainer, state)

    @hookimpl
    def on_exception(self, state: State, exception: BaseException) -> None:
        """Mark the run as failed with a ``"failed"`` row naming the error (not for a clean stop).

        KeyboardInterrupt and SystemExit are how Ctrl-C and preemption end a fit
        after its final save: those runs did not fail.
        """
        if self._file is None or not isinstance(exception, Exception):
            return
        lines = str(exception).strip().splitlines()
        error = type(exception).__name__ + (f": {lines[0]}" if lines else "")
        self._write(
            {"kind": "failed", "epoch": state.epoch + 1, "step": state.global_step, "error": error},
            flush=True,
        )

    @hookimpl
    def on_teardown(self) -> None:
        """Close the file (the run ended, maybe by an exception)."""
        self._close()

    # -- resume ------------------------------------------------------------------

    @hookimpl
    def state_dict(self) -> dict[str, Any] | None:
        """The run folder, so a fit resumed from a checkpoint continues its metric log."""
        return None if self.run_path is None else {"run_path": str(self.run_path)}

    @hookimpl
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's run folder (if it still exists) when the fit starts."""
        self._resume_from = Path(state_dict["run_path"])

    # -- step rows -----------------------------------------------------------------

    @hookimpl
    def on_step_metrics(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write a step row: every ``log_every_n_steps`` optimizer steps, the interval's metrics."""
        if self._file is not None:
            self._write({"kind": "step", "epoch": state.epoch + 1, "step": state.global_step, **metrics})

    # -- epoch rows ------------------------------------------------------------------

    @hookimpl
    def on_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write the epoch's row: its training and validation metrics."""
        if self._file is not None:
            row = {"kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step, **metrics}
            self._write(row, flush=True)

    @hookimpl
    def on_rollback(self, state: State, reason: str) -> None:
        """Write a ``"rollback"`` row: the step the run went back to, and why."""
        if self._file is not None:
            self._write({"kind": "rollback", "step": state.global_step, "reason": reason}, flush=True)

    @hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write a standalone evaluation's row (a fit's validation is in its epoch's row)."""
        if self._file is not None and state.run is not RunKind.FIT and metrics:
            self._write({"kind": state.run.value, **metrics}, flush=True)


def make_plugin(config: TrainerConfig) -> MetricLogPlugin | None:
    """The factory the plugin manager calls: a metric log under ``config.run_dir``, or None."""
    if config.run_dir is None:
        return None
    return MetricLogPlugin(config.run_dir)
