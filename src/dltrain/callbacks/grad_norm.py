"""``GradientNormMonitor``: the gradient norm at every logged step, computed on the device."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from dltrain._loop import unwrap_model
from dltrain._markers import hookimpl
from dltrain.errors import ConfigError

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor:
    """Reports the norm of the gradients at the steps whose metrics are logged.

    The norm is the one the optimizer steps on: measured in
    ``on_before_optimizer_step``, after the gradients are unscaled (mixed
    precision) and clipped (``gradient_clip_val``). With clipping by norm, a
    clipped step reports the clip value (or less); the norm before clipping
    is not visible to plugins.

    It is computed only at the steps whose metrics are logged (every
    ``log_every_n_steps`` optimizer steps), with one fused multi-tensor
    operation (``torch._foreach_norm``), and kept on the device until the
    Trainer reads all step metrics with its one sync: no host sync per step,
    and nothing at the other steps.

    Metrics (in the step metrics: the metric log's ``"step"`` rows, MLflow):

    | metric | what it is |
    | --- | --- |
    | ``grad_norm`` | the norm over all gradients (``grad_norm-<optimizer>`` over each optimizer's, with several) |
    | ``grad_norm_layer/<module>`` | with ``per_layer``: over each top-level module's gradients (``grad_norm_layer/encoder``; a parameter of the model itself is its own) |
    | ``grad_norm_param/<parameter>`` | with ``per_parameter``: each parameter's (``grad_norm_param/encoder.0.weight``) |

    No name is another's followed by ``/``, so stores that keep a metric per
    file (MLflow's file store) take them all.

    Args:
        norm_type: The p of the p-norm: 2.0 (Euclidean), 1.0, or ``inf`` (the largest absolute value).
        per_layer: Also report each top-level module's norm.
        per_parameter: Also report each parameter's norm.
    """

    name = "grad_norm"

    def __init__(self, norm_type: float = 2.0, per_layer: bool = False, per_parameter: bool = False) -> None:
        norm = float(norm_type) if isinstance(norm_type, (int, float, str)) else math.nan
        if isinstance(norm_type, bool) or not (norm > 0):
            raise ConfigError(
                f"GradientNormMonitor: norm_type must be a positive number or inf, got {norm_type!r}"
            )
        self.norm_type, self.per_layer, self.per_parameter = norm, per_layer, per_parameter
        self._pending: dict[str, torch.Tensor] = {}
        self._layers: dict[str, list[torch.Tensor]] = {}  # a module's norms, from each optimizer
        self._names: dict[int, tuple[str, str]] = {}  # id(parameter) -> (its name, its top-level module)

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Name the parameters once (for the per-module and per-parameter norms)."""
        self._pending, self._layers = {}, {}
        self._names = {}
        for name, parameter in unwrap_model(trainer.model).named_parameters():
            # A top-level module's parameters share its name; a top-level parameter is its own.
            self._names[id(parameter)] = (name, name.split(".", 1)[0])

    @hookimpl
    def on_before_optimizer_step(
        self, trainer: Trainer, state: State, optimizer: torch.optim.Optimizer, optimizer_name: str
    ) -> None:
        """At a step whose metrics will be logged: the norms of this optimizer's gradients, on the device."""
        if (state.global_step + 1) % trainer.config.log_every_n_steps:
            return
        grads: list[torch.Tensor] = []
        owners: list[tuple[str, str]] = []
        for g, group in enumerate(optimizer.param_groups):
            for j, parameter in enumerate(group["params"]):
                if parameter.grad is not None:
                    grads.append(parameter.grad)
                    unnamed = f"group{g}.param{j}"  # a parameter outside the model
                    owners.append(self._names.get(id(parameter), (unnamed, unnamed)))
        if not grads:
            return
        base = "grad_norm" if len(trainer.optimizers) == 1 else f"grad_norm-{optimizer_name}"
        with torch.no_grad():
            norms = [n.float() for n in torch._foreach_norm(grads, self.norm_type)]
            self._pending[base] = self._combine(norms)
            if self.per_layer:  # combined when read: a module's parameters may have several optimizers
                for (_, top), norm in zip(owners, norms, strict=True):
                    self._layers.setdefault(top, []).append(norm)
            if self.per_parameter:
                for (name, _), norm in zip(owners, norms, strict=True):
                    self._pending[f"grad_norm_param/{name}"] = norm

    def _combine(self, norms: list[torch.Tensor]) -> torch.Tensor:
        """The p-norm of all the tensors whose p-norms are ``norms``: the norm of the norms."""
        stacked = torch.stack([n.to(norms[0].device) for n in norms])
        total: torch.Tensor = torch.linalg.vector_norm(stacked, self.norm_type)
        return total

    @hookimpl
    def compute_step_metrics(self) -> dict[str, Any]:
        """The norms measured in this interval (tensors: read with the Trainer's one sync)."""
        pending, self._pending = self._pending, {}
        with torch.no_grad():
            for top, parts in self._layers.items():
                pending[f"grad_norm_layer/{top}"] = self._combine(parts)
        self._layers = {}
        return pending
