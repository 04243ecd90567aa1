"""Optuna pruning for dltrain: report the validation metric to a trial, stop the runs it prunes.

Register :class:`OptunaPruning` yourself, with the trial your objective
received; it has no entry point, since a plugin without a trial has nothing to
report to::

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        pruning = OptunaPruning(trial, monitor="val_loss")
        trainer = dltrain.Trainer(max_epochs=10, plugins=[pruning])
        history = trainer.fit(model, train, optimizer=..., loss_fn=..., val_data=val)
        pruning.check_pruned()  # raises optuna.TrialPruned when the trial was pruned
        return history["val_loss"][-1]

After each validation inside ``fit`` the plugin reports the monitored metric to
the trial, with the epoch number as the step (1 for the first epoch, as in the
history and the progress line), and asks ``trial.should_prune()``. When the
answer is yes, it requests a stop (``trainer.request_stop``): the fit ends at
that epoch's end as any stopped fit does (``on_fit_end``, a final checkpoint,
closed loggers) and returns its history. :meth:`OptunaPruning.check_pruned`
then raises ``optuna.TrialPruned``, so Optuna records the trial as PRUNED.
(Raising ``TrialPruned`` from inside a hook would not work: the Trainer wraps
an exception from a plugin's hook in a :class:`dltrain.PluginError`, and the
trial would end as FAILED.)

Under ``torchrun`` only rank 0 talks to the study: pass the trial on rank 0
and None on the other ranks, and register the plugin on every rank. After
each validation rank 0 broadcasts its decision, so every rank requests the
stop at the same epoch and every rank's ``check_pruned`` raises.

optuna is imported only by :meth:`~OptunaPruning.check_pruned`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dltrain
from dltrain import ConfigError, RunKind

if TYPE_CHECKING:
    from dltrain import State, Trainer

__all__ = ["OptunaPruning"]


def _broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` in every process (one small collective on the default group)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class OptunaPruning:
    """Reports a validation metric to an Optuna trial after each epoch; stops the fit when it is pruned.

    Args:
        trial: The ``optuna.trial.Trial`` the objective received. Under
            ``torchrun``: the trial on rank 0, None on the other ranks. Not a
            ``TorchDistributedTrial`` (its methods are collectives that every
            rank must call; pass the trial it wraps, as above).
        monitor: The metric to report, a name of the validation metrics
            (``val_loss``, ``val_accuracy``, or one of your ``metrics``). The
            study's direction says whether lower or higher is better.
        name: The plugin's name.

    Attributes:
        pruned_epoch: The epoch (1-based) after which the trial was pruned;
            None while it was not. Known on every rank.
        pruned_value: The value of the monitored metric that got it pruned.
        reported: The values reported to the trial in the last fit, by epoch
            (rank 0; empty elsewhere).

    Raises:
        ConfigError: ``monitor`` is not a non-empty string, or ``trial`` is a
            ``TorchDistributedTrial``.
    """

    def __init__(self, trial: Any = None, monitor: str = "val_loss", *, name: str = "optuna") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"OptunaPruning(monitor={monitor!r}): pass a metric name, e.g. 'val_loss'")
        if any(cls.__name__ == "TorchDistributedTrial" for cls in type(trial).__mro__):
            raise ConfigError(
                "OptunaPruning got a TorchDistributedTrial, whose methods every rank must call together; "
                "pass the trial it wraps on rank 0 and None on the other ranks: the plugin reports on "
                "rank 0 and shares the decision with the other ranks itself"
            )
        self.trial = trial
        self.monitor = monitor
        self.name = name
        self.pruned_epoch: int | None = None
        self.pruned_value: float | None = None
        self.reported: dict[int, float] = {}

    @property
    def pruned(self) -> bool:
        """True when the trial was pruned during the last fit."""
        return self.pruned_epoch is not None

    @dltrain.hookimpl
    def on_fit_start(self, state: State) -> None:
        """Forget an earlier fit's result; check that rank 0 has a trial."""
        self.pruned_epoch, self.pruned_value, self.reported = None, None, {}
        if state.is_global_zero and self.trial is None:
            raise ConfigError(
                "OptunaPruning has no trial: pass the trial your objective received, "
                "OptunaPruning(trial, monitor=...) (under torchrun: the trial on rank 0, None elsewhere)"
            )

    @dltrain.hookimpl
    def on_eval_epoch_end(self, trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
        """Inside fit: report the monitored metric, and request a stop when the trial should be pruned."""
        if state.run is not RunKind.FIT:
            return  # a standalone validate or test is not part of the trial's learning curve
        if self.monitor not in metrics:
            # The same metrics on every rank, so every rank raises: none waits in the broadcast below.
            raise ConfigError(
                f"OptunaPruning(monitor={self.monitor!r}): no such validation metric; this validation "
                f"computed {sorted(metrics)}; pass one of them"
            )
        value = float(metrics[self.monitor])
        epoch = state.epoch + 1
        prune = False
        if state.is_global_zero:
            self.trial.report(value, step=epoch)
            self.reported[epoch] = value
            prune = bool(self.trial.should_prune())
        if state.world_size > 1:
            prune = bool(_broadcast_from_rank0(prune))
        if prune:
            self.pruned_epoch, self.pruned_value = epoch, value
            trainer.request_stop(f"optuna pruned the trial after epoch {epoch} ({self.monitor}={value:.6g})")

    @dltrain.hookimpl
    def on_fit_end(self, state: State) -> None:
        """Warn when the fit ran no validation: the trial got nothing to prune on."""
        if state.is_global_zero and not self.reported:
            warnings.warn(
                f"OptunaPruning: the fit ran no validation, so nothing was reported to the trial "
                f"and it cannot be pruned; pass val_data=... to fit (monitor={self.monitor!r})",
                stacklevel=2,
            )

    def check_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` when the last fit was pruned; call it right after ``fit`` returns.

        Raising it from the objective ends the trial as PRUNED. On every rank
        under ``torchrun``, so all ranks leave the objective the same way.
        """
        if self.pruned_epoch is None:
            return
        import optuna

        raise optuna.TrialPruned(
            f"pruned after epoch {self.pruned_epoch} ({self.monitor}={self.pruned_value:.6g})"
        )
