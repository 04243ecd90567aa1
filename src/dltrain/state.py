"""The one mutable object of a run: :class:`State`, and the values hooks exchange.

A :class:`State` is created by each ``fit``/``validate``/``test``/``predict``
call and passed to every hook. The Trainer is its only writer; plugins read
it, and change the run only through :meth:`dltrain.Trainer.request_stop`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["History", "Phase", "RunKind", "Stage", "State", "StepOutput"]


class RunKind(enum.Enum):
    """Which public entry point started the run."""

    FIT = "fit"
    VALIDATE = "validate"
    TEST = "test"
    PREDICT = "predict"


class Phase(enum.Enum):
    """What the loop is doing right now.

    ``metric_prefix`` is the prefix of this phase's metric names
    (``train_loss``, ``val_accuracy``, ...).
    """

    SETUP = "setup"
    TRAIN = "train"
    VALIDATE = "validate"
    TEST = "test"
    PREDICT = "predict"

    @property
    def metric_prefix(self) -> str:
        """The prefix of this phase's metric names, e.g. ``"val"`` for VALIDATE."""
        return _PREFIX[self]


class Stage(enum.Enum):
    """Where a fit stands within its current epoch (saved in checkpoints, so a resume continues there).

    START: before the epoch's training. TRAIN: inside its training.
    VALIDATE: its training is done, its validation is not. DONE: the epoch is
    complete (validation included), and ``state.epoch`` has not moved on yet.
    """

    START = "start"
    TRAIN = "train"
    VALIDATE = "validate"
    DONE = "done"


_PREFIX = {
    Phase.SETUP: "setup",
    Phase.TRAIN: "train",
    Phase.VALIDATE: "val",
    Phase.TEST: "test",
    Phase.PREDICT: "predict",
}


@dataclass(slots=True)
class State:
    """Counters and flags of one run, passed to every hook.

    Attributes:
        run: The entry point that started the run (fit, validate, test, predict).
        phase: What the loop is doing now (train, validate, test, predict).
        epoch: Epochs completed before the current one; 0 during the first
            epoch. The epoch printed to people is ``epoch + 1``.
        global_step: Optimizer steps taken since training began (survives resume).
        batch_idx: Index of the current batch within the current epoch and phase.
        micro_step: Micro-batches of the current accumulation group so far, the
            current one included from its step on; 0 once the group's optimizer
            step is done (see ``accumulate_grad_batches``).
        metrics: The latest epoch metrics by name (``train_loss``, ``val_accuracy``, ...),
            as Python floats.
        stage: Where the fit stands within the current epoch (:class:`Stage`).
        stop_requested: True once a stop was requested; the loop ends at the
            next step boundary (under torchrun: once every process agreed, at
            the same step in all of them).
        stop_reason: Why the run stopped (or will stop), for people to read.
        stop_delay_steps: At most how many optimizer steps run after the one
            where a stop is requested before the loop stops: 0 in one process
            (it stops at that step's end); under torchrun the ``distributed``
            plugin sets it from its stop-check cadence
            (``stop_check_every_n_steps``).
        skipped_steps: Optimizer steps skipped by the ``on_nonfinite="skip"`` policy.
        rollbacks: Rollbacks made by the ``on_nonfinite="rollback"`` policy in this fit
            (not restored by a rollback itself).
        device: The device the model runs on, once chosen.
        world_size: Number of processes in the run (1 without distributed training).
        rank: This process's global rank (0 without distributed training).
    """

    run: RunKind
    phase: Phase = Phase.SETUP
    epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    micro_step: int = 0
    stage: Stage = Stage.START
    metrics: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False
    stop_reason: str | None = None
    stop_delay_steps: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_size: int = 1
    rank: int = 0

    @property
    def is_global_zero(self) -> bool:
        """True in the process that prints, logs and writes files (rank 0)."""
        return self.rank == 0

    def counters(self) -> dict[str, int]:
        """The loop counters a checkpoint needs to resume at the same place."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_idx": self.batch_idx,
            "micro_step": self.micro_step,
            "skipped_steps": self.skipped_steps,
        }

    def position(self) -> dict[str, Any]:
        """Where the fit stands, as plain data: the counters, the stage and the latest metrics."""
        return {**self.counters(), "stage": self.stage.value, "metrics": dict(self.metrics)}


@dataclass(slots=True)
class StepOutput:
    """What a training or evaluation step produced for one batch.

    Attributes:
        loss: The scalar loss tensor, or None when the step computed no loss
            (prediction, or no loss function). A training step returns it with
            its graph; after backward the loop replaces it with its detached
            value, which is what ``on_train_batch_end`` sees. With manual
            optimization the step did backward itself; ``loss`` is then only
            reported (``train_loss``), and may be None.
        outputs: The model's outputs for the batch.
        targets: The batch's targets, or None when it has none.
        batch_size: Number of samples in the batch (weights epoch means).
        losses: More scalar losses by name, each reported as a metric of its
            own (``{"loss_d": ..., "loss_g": ...}`` gives ``train_loss_d`` and
            ``train_loss_g``), e.g. the losses of a GAN's two networks.
    """

    loss: torch.Tensor | None
    outputs: Any = None
    targets: Any = None
    batch_size: int = 1
    losses: dict[str, torch.Tensor] | None = None


class History(Mapping[str, list[float]]):
    """Per-epoch metrics of a fit, as returned by :meth:`dltrain.Trainer.fit`.

    ``history.epochs`` is a list with one dict per epoch (``{"epoch": 1,
    "train_loss": ..., "val_loss": ...}``); ``history["train_loss"]`` is the
    column of one metric over the epochs that recorded it.
    """

    def __init__(self, epochs: list[dict[str, float]] | None = None) -> None:
        self.epochs: list[dict[str, float]] = list(epochs or [])

    def append(self, row: dict[str, float]) -> None:
        """Add one epoch's row."""
        self.epochs.append(dict(row))

    def __getitem__(self, name: str) -> list[float]:
        values = [row[name] for row in self.epochs if name in row]
        if not values:
            known = sorted({k for row in self.epochs for k in row})
            raise KeyError(f"no metric {name!r} in the history; recorded: {known}")
        return values

    def __iter__(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for row in self.epochs:
            seen.update(dict.fromkeys(row))
        return iter(seen)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def last(self) -> dict[str, float]:
        """The newest epoch's row (empty when no epoch has finished)."""
        return dict(self.epochs[-1]) if self.epochs else {}

    def state_dict(self) -> dict[str, Any]:
        """The history as plain data, for checkpoints."""
        return {"epochs": [dict(r) for r in self.epochs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore rows saved by :meth:`state_dict`."""
        self.epochs = [dict(r) for r in state["epochs"]]

    def __repr__(self) -> str:
        return f"History({self.epochs!r})"
