"""Weights & Biases tracking for dltrain, found through the ``dltrain`` entry-point group.

Installed (``pip install dltrain-wandb``), the plugin is loaded into every
Trainer, but it starts a W&B run only when asked, since W&B needs an account
(online) or leaves files to sync (offline). It tracks a fit when:

- ``$WANDB_PROJECT`` or ``$WANDB_MODE`` (``online``, ``offline``) is set, or
- it was constructed with ``project=...``, ``mode=...`` or ``enabled=True``, or
- a run you started with ``wandb.init()`` is active: it logs into that run
  and leaves it open for you to finish.

``$WANDB_MODE=disabled``, ``$WANDB_DISABLED=true`` and ``enabled=False``
turn it off; so do ``disable_plugins=["wandb"]`` and ``autoload_plugins=False``.

What each run records (rank 0 only; nothing from other ranks):

- config: the TrainerConfig (``max_epochs``, ``checkpoint``, ...), ``model``
  and ``optimizer`` (class names), ``lr`` (initial), ``versions`` (python,
  torch, dltrain, and cuda when torch has it), then the constructor's ``config``;
- history, with the global step (optimizer steps) as W&B's step:
  ``train_loss_step`` and ``lr`` every ``log_every_n_steps`` steps (the
  ``on_step_metrics`` hook: the loss summed on the device, read once per
  interval), and each epoch's row as ``fit`` returns it in its history
  (``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``, ...) once the
  epoch is complete (after its validation, if it has one);
- summary: the last values, ``stop_reason``, and the metrics of a later
  ``trainer.test`` / ``validate`` (the run is resumed for them: W&B keeps one
  run, offline two local folders that ``wandb sync`` merges);
- with ``log_model=True``: the final model's ``state_dict`` as the artifact
  ``model-<run id>`` (type ``model``, file ``model_state_dict.pt``).

Where the local files go: the constructor's ``dir``, else ``$WANDB_DIR``, else
the run folder of the built-in metric log (``runs/2026-11-28_13-05-12/wandb``),
else ``<run_dir>/wandb``, else ``./wandb``. The run's name is the constructor's
``run_name``, else the metric log's folder name.

The plugin creates its runs with ``reinit="create_new"`` and logs through its
own run object, never ``wandb.log``, so two Trainers track two runs. wandb is
imported only when a run starts.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import dltrain
from dltrain import RunKind

if TYPE_CHECKING:
    from dltrain import State, Trainer

__all__ = ["WandbPlugin", "versions"]

_TRUE = ("1", "true", "yes", "on")


def versions() -> dict[str, str]:
    """The versions a run records in its config: python, torch, dltrain (and cuda when torch has it)."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "dltrain": dltrain.__version__}
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def _run_config(trainer: Trainer, extra: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = dict(trainer.config.to_json_dict())
    if trainer.model is not None:
        config["model"] = type(dltrain.unwrap_model(trainer.model)).__name__
    optimizer = trainer.optimizer
    if optimizer is not None:
        config["optimizer"] = type(optimizer).__name__
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if isinstance(lr, (int, float)):
            config["lr"] = float(lr)
    config["versions"] = versions()
    config.update(extra)
    return config


class WandbPlugin:
    """Tracks fits as Weights & Biases runs: config, step and epoch metrics, versions, the model.

    Every argument is plain data, so the plugin can also be built from a
    configuration file.

    Args:
        project: The W&B project; None: ``$WANDB_PROJECT``, else ``dltrain``.
            Setting it turns the plugin on.
        entity: The W&B team or user; None: your default entity.
        run_name: The run's display name; None: the metric log's run folder
            name (``2026-11-28_13-05-12``), else one W&B makes up.
        config: More values for the run's config (your hyperparameters, the
            data set); they win over the Trainer's values of the same name.
        tags: Tags of the run.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; None: ``$WANDB_MODE``,
            else W&B's default (online). Setting it turns the plugin on.
        dir: Where W&B keeps the run's local files; None: as described in the module docs.
        log_model: Store the final model's ``state_dict`` as an artifact.
        enabled: True or False decides; None: on when asked (see the module docs).
        init_kwargs: More keyword arguments for ``wandb.init`` (``group``,
            ``job_type``, ``notes``, ``settings``, ...); they win over the above.
        name: The plugin's name (a configured instance next to the installed
            one needs another name, or ``disable_plugins=["wandb"]``).

    Attributes:
        run_id: The W&B run of the current (or last) fit; None before.
        local_dir: The local folder of the current (or last) W&B run (what
            ``wandb sync`` uploads for an offline run); None before.
    """

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        mode: str | None = None,
        dir: str | None = None,
        log_model: bool = False,
        enabled: bool | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        *,
        name: str = "wandb",
    ) -> None:
        self.name = name
        self._project = project
        self._entity = entity
        self._run_name = run_name
        self._config = dict(config or {})
        self._tags = list(tags) if tags is not None else None
        self._mode = mode
        self._dir = dir
        self._log_model = log_model
        self._enabled = enabled
        self._init_kwargs = dict(init_kwargs or {})
        self.run_id: str | None = None
        self.local_dir: Path | None = None
        self._run: Any = None  # the W&B run while this plugin logs to it
        self._own_run = False  # created here (finished here), or the user's (left open)
        self._exit_code = 0

    # -- whether and where --------------------------------------------------------

    def _asked(self) -> bool:
        if self._enabled is not None:
            return self._enabled
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
            return False
        if self._mode is not None:
            return self._mode != "disabled"
        return bool(self._project or env_mode or os.environ.get("WANDB_PROJECT"))

    @staticmethod
    def _user_run() -> Any:
        """The run the user started with ``wandb.init()``, if wandb is loaded and one is active."""
        wandb = sys.modules.get("wandb")
        return getattr(wandb, "run", None) if wandb is not None else None

    def _choose_dir(self, trainer: Trainer) -> str | None:
        # The environment is read here, not left to wandb: wandb reads it once per process.
        setting = self._dir or os.environ.get("WANDB_DIR")
        if setting:
            folder = Path(setting)
        else:
            run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
            if run_path is not None:
                folder = Path(run_path)
            elif trainer.config.run_dir is not None:
                folder = Path(trainer.config.run_dir)
            else:
                return None
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def _init_args(self, trainer: Trainer, state: State) -> dict[str, Any]:
        run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
        args: dict[str, Any] = {
            "project": self._project or os.environ.get("WANDB_PROJECT") or "dltrain",
            "entity": self._entity,
            "name": self._run_name or (Path(run_path).name if run_path is not None else None),
            "tags": self._tags,
            "mode": self._mode or os.environ.get("WANDB_MODE", "").strip().lower() or None,
            "dir": self._choose_dir(trainer),
            "job_type": state.run.value,
            "reinit": "create_new",  # never finish, reuse or replace another run of the process
        }
        if state.run is not RunKind.FIT and self.run_id is not None:
            args.update(id=self.run_id, resume="allow")  # an evaluation after this plugin's fit
        else:
            args["config"] = _run_config(trainer, self._config)
        args.update(self._init_kwargs)
        return args

    # -- runs ------------------------------------------------------------------------

    def _start(self, trainer: Trainer, state: State) -> None:
        self._run, self._own_run, self._exit_code = None, False, 0
        if not state.is_global_zero or self._enabled is False:
            return
        user_run = self._user_run()
        if user_run is not None and not self._asked_explicitly():
            self._run = user_run
            if state.run is RunKind.FIT:
                user_run.config.update(_run_config(trainer, self._config), allow_val_change=True)
        elif self._asked():
            import wandb

            self._run = wandb.init(**self._init_args(trainer, state))
            self._own_run = True
        else:
            return
        if state.run is RunKind.FIT:
            self.run_id = self._run.id
        self.local_dir = Path(self._run.settings.sync_dir) if self._run.settings.sync_dir else None

    def _asked_explicitly(self) -> bool:
        """A run of its own was asked for in the constructor (then the user's run is left alone)."""
        return self._enabled is True or self._project is not None or self._mode is not None

    @dltrain.hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Start the W&B run and record the config (the metric log's folder exists by now)."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_validate_start(self, trainer: Trainer, state: State) -> None:
        """Resume the run of this plugin's fit, or start one."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_test_start(self, trainer: Trainer, state: State) -> None:
        """Resume the run of this plugin's fit, or start one."""
        self._start(trainer, state)

    @dltrain.hookimpl
    def on_fit_end(self, trainer: Trainer, state: State) -> None:
        """Record why the fit stopped; store the final model as an artifact when asked."""
        run = self._run
        if run is None:
            return
        run.summary["stop_reason"] = state.stop_reason
        if not self._log_model:
            return
        import wandb

        artifact = wandb.Artifact(
            f"model-{run.id}", type="model", metadata={"global_step": state.global_step, "epoch": state.epoch}
        )
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model_state_dict.pt"
            torch.save(dltrain.unwrap_model(trainer.model).state_dict(), path)
            artifact.add_file(str(path))  # copied into W&B's staging area here
        run.log_artifact(artifact)

    @dltrain.hookimpl
    def on_exception(self, exception: BaseException) -> None:
        """Mark the run failed (exit code 130 for Ctrl-C, else 1)."""
        self._exit_code = 130 if isinstance(exception, KeyboardInterrupt) else 1

    @dltrain.hookimpl
    def on_teardown(self) -> None:
        """Finish a run this plugin started (a run of yours stays open)."""
        run, self._run = self._run, None
        if run is not None and self._own_run:
            run.finish(exit_code=self._exit_code)

    # -- values ----------------------------------------------------------------------

    @dltrain.hookimpl
    def on_step_metrics(self, state: State, metrics: Mapping[str, float]) -> None:
        """Log the interval's mean training loss (as ``train_loss_step``) and the learning rate."""
        if self._run is not None and metrics:
            values = {"train_loss_step" if k == "train_loss" else k: v for k, v in metrics.items()}
            self._run.log(values, step=state.global_step)

    @dltrain.hookimpl
    def on_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """Log the finished epoch's row: its training and validation metrics."""
        if self._run is not None:
            self._run.log({"epoch": state.epoch + 1, **metrics}, step=state.global_step)

    @dltrain.hookimpl
    def on_eval_epoch_end(self, state: State, metrics: Mapping[str, float]) -> None:
        """A standalone validate or test: its metrics, in the summary (a fit's are in its epoch rows)."""
        if self._run is not None and state.run is not RunKind.FIT and metrics:
            self._run.summary.update(dict(metrics))
