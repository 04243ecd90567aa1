"""The training hot path makes no host sync per step.

On CUDA, ``loss.item()``, ``bool(t)``, ``t.cpu()`` and friends wait for the
GPU to finish, so one of them per step serialises the pipeline. These tests
run on CPU, where nothing waits, so they count *calls* to the tensor methods
that would sync on an accelerator, and check where they happen: none between
one batch and the next (training and validation), and the count per epoch does
not grow with the number of steps.

Not counted: ``Tensor.to("cpu")`` (indistinguishable on CPU from the batch
transfer every step makes) and syncs inside torch's C++ code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain.data import InMemoryLoader

# Tensor methods that copy a value to the host (and so wait for the device).
SYNCING_METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
    "__repr__",
    "__array__",
)


class SyncLog:
    """Counts syncing calls while ``active``, between markers set by :class:`Marker`."""

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, str]] = []  # ("mark", hook) or ("sync", "method at file:line")

    def mark(self, hook: str) -> None:
        self.events.append(("mark", hook))

    def syncs_between(self, hook: str) -> list[str]:
        """Syncs after the first and before the last marker of ``hook``."""
        marks = [i for i, (kind, name) in enumerate(self.events) if kind == "mark" and name == hook]
        assert len(marks) >= 3, f"too few {hook} calls to check: {len(marks)}"
        return [what for kind, what in self.events[marks[0] : marks[-1]] if kind == "sync"]

    def all_syncs(self) -> list[str]:
        return [what for kind, what in self.events if kind == "sync"]


@pytest.fixture
def sync_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    log = SyncLog()

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if log.active:
                caller = sys._getframe(1)
                log.events.append(("sync", f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}"))
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    # On the CPU the non-finite policy reads each loss as it comes (nothing waits there); run it
    # as on an accelerator, where it keeps a gradient flag per step on the device instead.
    monkeypatch.setattr("dltrain._step_runner.reads_losses_as_they_come", lambda device: False)
    yield log
    log.active = False


class Marker:
    """A plugin that switches counting on for each training epoch and marks batch ends."""

    name = "sync_marker"

    def __init__(self, log: SyncLog) -> None:
        self.log = log

    @dltrain.hookimpl(tryfirst=True)
    def on_train_epoch_start(self) -> None:
        self.log.active = True
        self.log.mark("on_train_epoch_start")

    @dltrain.hookimpl(trylast=True)
    def on_train_batch_end(self) -> None:
        self.log.mark("on_train_batch_end")

    @dltrain.hookimpl(trylast=True)
    def on_eval_batch_end(self) -> None:
        self.log.mark("on_eval_batch_end")

    @dltrain.hookimpl(trylast=True)
    def on_eval_epoch_end(self) -> None:
        self.log.active = False


class ItemEveryStep:
    """What the hot path must not do: a host sync per step, as a naive logger would."""

    name = "item_every_step"

    def __init__(self) -> None:
        self.losses: list[float] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, output: dltrain.StepOutput) -> None:
        assert output.loss is not None
        self.losses.append(output.loss.item())


def _fit(steps: int, log: SyncLog, *, extra_plugins: tuple[object, ...] = (), **config: Any) -> None:
    torch.manual_seed(0)
    batch = 8
    x, y = torch.randn(steps * batch, 20), torch.randint(0, 4, (steps * batch,))
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    trainer = dltrain.Trainer(
        max_epochs=1,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        plugins=[Marker(log), *extra_plugins],
        **config,
    )
    trainer.fit(
        model,
        InMemoryLoader(x, y, batch_size=batch, shuffle=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=InMemoryLoader(x[:40], y[:40], batch_size=batch),
    )


def test_no_host_sync_between_batches(sync_log: SyncLog) -> None:
    # 300 steps: the metrics plugin folds its pending losses (every 256 batches) in between.
    _fit(300, sync_log, log_every_n_steps=1000)
    assert sync_log.syncs_between("on_train_batch_end") == []
    assert sync_log.syncs_between("on_eval_batch_end") == []


def test_syncs_per_epoch_do_not_grow_with_the_number_of_steps(sync_log: SyncLog) -> None:
    _fit(10, sync_log, log_every_n_steps=1000)
    few = sync_log.all_syncs()
    sync_log.events.clear()
    _fit(50, sync_log, log_every_n_steps=1000)
    many = sync_log.all_syncs()
    assert len(many) == len(few), f"10 steps: {few}\n50 steps: {many}"
    assert len(few) <= 10, f"more syncs per epoch than expected: {few}"


def test_step_level_checks_sync_once_per_logging_interval_only(sync_log: SyncLog) -> None:
    _fit(10, sync_log, log_every_n_steps=10)
    few = len(sync_log.all_syncs())
    sync_log.events.clear()
    _fit(50, sync_log, log_every_n_steps=10)
    assert len(sync_log.all_syncs()) - few <= (50 - 10) // 10


def test_the_check_catches_a_plugin_that_syncs_every_step(sync_log: SyncLog) -> None:
    _fit(20, sync_log, extra_plugins=(ItemEveryStep(),), log_every_n_steps=1000)
    syncs = sync_log.syncs_between("on_train_batch_end")
    assert len(syncs) == 19 and all(s.startswith("item at ") and __file__ in s for s in syncs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reports_no_synchronising_call_between_batches() -> None:
    """On a GPU, torch's sync debug mode raises at any synchronising call between the
    second batch's start and the second-to-last batch's end (default plugins on)."""
    steps, batch = 300, 8
    device = torch.device("cuda")
    x, y = torch.randn(steps * batch, 20), torch.randint(0, 4, (steps * batch,))
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    checked: list[int] = []

    class Strict:
        name = "strict_sync"

        @dltrain.hookimpl
        def on_train_batch_start(self, state: dltrain.State) -> None:
            if state.batch_idx == 1:
                torch.cuda.set_sync_debug_mode("error")

        @dltrain.hookimpl(trylast=True)
        def on_train_batch_end(self, state: dltrain.State) -> None:
            if torch.cuda.get_sync_debug_mode():
                checked.append(state.batch_idx)
            if state.batch_idx == steps - 2:
                torch.cuda.set_sync_debug_mode("default")

    trainer = dltrain.Trainer(
        max_epochs=1, device="cuda", progress="line", run_dir=None, log_every_n_steps=1000, plugins=[Strict()]
    )
    try:
        trainer.fit(
            model,
            InMemoryLoader(x, y, batch_size=batch, shuffle=True, seed=0, device=device),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == list(range(1, steps - 1))
