"""The resume self-test: does *your* program resume bit for bit?

:func:`verify_resume` trains a program ``steps`` optimizer steps straight
through; then ``interrupt_at`` steps, a checkpoint, and a resume in a fresh
Trainer (optionally in a fresh process) for the remaining steps; and compares
everything the two runs end with: the model, every optimizer and scheduler,
the precision scaler, every plugin's checkpointed state, the random states,
the loop's position and the history, plus the data each step trained on and
the attributes of your plugins. The first difference is named, e.g.
``optimizer 'generator' state 'exp_avg' of parameter 3 differs by 2e-07``:
a plugin that keeps state without ``state_dict``, a data loader whose order
is not reproducible, a non-deterministic kernel. Run it on your program
before a long job; ``dltrain verify-resume --config run.yaml`` does the same
for a run file.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dltrain._markers import hookimpl
from dltrain.errors import DltrainError

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["ResumeReport", "verify_resume"]

#: Payload entries that name files or versions, not what the run computed.
_NOT_COMPARED = frozenset({"config", "versions", "format", "world_size"})


@dataclass
class ResumeReport:
    """What :func:`verify_resume` found.

    Attributes:
        steps: Optimizer steps of each run.
        interrupt_at: The step after which the interrupted run was checkpointed and resumed.
        differences: Every difference found, most telling first (empty when the resume is exact).
        compared: How many tensors and values were compared.
    """

    steps: int
    interrupt_at: int
    differences: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def ok(self) -> bool:
        """True when the resumed run ended exactly as the straight one."""
        return not self.differences

    def __str__(self) -> str:
        head = f"resume at step {self.interrupt_at} of {self.steps}"
        if self.ok:
            return f"{head}: exact ({self.compared} tensors and values compared)"
        shown = "\n  - ".join(self.differences[:10])
        more = f"\n  ... and {len(self.differences) - 10} more" if len(self.differences) > 10 else ""
        return f"{head}: {len(self.differences)} difference(s), first:\n  - {shown}{more}"

    def raise_for_differences(self) -> None:
        """Raise a :class:`~dltrain.DltrainError` listing the differences, if any."""
        if not self.ok:
            raise DltrainError(str(self))


class _Capture:
    """Records what a run trained on, step by step, and everything it ended with."""

    name = "verify_resume_capture"

    def __init__(self, watched: Mapping[str, object]) -> None:
        self.watched = watched  # the user's plugins, whose attributes are compared
        self.batches: dict[tuple[int, int], float] = {}  # (global step, micro-batch) -> fingerprint
        self.final: dict[str, Any] = {}
        self.attributes: dict[str, dict[str, Any]] = {}

    @hookimpl
    def on_train_batch_start(self, state: State, batch: Any) -> None:
        self.batches[(state.global_step, state.micro_step)] = _fingerprint(batch)

    @hookimpl(trylast=True)
    def on_fit_end(self, trainer: Trainer) -> None:
        self.final = _detached(trainer.state_dict())
        self.attributes = {name: _plain_attributes(p) for name, p in self.watched.items()}


def _fingerprint(batch: Any) -> float:
    """A number that changes when the batch's data does (float64 sums of its tensors, weighted)."""
    total, weight = 0.0, 1.0
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += weight * float(item.detach().to(torch.float64).sum())
            weight += 0.618
        elif isinstance(item, Mapping):
            stack.extend(item[k] for k in sorted(item, key=str))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (
            type(value)(_detached(v) for v in value)
            if isinstance(value, list)
            else tuple(_detached(v) for v in value)
        )
    return copy.deepcopy(value)


def _plain_attributes(plugin: object) -> dict[str, Any]:
    """A plugin's instance attributes that are plain data or tensors (what could be its state);
    other objects (modules, functions, files) are not compared."""
    return {
        name: _detached(value)
        for name, value in (vars(plugin).items() if hasattr(plugin, "__dict__") else ())
        if not name.startswith("__") and _is_plain(value)
    }


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.Tensor)):
        return True
    if depth > 4:
        return False
    if isinstance(value, Mapping):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v, depth + 1) for v in value)
    return False


# -- running the program --------------------------------------------------------------------------


@dataclass
class _Program:
    """Everything a run needs, made fresh for each run."""

    config: dict[str, Any]
    plugins: list[object]
    model_factory: Callable[[], torch.nn.Module]
    train_data: Any
    optimizer_factory: Callable[[torch.nn.Module], Any] | None
    scheduler_factory: Callable[[Any], Any] | None
    loss_fn: Any
    val_data: Any
    seed: int
    data_start: dict[str, Any] = field(default_factory=dict)

    def remember_data(self) -> None:
        """Keep where the data's own random generators and position are now: every run starts there."""
        from dltrain._epoch_data import data_generators

        state = getattr(self.train_data, "state_dict", None)
        self.data_start = {
            "generators": [g.get_state() for g in data_generators(self.train_data)],
            "state": copy.deepcopy(state()) if callable(state) else None,
        }

    def _rewind_data(self) -> None:
        from dltrain._epoch_data import data_generators

        for gen, saved in zip(
            data_generators(self.train_data), self.data_start.get("generators", []), strict=False
        ):
            gen.set_state(saved)
        load = getattr(self.train_data, "load_state_dict", None)
        if self.data_start.get("state") is not None and callable(load):
            load(copy.deepcopy(self.data_start["state"]))

    def run(
        self, max_steps: int, *, checkpoint_dir: str | None = None, resume: str | None = None
    ) -> _Capture:
        from dltrain.trainer import Trainer

        plugins = copy.deepcopy(self.plugins)  # each run starts from the plugins' initial state
        watched = {_plugin_key(p, i): p for i, p in enumerate(plugins)}
        capture = _Capture(watched)
        checkpoint = (
            {"dir": checkpoint_dir, "every_n_steps": None, "every_n_epochs": None, "keep_last": 1}
            if checkpoint_dir
            else None
        )
        config = {**self.config, "max_steps": max_steps, "max_epochs": None, "checkpoint": checkpoint}
        trainer = Trainer(config, plugins=[*plugins, capture])
        self._rewind_data()  # the data object is shared by the runs: each starts from the same state
        torch.manual_seed(self.seed)
        model = self.model_factory()
        optimizer = self.optimizer_factory(model) if self.optimizer_factory is not None else None
        scheduler = self.scheduler_factory(optimizer) if self.scheduler_factory is not None else None
        trainer.fit(
            model, self.train_data, optimizer=optimizer, scheduler=scheduler, loss_fn=self.loss_fn,
            val_data=self.val_data, resume=resume,
        )  # fmt: skip
        return capture


def _plugin_key(plugin: object, index: int) -> str:
    name = getattr(plugin, "name", None)
    return name if isinstance(name, str) and name else f"{type(plugin).__name__}#{index}"


def _resume_in_child(program: _Program, max_steps: int, resume: str, out: str) -> None:
    capture = program.run(max_steps, resume=resume)
    torch.save({"final": capture.final, "attributes": capture.attributes, "batches": capture.batches}, out)


def verify_resume(
    trainer: Trainer,
    model_factory: Callable[[], torch.nn.Module],
    train_data: Iterable[Any],
    *,
    optimizer_factory: Callable[[torch.nn.Module], Any] | None,
    loss_fn: Any = None,
    scheduler_factory: Callable[[Any], Any] | None = None,
    val_data: Iterable[Any] | None = None,
    steps: int = 20,
    interrupt_at: int | None = None,
    fresh_process: bool = False,
    plugins: Iterable[object] | None = None,
) -> ResumeReport:
    """Check that a program resumed from a checkpoint ends exactly as an uninterrupted one.

    Three runs of ``trainer``'s configuration, each with a fresh model
    (``model_factory()``), fresh optimizers (``optimizer_factory(model)``: one
    optimizer or a dict of them) and fresh copies of the plugins: ``steps``
    optimizer steps straight through; ``interrupt_at`` steps and a
    checkpoint; a resume from that checkpoint to ``steps``. The straight and
    the resumed run must end with the same bits everywhere.

    Args:
        trainer: The Trainer whose configuration and plugins (your own, as
            registered: deep-copied for each run) are tested. Nothing of it
            is changed; metric logs and progress are off during the test.
        model_factory: Makes the model (called after seeding torch with the
            config's seed, or 0).
        train_data: The training batches (re-iterable).
        optimizer_factory: ``model -> optimizer`` (or a dict of named
            optimizers); None for manual optimization without one.
        loss_fn: As for ``fit``.
        scheduler_factory: ``optimizer(s) -> scheduler(s)``, as ``fit`` takes them.
        val_data: Validation batches, as for ``fit``.
        steps: Optimizer steps of the straight run.
        interrupt_at: The step after which the interrupted run stops (default:
            the middle); choose one inside an epoch to test a mid-epoch resume.
        fresh_process: Resume in a new process (spawned: the factories, the data
            and the plugins must be picklable, e.g. top-level functions), as a
            preempted job does.
        plugins: The plugins to test instead of ``trainer``'s own.

    Returns:
        A :class:`ResumeReport`: ``report.ok``, ``report.differences``, ``str(report)``.
    """
    interrupt = interrupt_at if interrupt_at is not None else max(1, steps // 2)
    if not 0 < interrupt < steps:
        raise DltrainError(f"interrupt_at must be between 1 and steps - 1 ({steps - 1}), got {interrupt}")
    config = trainer.config.model_dump()
    config.update(run_dir=None, progress="off", autoload_plugins=trainer.config.autoload_plugins)
    own = list(plugins) if plugins is not None else trainer.plugin_manager.user_plugins()
    program = _Program(
        config=config, plugins=own, model_factory=model_factory, train_data=train_data,
        optimizer_factory=optimizer_factory, scheduler_factory=scheduler_factory, loss_fn=loss_fn,
        val_data=val_data, seed=trainer.config.seed if trainer.config.seed is not None else 0,
    )  # fmt: skip
    program.remember_data()
    with tempfile.TemporaryDirectory(prefix="dltrain-verify-resume-") as tmp:
        straight = program.run(steps)
        program.run(interrupt, checkpoint_dir=tmp)
        from dltrain.checkpoint import list_checkpoints

        saved = list_checkpoints(tmp)
        if not saved:
            raise DltrainError(
                f"the interrupted run wrote no checkpoint in {tmp!r}; is checkpointing disabled?"
            )
        path = str(saved[-1].payload_path)
        if fresh_process:
            out = str(Path(tmp) / "resumed.pt")
            child = multiprocessing.get_context("spawn").Process(
                target=_resume_in_child, args=(program, steps, path, out)
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                raise DltrainError(f"the resumed run in a fresh process failed (exit code {child.exitcode})")
            loaded = torch.load(out, weights_only=True)
            resumed = _Capture({})
            resumed.final, resumed.attributes, resumed.batches = (
                loaded["final"], loaded["attributes"], loaded["batches"],
            )  # fmt: skip
        else:
            resumed = program.run(steps, resume=path)
    report = ResumeReport(steps=steps, interrupt_at=interrupt)
    _compare_runs(straight, resumed, interrupt, report)
    return report


# -- comparing ---------------------------------------------------------------------------------


def _compare_runs(straight: _Capture, resumed: _Capture, interrupt: int, report: ResumeReport) -> None:
    # Root causes first: plugin state outside state_dict, then the data, then the state itself.
    for name, attributes in straight.attributes.items():
        other = resumed.attributes.get(name, {})
        for attr, value in attributes.items():
            if attr in other and not _equal(value, other[attr]):
                report.differences.append(
                    f"plugin {name!r} attribute {attr!r} is {_short(value)} after the straight run and "
                    f"{_short(other[attr])} after the resume: it keeps state that its state_dict does not "
                    f"return (implement state_dict/load_state_dict, or reset it in on_fit_start)"
                )
    for key in sorted(k for k in straight.batches if k[0] >= interrupt):
        if key in resumed.batches and straight.batches[key] != resumed.batches[key]:
            micro = f" (micro-batch {key[1]})" if key[1] > 1 else ""
            report.differences.append(
                f"the training batch of optimizer step {key[0] + 1}{micro} differs after resume: the "
                f"training data's order is not reproducible from a checkpoint (give its sampler a "
                f"torch.Generator, or implement state_dict/load_state_dict on the data)"
            )
            break
    a = {k: v for k, v in straight.final.items() if k not in _NOT_COMPARED}
    b = {k: v for k, v in resumed.final.items() if k not in _NOT_COMPARED}
    found: list[str] = []
    report.compared = _diff(a, b, (), found)
    report.differences.extend(found)


def _equal(a: Any, b: Any) -> bool:
    found: list[str] = []
    _diff(a, b, (), found)
    return not found


def _diff(a: Any, b: Any, path: tuple[Any, ...], found: list[str]) -> int:
    """Add a line to ``found`` for every difference between ``a`` and ``b``; return how many leaves were compared."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(
                f"{_describe(path)} is {a.dtype} {list(a.shape)} in one run, {b.dtype} {list(b.shape)} in the other"
            )
        elif not torch.equal(a, b) and not (
            a.is_floating_point()
            and bool(torch.equal(a.isnan(), b.isnan()))
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        ):
            found.append(f"{_describe(path)} {_by_how_much(a, b)}")
        return 1
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        count = 0
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                found.append(f"{_describe((*path, key))} is in only one of the runs")
                continue
            count += _diff(a[key], b[key], (*path, key), found)
        return count
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            found.append(f"{_describe(path)} has {len(a)} entries in one run, {len(b)} in the other")
            return 1
        return sum(_diff(x, y, (*path, i), found) for i, (x, y) in enumerate(zip(a, b, strict=True)))
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if not same:
        found.append(
            f"{_describe(path)} is {_short(a)} after the straight run and {_short(b)} after the resume"
        )
    return 1


def _by_how_much(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.is_floating_point() or a.is_complex():
        return f"differs by {float((a.double() - b.double()).abs().max()):.3g} after resume"
    return f"differs in {int((a != b).sum())} of {a.numel()} values after resume"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(path: tuple[Any, ...]) -> str:
    """A person's name for a place in a checkpoint payload."""
    if not path:
        return "the state"
    head, rest = path[0], path[1:]
    if head == "model":
        return f"model entry {'.'.join(map(str, rest))!r}" if rest else "the model"
    if head == "optimizers" and rest:
        name, tail = rest[0], rest[1:]
        if len(tail) >= 3 and tail[0] == "state":
            return f"optimizer {name!r} state {tail[2]!r} of parameter {tail[1]}"
        if len(tail) >= 3 and tail[0] == "param_groups":
            return f"optimizer {name!r} param group {tail[1]} {tail[2]!r}"
        return f"optimizer {name!r} {'/'.join(map(str, tail))}"
    if head == "schedulers" and rest:
        return f"scheduler of {rest[0]!r} {'/'.join(map(str, rest[1:]))}"
    if head == "plugins" and rest:
        return f"plugin {rest[0]!r} state {'/'.join(map(str, rest[1:]))!r}"
    if head == "rng":
        return f"random state {'/'.join(map(str, rest))!r}"
    if head == "grads" and rest:
        return f"gradient of {rest[0]!r}"
    if head == "loop":
        return f"loop position {'/'.join(map(str, rest))!r}"
    if head == "history":
        return f"history {'/'.join(map(str, rest))}"
    return "/".join(map(str, path))
