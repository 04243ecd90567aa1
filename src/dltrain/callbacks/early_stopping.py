"""``EarlyStopping``: stop a fit when a monitored metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from dltrain._markers import hookimpl
from dltrain._warnings import warn
from dltrain.errors import ConfigError
from dltrain.state import RunKind, Stage

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stops fit when ``monitor`` has not improved for ``patience`` validations.

    It decides once per epoch, in ``on_epoch_end``, on the epoch's whole row
    (training and validation metrics), so ``monitor`` may be any metric of the
    row: ``val_loss``, ``val_accuracy``, ``train_loss``. An epoch that did not
    validate (``val_every_n_epochs``) is not counted when ``monitor`` is a
    validation metric, and an epoch cut short by a stop or ``max_steps`` is
    never counted (a resumed run finishes it and counts it then).

    The stop goes through :meth:`~dltrain.Trainer.request_stop`, so the fit
    ends after this epoch with the reason in ``state.stop_reason``, under
    torchrun in every process at once. Its counters are in every checkpoint:
    a resumed run counts the validations before the interruption.

    Args:
        monitor: The metric to watch, as named in ``trainer.history``.
        mode: ``"min"``: lower is better (a loss); ``"max"``: higher is better
            (an accuracy).
        patience: Validations without improvement after which the fit stops
            (0: the first validation that does not improve stops it).
        min_delta: The least change that counts as an improvement; a change
            of ``min_delta`` or less does not.
        check_finite: Stop at once when the monitored value is NaN or infinite.

    Raises:
        ConfigError: an argument is out of range; during fit, ``monitor`` is
            not among the metrics of an epoch that has them (the message lists
            the metrics there are).

    Attributes:
        best: The best value so far, or None before the first counted epoch.
        best_epoch: The epoch (counted from 1) that reached ``best``, or None.
        wait: Counted validations since the last improvement.
        stopped_epoch: The epoch at which this plugin asked to stop, or None.
    """

    name = "early_stopping"

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"EarlyStopping: patience must be an integer >= 0, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigError(f"EarlyStopping: min_delta must be a finite number >= 0, got {min_delta!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(
                f"EarlyStopping: monitor must be a metric name such as 'val_loss', got {monitor!r}"
            )
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.check_finite = float(min_delta), check_finite
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @hookimpl
    def on_setup(self, state: State) -> None:
        """A new fit starts from nothing (a resume restores the counters afterwards)."""
        if state.run is RunKind.FIT:
            self._reset()

    @hookimpl
    def on_epoch_end(self, trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
        """Judge the finished epoch's row; ask to stop when patience ran out or the value is not finite."""
        if state.stage is not Stage.DONE:  # cut short: the resumed run finishes and judges it
            return
        epoch = state.epoch + 1
        value = metrics.get(self.monitor)
        if value is None:
            validated = any(name.startswith("val_") for name in metrics)
            if self.monitor.startswith("val_") and not validated:
                return  # this epoch did not validate: wait for one that does
            raise ConfigError(
                f"EarlyStopping monitors {self.monitor!r}, which is not among the metrics of epoch "
                f"{epoch}: {sorted(metrics)}; set monitor to one of them"
                + (" (val_* metrics need val_data)" if self.monitor.startswith("val_") else "")
            )
        if self.check_finite and not math.isfinite(value):
            self.stopped_epoch = epoch
            trainer.request_stop(f"{self.monitor} is {value} at epoch {epoch}, not a finite number")
            return
        if self._improves(value):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            return
        self.wait += 1
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = epoch
            trainer.request_stop(
                f"{self.monitor} did not improve for {self.wait} validation{'s' if self.wait > 1 else ''} "
                f"(best {self.best:.6g} at epoch {self.best_epoch})"
            )

    @hookimpl
    def state_dict(self) -> dict[str, Any]:
        """The counters, and what they count, as plain data."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
        }

    @hookimpl
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue counting from a checkpoint; counters of another monitor or mode are dropped."""
        if (state_dict.get("monitor"), state_dict.get("mode")) != (self.monitor, self.mode):
            warn(
                f"EarlyStopping: the checkpoint counted {state_dict.get('monitor')!r} "
                f"({state_dict.get('mode')}), this run monitors {self.monitor!r} ({self.mode}); "
                f"counting starts afresh"
            )
            return
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
        epoch = state_dict.get("best_epoch")
        self.best_epoch = None if epoch is None else int(epoch)
        self.wait = int(state_dict.get("wait", 0))
