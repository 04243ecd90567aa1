"""TensorBoard logging for dltrain, found through the ``dltrain`` entry-point group.

Once installed (``pip install dltrain-tensorboard``), every Trainer writes
TensorBoard event files; nothing to register. Disable it with
``disable_plugins=["tensorboard"]`` (or all entry-point plugins with
``autoload_plugins=False``).

What it writes, with the global step (optimizer steps) on the x axis:

- ``loss/train_step``: the mean training loss of every ``log_every_n_steps``
  steps (summed on the device, read once per interval), and ``lr``;
- ``loss/train``, ``loss/val``, ``accuracy/val``, ...:
  every epoch metric, grouped by metric so train and validation sit side by side;
- ``loss/test``, ...: the metrics of ``trainer.test`` / ``trainer.validate``;
- the hyperparameters (the TrainerConfig, model and optimizer class, initial
  learning rate) with the final metrics, for TensorBoard's HParams tab.

Where: the constructor's ``log_dir``, else ``$DLTRAIN_TENSORBOARD_DIR``, else
``<run folder>/tensorboard`` when the built-in ``metric_log`` plugin is on
(``runs/2026-11-28_13-05-12/tensorboard``), else ``<run_dir>/tensorboard``.
With ``run_dir=None`` and neither setting, it writes nothing: the run asked
for no files. View with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dltrain
from dltrain import RunKind

if TYPE_CHECKING:
    from dltrain import State, Trainer

__all__ = ["LOG_DIR_ENV", "TensorBoardPlugin", "metric_tag"]

#: Environment variable that sets the log folder when the constructor does not.
LOG_DIR_ENV = "DLTRAIN_TENSORBOARD_DIR"


def metric_tag(name: str) -> str:
    """TensorBoard tag of a dltrain metric: ``val_loss`` -> ``loss/val``, so metrics group together."""
    prefix, _, base = name.partition("_")
    if prefix in ("train", "val", "test") and base:
        return f"{base}/{prefix}"
    return name


def _hparams(trainer: Trainer, initial_lr: float | None) -> dict[str, Any]:
    """Flat hyperparameters TensorBoard accepts: numbers, strings and booleans."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists: as text
            flat[prefix] = json.dumps(value)

    add("", trainer.config.to_json_dict())
    model = getattr(trainer.model, "_orig_mod", trainer.model)
    flat["model"] = type(model).__name__
    if trainer.optimizer is not None:
        flat["optimizer"] = type(trainer.optimizer).__name__
    if initial_lr is not None:
        flat["lr"] = initial_lr
    return flat


class TensorBoardPlugin:
    """Writes the scalars and hyperparameters of every run to TensorBoard event files.

    Args:
        log_dir: Where to write; None chooses as described in the module docs.
        name: The plugin's name. A configured instance passed to
            ``Trainer(plugins=[...])`` next to the installed one needs another
            name (or ``disable_plugins=["tensorboard"]`` for the installed one).

    Attributes:
        log_dir: The folder of the current run (None before a run, or when inactive).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None, *, name: str = "tensorboard") -> None:
        self.name = name
        self._setting = Path(log_dir) if log_dir is not None else None
        self.log_dir: Path | None = None
        self._writer: Any = None
        self._initial_lr: float | None = None
        self._final: dict[str, float] = {}
        self._fit_step = 0  # the last step of this Trainer's fit: where later test metrics go

    # -- where -------------------------------------------------------------------

    def _choose_dir(self, trainer: Trainer) -> Path | None:
        if self._setting is not None:
            return self._setting
        env = os.environ.get(LOG_DIR_ENV)
        if env:
            return Path(env)
        run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
        if run_path is not None:
            return Path(run_path) / "tensorboard"
        if trainer.config.run_dir is not None:
            return Path(trainer.config.run_dir) / "tensorboard"
        return None

    def _open(self, trainer: Trainer, state: State) -> None:
        self._close()
        if not state.is_global_zero:
            return
        if state.run is RunKind.FIT or self.log_dir is None:
            self.log_dir = self._choose_dir(trainer)
            self._final = {}
            self._fit_step = 0
        if self.log_dir is None:
            return
        # Imported here: loading tensorboard takes a while, and only runs that log pay for it.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- runs --------------------------------------------------------------------

    @dltrain.hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Open the writer (the built-in metric_log has created the run folder by now)."""
        self._open(trainer, state)
        optimizer = trainer.optimizer
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None and optimizer.param_groups else None
        self._initial_lr = float(lr) if isinstance(lr, (int, float)) else None

    @dltrain.hookimpl
    def on_validate_start(self, trainer: Trainer, state: State) -> None:
        """Open the writer; after a fit of this Trainer, in the fit's folder."""
        self._open(trainer, state)

    @dltrain.hookimpl
    def on_test_start(self, trainer: Trainer, state: State) -> None:
        """Open the writer; after a fit of this Trainer, in the fit's folder."""
        self._open(trainer, state)

    @dltrain.hookimpl
    def on_fit_end(self, trainer: Trainer, state: State) -> None:
        """Record the hyperparameters with the final metrics (TensorBoard's HParams tab)."""
        writer = self._writer
        if writer is None:
            return
        metrics = {metric_tag(k): v for k, v in self._final.items()}
        writer.add_hparams(
            _hparams(trainer, self._initial_lr), metrics, run_name=".", global_step=state.global_step
        )

    @dltrain.hookimpl
    def on_teardown(self) -> None:
        """Flush and close the event file."""
        self._close()

    # -- values --------------------------------------------------------------------

    @dltrain.hookimpl
    def on_step_metrics(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write the interval's mean training loss and the learning rate (every ``log_every_n_steps`` steps)."""
        writer = self._writer
        if writer is None:
            return
        if "train_loss" in metrics:
            writer.add_scalar("loss/train_step", metrics["train_loss"], state.global_step)
        if "lr" in metrics:
            writer.add_scalar("lr", metrics["lr"], state.global_step)

    def _scalars(self, metrics: Mapping[str, float], state: State) -> None:
        if state.run is RunKind.FIT:
            self._fit_step = state.global_step
        step = self._fit_step
        for name, value in metrics.items():
            self._writer.add_scalar(metric_tag(name), value, step)
            self._final[name] = value
        self._writer.flush()

    @dltrain.hookimpl
    def on_train_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write the epoch's training metrics."""
        if self._writer is not None:
            self._writer.add_scalar("epoch", state.epoch + 1, state.global_step)
            self._scalars(metrics, state)

    @dltrain.hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Write the validation (or standalone evaluation) metrics."""
        if self._writer is not None and metrics:
            self._scalars(metrics, state)
