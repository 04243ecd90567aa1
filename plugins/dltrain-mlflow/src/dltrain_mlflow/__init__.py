"""MLflow tracking for dltrain, found through the ``dltrain`` entry-point group.

Once installed (``pip install dltrain-mlflow``), every fit becomes an MLflow
run; nothing to register. Disable it with ``disable_plugins=["mlflow"]`` (or
all entry-point plugins with ``autoload_plugins=False``).

What each run records:

- params: the TrainerConfig (flattened: ``max_epochs``, ``checkpoint.dir``,
  ...), the model and optimizer class, the initial learning rate;
- metrics, with the global step: ``train_loss_step`` and ``lr`` every
  ``log_every_n_steps`` optimizer steps (the loss summed on the device and read
  once per interval), every epoch metric (``train_loss``, ``val_accuracy``, ...)
  and ``epoch``, and the metrics of a later ``trainer.test``/``validate``;
- the final model's ``state_dict`` as the artifact ``model/model_state_dict.pt``;
- tag ``dltrain.run_path``: the run folder of the built-in metric log, whose
  name is also the MLflow run name.

Where: the constructor's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (a
tracking server such as ``http://127.0.0.1:5000``, or a database), else a
local store in ``<run_dir>/mlruns`` (no server needed; MLflow's file store,
enabled for this process with ``MLFLOW_ALLOW_FILE_STORE=true``). With
``run_dir=None`` and neither setting, it records nothing. The experiment is
the constructor's ``experiment_name``, else ``$MLFLOW_EXPERIMENT_NAME``, else
``dltrain``.

The plugin uses an ``MlflowClient`` of its own, never MLflow's global
active run, so two Trainers in one process track two separate runs, and
mlflow is imported only when a run is tracked.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import dltrain
from dltrain import RunKind

if TYPE_CHECKING:
    from dltrain import State, Trainer

__all__ = ["DEFAULT_EXPERIMENT", "MLflowPlugin"]

#: The experiment runs go to when neither the constructor nor $MLFLOW_EXPERIMENT_NAME names one.
DEFAULT_EXPERIMENT = "dltrain"

_MAX_PARAM_LENGTH = 500


def _params(trainer: Trainer, initial_lr: float | None) -> dict[str, str]:
    flat: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix] = text[:_MAX_PARAM_LENGTH]

    add("", trainer.config.to_json_dict())
    model = getattr(trainer.model, "_orig_mod", trainer.model)
    flat["model"] = type(model).__name__
    if trainer.optimizer is not None:
        flat["optimizer"] = type(trainer.optimizer).__name__
    if initial_lr is not None:
        flat["lr"] = repr(initial_lr)
    return flat


class MLflowPlugin:
    """Tracks every fit as an MLflow run: params, metrics and the final model.

    Args:
        tracking_uri: Where to track; None chooses as described in the module docs.
        experiment_name: The MLflow experiment; None: ``$MLFLOW_EXPERIMENT_NAME`` or ``dltrain``.
        log_model: Store the final model's ``state_dict`` as an artifact.
        name: The plugin's name (a configured instance next to the installed
            one needs another name, or ``disable_plugins=["mlflow"]``).

    Attributes:
        run_id: The MLflow run of the current (or last) fit; None before.
        tracking_uri: Where the current run is tracked; None when inactive.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        log_model: bool = True,
        *,
        name: str = "mlflow",
    ) -> None:
        self.name = name
        self._uri_setting = tracking_uri
        self._experiment_setting = experiment_name
        self._log_model = log_model
        self.tracking_uri: str | None = None
        self.run_id: str | None = None
        self._client: Any = None
        self._active = False
        self._fit_step = 0
        self._status = "FINISHED"

    # -- where -------------------------------------------------------------------

    def _choose_uri(self, trainer: Trainer) -> str | None:
        if self._uri_setting:
            return self._uri_setting
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if trainer.config.run_dir is None:
            return None
        # MLflow 3 keeps its file store behind an opt-in; it needs no server and no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (Path(trainer.config.run_dir) / "mlruns").resolve().as_uri()

    def _start(self, trainer: Trainer, state: State) -> None:
        self._active = False
        if not state.is_global_zero:
            return
        if state.run is not RunKind.FIT and self.run_id is not None:
            self._active = True  # an evaluation after a fit: same MLflow run
            return
        uri = self._choose_uri(trainer)
        if uri is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_name = (
            self._experiment_setting or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        )
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment_name)
            except Exception:  # created by another process in the meantime
                experiment = client.get_experiment_by_name(experiment_name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
        tags = {"dltrain.run": state.run.value}
        if run_path is not None:
            tags["dltrain.run_path"] = str(run_path)
        run = client.create_run(
            experiment_id, tags=tags, run_name=Path(run_path).name if run_path is not None else None
        )
        self._client, self.tracking_uri, self.run_id = client, uri, run.info.run_id
        self._active = True
        self._fit_step = 0
        self._status = "FINISHED"
        optimizer = trainer.optimizer
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None and optimizer.param_groups else None
        self._log(params=_params(trainer, float(lr) if isinstance(lr, (int, float)) else None))

    def _log(
        self,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        params: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
            synchronous=True,
        )

    # -- runs ----------------------------------------------------------------------

    @dltrain.hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Create the MLflow run and log the params (the metric log's folder exists by now)."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_validate_start(self, trainer: Trainer, state: State) -> None:
        """Use the run of this Trainer's fit, or create one."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_test_start(self, trainer: Trainer, state: State) -> None:
        """Use the run of this Trainer's fit, or create one."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        """Store the final model's ``state_dict`` as the artifact ``model/model_state_dict.pt``."""
        if not (self._active and self._log_model):
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model_state_dict.pt"
            torch.save(dltrain.unwrap_model(trainer.model).state_dict(), path)
            self._client.log_artifact(self.run_id, str(path), artifact_path="model")

    @dltrain.hookimpl
    def on_exception(self, exception: BaseException) -> None:
        """Mark the run FAILED (KILLED for Ctrl-C)."""
        self._status = "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"

    @dltrain.hookimpl
    def on_teardown(self) -> None:
        """End the MLflow run with its status."""
        if self._active:
            self._active = False
            self._client.set_terminated(self.run_id, status=self._status)

    # -- values ----------------------------------------------------------------------

    @dltrain.hookimpl
    def on_step_metrics(self, state: State, metrics: Mapping[str, float]) -> None:
        """Log the interval's mean training loss (as ``train_loss_step``) and the learning rate."""
        if not self._active:
            return
        values = {"train_loss_step" if k == "train_loss" else k: v for k, v in metrics.items()}
        if values:
            self._log(values, state.global_step)

    @dltrain.hookimpl
    def on_train_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Log the epoch's training metrics."""
        if self._active:
            self._fit_step = state.global_step
            self._log({"epoch": state.epoch + 1, **metrics}, state.global_step)

    @dltrain.hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Log the validation (or standalone evaluation) metrics."""
        if self._active and metrics:
            step = state.global_step if state.run is RunKind.FIT else self._fit_step
            self._log(metrics, step)
