"""``LearningRateMonitor``: every parameter group's learning rate, into the step and epoch metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dltrain._markers import hookimpl
from dltrain.state import Phase

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["LearningRateMonitor"]


class LearningRateMonitor:
    """Reports the learning rate of every parameter group of every optimizer.

    The names say which optimizer (its name in ``fit(optimizer={...})``,
    ``default`` for a single one) and which parameter group (its index):

    | metric | what it is |
    | --- | --- |
    | ``lr-<optimizer>/group<i>`` | the group's learning rate |
    | ``momentum-<optimizer>/group<i>`` | its ``momentum``, where the group has one that is not 0 (SGD, RMSprop) |
    | ``beta1-<optimizer>/group<i>``, ``beta2-...`` | its ``betas``, where it has them (Adam, AdamW) |

    They go into the step metrics, every ``log_every_n_steps`` optimizer steps
    (``compute_step_metrics``: the metric log's ``"step"`` rows, MLflow), as
    the values for the next step (after the step's scheduler moved them), and
    into each epoch's training metrics with the ``train_`` prefix
    (``train_lr-default/group0``: ``trainer.history``, the epoch rows,
    TensorBoard), as they are at the end of the epoch's training. They never
    collide with the Trainer's own step metric ``lr`` (``lr_<optimizer>`` with
    several optimizers), the first group's learning rate.

    The values are read from the optimizers' ``param_groups`` (Python
    numbers), so monitoring costs no device sync; a learning rate held in a
    tensor is read with the other step metrics, in their one sync.

    Args:
        momentum: Also report ``momentum`` and ``betas`` where the groups have them.
    """

    name = "lr_monitor"

    def __init__(self, momentum: bool = True) -> None:
        self.momentum = momentum

    def values(self, trainer: Trainer) -> dict[str, Any]:
        """The current values of every group of every optimizer of ``trainer``, by metric name."""
        values: dict[str, Any] = {}
        for name, optimizer in trainer.optimizers.items():
            for i, group in enumerate(optimizer.param_groups):
                where = f"{name}/group{i}"
                _put(values, f"lr-{where}", group.get("lr"))
                if not self.momentum:
                    continue
                if group.get("momentum"):  # SGD without momentum has momentum=0: nothing to watch
                    _put(values, f"momentum-{where}", group["momentum"])
                betas = group.get("betas")
                if isinstance(betas, (tuple, list)) and len(betas) == 2:
                    _put(values, f"beta1-{where}", betas[0])
                    _put(values, f"beta2-{where}", betas[1])
        return values

    @hookimpl
    def compute_step_metrics(self, trainer: Trainer) -> dict[str, Any]:
        """The values after the interval's last optimizer step."""
        return self.values(trainer)

    @hookimpl
    def compute_metrics(self, trainer: Trainer, state: State) -> dict[str, Any] | None:
        """At the end of each training epoch: the values then (named ``train_lr-...``)."""
        if state.phase is not Phase.TRAIN:
            return None
        return self.values(trainer)


def _put(values: dict[str, Any], key: str, value: Any) -> None:
    """Add a number or a one-element tensor; leave out anything else (a missing or odd entry)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            values[key] = value.detach()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values[key] = float(value)
