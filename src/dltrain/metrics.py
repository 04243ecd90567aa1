"""Custom metrics with their options: ``Trainer(metrics={"name": ...})``.

A metric given as a plain function ``(outputs, targets) -> tensor`` is the
batch's mean, and its epoch value the batch-size-weighted mean of those:
right for per-sample averages (accuracy, mean absolute error), wrong for a
ratio or any non-linear function of a mean. Perplexity is ``exp`` of the mean
loss, not the mean of each batch's ``exp``; compute such a metric from the
epoch's exact values with :class:`EpochMetric`::

    Trainer(metrics={"perplexity": EpochMetric(lambda m: math.exp(m["loss"]), phases=("validate", "test"))})

which reports ``val_perplexity`` and ``test_perplexity``. :class:`Metric`
wraps a batch function or a stateful (torchmetrics-style) metric to choose the
phases it runs in: a metric limited to evaluation costs nothing per training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dltrain.errors import ConfigError
from dltrain.state import Phase

__all__ = ["ALL_PHASES", "EpochMetric", "Metric", "phases_of"]

#: The phases that report metrics: training epochs, validation, test.
ALL_PHASES: tuple[str, ...] = ("train", "validate", "test")


def phases_of(phases: Any, where: str) -> frozenset[Phase]:
    """The :class:`~dltrain.Phase` values named by ``phases`` (strings or Phase members).

    Raises:
        ConfigError: a name that is not a phase with metrics, naming the valid ones.
    """
    if isinstance(phases, (str, Phase)):
        phases = (phases,)
    found: set[Phase] = set()
    for phase in phases:
        value = phase.value if isinstance(phase, Phase) else phase
        if value not in ALL_PHASES:
            raise ConfigError(f"{where}: phase {phase!r} is not one of {list(ALL_PHASES)}")
        found.add(Phase(value))
    if not found:
        raise ConfigError(f"{where}: no phases given; name some of {list(ALL_PHASES)}")
    return frozenset(found)


@dataclass(frozen=True)
class Metric:
    """A per-batch metric, and the phases it runs in.

    Args:
        fn: ``(outputs, targets) -> scalar tensor`` (the batch's mean; the epoch
            value is the batch-size-weighted mean), or an object with
            torchmetrics' ``update``/``compute``/``reset``.
        phases: Where it runs: some of ``"train"``, ``"validate"``, ``"test"``.
    """

    fn: Any
    phases: tuple[str, ...] = ALL_PHASES


@dataclass(frozen=True)
class EpochMetric:
    """A metric computed once per epoch from that epoch's other metrics (exact, as reported).

    Args:
        fn: ``(metrics) -> float``, where ``metrics`` holds the phase's metrics
            without their prefix (``{"loss": 4.2, "accuracy": 0.9}`` for the
            validation's ``val_loss`` and ``val_accuracy``).
        phases: Where it is reported: some of ``"train"``, ``"validate"``, ``"test"``.
    """

    fn: Callable[[Mapping[str, float]], float]
    phases: tuple[str, ...] = ALL_PHASES

    def compute(self, name: str, prefix: str, metrics: Mapping[str, float]) -> float:
        """The metric's value from the phase's metrics (``prefix``: ``"val"``, ...).

        Raises:
            ConfigError: ``fn`` asked for a metric the phase does not have (naming those it has).
        """
        own = {k[len(prefix) + 1 :]: v for k, v in metrics.items() if k.startswith(prefix + "_")}
        try:
            return float(self.fn(own))
        except KeyError as exc:
            raise ConfigError(
                f"epoch metric {name!r} reads {exc}, but this {prefix} phase's metrics are {sorted(own)}; "
                f"read one of those (without the '{prefix}_' prefix), or limit its phases"
            ) from exc
