"""The optimizers and LR schedulers of a fit, by name: checked, saved, restored and compared.

``fit(optimizer=...)`` takes one optimizer (named ``"default"``), a mapping of
names to optimizers (``{"generator": opt_g, "discriminator": opt_d}``), or,
with manual optimization, None. ``scheduler=`` takes one scheduler (for the
one optimizer) or a mapping of optimizer names to schedulers; each scheduler
may also be given as ``{"scheduler": s, "interval": "step", "monitor": "val_loss"}``
to choose when it steps, else ``TrainerConfig.scheduler_interval`` and
``scheduler_monitor`` apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dltrain.errors import ConfigError, StepError

__all__ = ["DEFAULT_NAME", "OptimizerSet", "ScheduleSpec", "compare_optimizers"]

#: The name of the optimizer when ``fit`` is given one optimizer, not a mapping.
DEFAULT_NAME = "default"

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_INTERVALS = ("epoch", "step")
_SPEC_KEYS = frozenset({"scheduler", "interval", "monitor"})


@dataclass(frozen=True)
class ScheduleSpec:
    """One LR scheduler and when it steps.

    Attributes:
        scheduler: The scheduler (``torch.optim.lr_scheduler.*`` or any object
            with ``step()``, ``state_dict()`` and ``load_state_dict()``).
        interval: ``"epoch"`` (after each epoch, validation included) or
            ``"step"`` (after each step of its optimizer).
        monitor: The metric passed to a ReduceLROnPlateau-style ``step(metric)``.
    """

    scheduler: Any
    interval: str
    monitor: str

    @property
    def plateau(self) -> bool:
        """Whether ``step`` takes the monitored metric (ReduceLROnPlateau)."""
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StepError(
            f"{what} name {name!r} is not a valid name: use letters, digits, '_', '.' or '-', starting "
            f"with a letter or '_' (e.g. 'generator'); names appear in checkpoints and metric names"
        )
    return name


def _check_optimizer(name: str, optimizer: Any, model: torch.nn.Module, label: str) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        hint = (
            " (a class: did you mean SGD(model.parameters(), lr=...)?)" if isinstance(optimizer, type) else ""
        )
        raise StepError(
            f"{label.removeprefix('the ')} must be a torch.optim.Optimizer, got {type(optimizer).__name__}{hint}; "
            f"for several optimizers pass a dict of names to optimizers, e.g. "
            f"optimizer={{'generator': opt_g, 'discriminator': opt_d}}"
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = [
        tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params
    ]
    if foreign:
        raise StepError(
            f"{label} holds {len(foreign)} parameter(s) that are not the model's "
            f"(shapes {foreign[:3]}{'...' if len(foreign) > 3 else ''}); create it from this model: "
            f"optimizer = SGD(model.parameters(), ...)"
        )
    return optimizer


def _schedule(value: Any, label: str, interval: str, monitor: str) -> ScheduleSpec:
    if isinstance(value, Mapping):
        unknown = set(value) - _SPEC_KEYS
        if unknown or "scheduler" not in value:
            raise StepError(
                f"{label} is a mapping with keys {sorted(map(str, value))}; a scheduler given as a mapping has "
                f"'scheduler' and optionally 'interval' ('epoch' or 'step') and 'monitor' (a metric name)"
            )
        interval = value.get("interval", interval)
        monitor = value.get("monitor", monitor)
        value = value["scheduler"]
        if interval not in _INTERVALS:
            raise StepError(f"{label}: interval {interval!r} is not 'epoch' or 'step'")
        if not isinstance(monitor, str):
            raise StepError(f"{label}: monitor {monitor!r} is not a metric name")
    if not callable(getattr(value, "step", None)):
        raise StepError(f"{label} has no step() method: pass a torch.optim.lr_scheduler scheduler")
    return ScheduleSpec(value, interval, monitor)


class OptimizerSet(Mapping[str, torch.optim.Optimizer]):
    """The optimizers of one fit by name, with the scheduler of each (if any).

    A mapping of names to optimizers, in the order given.

    Args:
        optimizer: What ``fit`` was given as ``optimizer``.
        scheduler: What ``fit`` was given as ``scheduler``.
        model: The model; every optimizer's parameters must be its own.
        interval: The default scheduler interval (``TrainerConfig.scheduler_interval``).
        monitor: The default monitored metric (``TrainerConfig.scheduler_monitor``).

    Raises:
        StepError: naming the bad optimizer or scheduler and the fix.
    """

    def __init__(
        self, optimizer: Any, scheduler: Any, model: torch.nn.Module, *, interval: str, monitor: str
    ) -> None:
        if optimizer is None:
            given: dict[str, Any] = {}
        elif isinstance(optimizer, Mapping):
            if not optimizer:
                raise StepError("optimizer is an empty dict; pass at least one optimizer, or None")
            given = {_check_name(k, "optimizer"): v for k, v in optimizer.items()}
        else:
            given = {DEFAULT_NAME: optimizer}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        for name, opt in given.items():
            label = "the optimizer" if name == DEFAULT_NAME else f"optimizer {name!r}"
            self._optimizers[name] = _check_optimizer(name, opt, model, label)
        self._check_disjoint()
        self.schedules: dict[str, ScheduleSpec] = self._schedules(scheduler, interval, monitor)

    def _check_disjoint(self) -> None:
        owner: dict[int, str] = {}
        for name, opt in self._optimizers.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    other = owner.setdefault(id(p), name)
                    if other != name:
                        raise StepError(
                            f"optimizers {other!r} and {name!r} both hold a parameter of shape "
                            f"{tuple(p.shape)}; give each optimizer its own parameters (e.g. "
                            f"model.generator.parameters() and model.discriminator.parameters())"
                        )

    def _schedules(self, scheduler: Any, interval: str, monitor: str) -> dict[str, ScheduleSpec]:
        if scheduler is None:
            return {}
        names = list(self._optimizers)
        if isinstance(scheduler, Mapping) and not (set(scheduler) <= _SPEC_KEYS and "scheduler" in scheduler):
            given = dict(scheduler)
        elif len(names) == 1:
            given = {names[0]: scheduler}
        else:
            raise StepError(
                f"there are {len(names)} optimizers {names}, so scheduler must be a dict of optimizer names "
                f"to schedulers, e.g. scheduler={{{names[0]!r}: StepLR(...)}}"
            )
        specs: dict[str, ScheduleSpec] = {}
        for name, value in given.items():
            if name not in self._optimizers:
                raise StepError(
                    f"scheduler for {name!r}, but there is no optimizer of that name; the optimizers are {names}"
                )
            label = "scheduler" if name == DEFAULT_NAME else f"scheduler {name!r}"
            spec = _schedule(value, label, interval, monitor)
            owner = getattr(spec.scheduler, "optimizer", None)
            if owner is not None and owner is not self._optimizers[name]:
                raise StepError(
                    f"{label} was made for another optimizer than {name!r}; make it from that one"
                )
            specs[name] = spec
        return specs

    # -- the mapping -----------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.optim.Optimizer:
        try:
            return self._optimizers[name]
        except KeyError:
            raise StepError(
                f"no optimizer named {name!r}; this fit's optimizers are {list(self._optimizers)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._optimizers)

    def __len__(self) -> int:
        return len(self._optimizers)

    def scheduler(self, name: str) -> Any:
        """The scheduler of optimizer ``name``, or None."""
        spec = self.schedules.get(name)
        return None if spec is None else spec.scheduler

    # -- checkpoints ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Each optimizer's and scheduler's state, by name, plus what a resume compares."""
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers.items()},
            "schedulers": {name: spec.scheduler.state_dict() for name, spec in self.schedules.items()},
            "structure": self.structure(),
        }

    def structure(self) -> dict[str, Any]:
        """Names, classes and parameter groups of the optimizers, and classes of the schedulers."""
        return {
            "optimizers": {
                name: {"class": type(opt).__qualname__, **_groups(opt.state_dict())}
                for name, opt in self._optimizers.items()
            },
            "schedulers": {name: type(spec.scheduler).__qualname__ for name, spec in self.schedules.items()},
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (check it with :func:`compare_optimizers` first)."""
        for name, state in saved.get("optimizers", {}).items():
            if state is not None and name in self._optimizers:
                self._optimizers[name].load_state_dict(state)
        for name, state in saved.get("schedulers", {}).items():
            if state is not None and name in self.schedules:
                self.schedules[name].scheduler.load_state_dict(state)


def _groups(state: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter groups of an optimizer state dict: their sizes and hyperparameter names."""
    groups = state.get("param_groups") or []
    return {
        "groups": [len(g.get("params", ())) for g in groups],
        "options": sorted({str(k) for g in groups for k in g if k != "params"}),
    }


def structure_of_states(optimizers: Mapping[str, Any], schedulers: Mapping[str, Any]) -> dict[str, Any]:
    """The structure of optimizers known only by their saved states (a checkpoint that did not record
    it): parameter groups and hyperparameter names; classes unknown (None)."""
    return {
        "optimizers": {name: {"class": None, **_groups(sd or {})} for name, sd in optimizers.items()},
        "schedulers": {name: None for name in schedulers},
    }


def compare_optimizers(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """How the optimizers and schedulers of a checkpoint differ from those of the run about to resume.

    Args:
        saved: The ``structure`` a checkpoint recorded (None: not recorded, nothing compared).
        current: ``OptimizerSet.structure()`` of the current run.

    Returns:
        One line per difference: names, classes, parameter groups and their sizes, schedulers.
    """
    if saved is None:
        return []
    diffs: list[str] = []
    before, now = saved.get("optimizers", {}), current.get("optimizers", {})
    if list(before) != list(now):
        diffs.append(f"optimizers: {list(before)} in the checkpoint, {list(now)} now")
    for name in [n for n in before if n in now]:
        b, n = before[name], now[name]
        if b["class"] is not None and b["class"] != n["class"]:
            diffs.append(f"optimizer {name!r}: {b['class']} in the checkpoint, {n['class']} now")
        elif b["class"] is None and b.get("options") and b["options"] != n.get("options"):
            diffs.append(
                f"optimizer {name!r}: its saved state has the hyperparameters {b['options']}, this run's "
                f"{type_hint(n)} has {n.get('options')} (another optimizer class?)"
            )
        elif b["groups"] != n["groups"]:
            diffs.append(
                f"optimizer {name!r}: parameter groups of {b['groups']} parameters in the checkpoint, "
                f"{n['groups']} now"
            )
    before_s, now_s = saved.get("schedulers", {}), current.get("schedulers", {})
    for name in sorted(set(before_s) | set(now_s)):
        b_cls, n_cls = before_s.get(name), now_s.get(name)
        if b_cls is None and name in before_s and n_cls is not None:
            continue  # a scheduler whose class was not recorded
        if b_cls != n_cls:
            diffs.append(f"scheduler of {name!r}: {b_cls or 'none'} in the checkpoint, {n_cls or 'none'} now")
    return diffs


def type_hint(structure: Mapping[str, Any]) -> str:
    return str(structure.get("class") or "optimizer")


def check_resumable(diffs: list[str], path: str, also: Sequence[str] = ()) -> None:
    """Raise one ConfigError listing every optimizer difference (loading would fail or be wrong),
    with the run's other differences (``also``) in the same list."""
    if diffs:
        raise ConfigError(
            f"cannot resume from {path!r}: its optimizers differ from this run's, so their state cannot "
            f"be loaded:\n  - "
            + "\n  - ".join([*diffs, *also])
            + "\nPass the same optimizers (names, classes and parameter groups) and schedulers as the "
            "run that saved it, or start a new run without resume"
        )
