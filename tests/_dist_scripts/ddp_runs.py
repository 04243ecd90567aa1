"""Small training runs for the distributed tests, in one process or under torchrun.

The tests call these functions in their own process (the single-process
reference) and run this file under ``python -m torch.distributed.run
--nproc-per-node=2`` (each rank writes ``rank<N>.pt`` into ``--out``). The
same *global* batch is used either way: ``GLOBAL_BATCH`` in one process,
``GLOBAL_BATCH // world_size`` per rank under DDP.

Scenarios (``--scenario``):

* ``main``: every run below, results saved for the tests to compare.
* ``fail``: rank 1 raises at its second step; the job must exit non-zero, promptly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dltrain
from dltrain.data import InMemoryLoader

N_TRAIN, N_VAL, N_TEST = 96, 37, 29  # odd evaluation sizes: shards of unequal length
GLOBAL_BATCH = 16


def world_size() -> int:
    """The number of processes of this job (1 outside torchrun); read before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_rank_batch() -> int:
    """Each process's batch size, so that the global batch is ``GLOBAL_BATCH``."""
    return GLOBAL_BATCH // world_size()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic MNIST-shaped samples; column 0 is unique per sample (it identifies them)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    assert len(set(x[:, 0].tolist())) == n
    return x, y


def make_model() -> nn.Module:
    """The MNIST MLP (784-128-64-10), initialised the same way in every process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class Recorder:
    """Records the samples each training batch holds and what the run saw of the process group."""

    name = "recorder"

    def __init__(self, x: torch.Tensor) -> None:
        self._ids = {value: i for i, value in enumerate(x[:, 0].tolist())}
        self.ids: dict[int, list[int]] = {}
        self.world: tuple[int, int] = (-1, -1)

    @dltrain.hookimpl
    def on_fit_start(self, state: dltrain.State) -> None:
        self.world = (state.world_size, state.rank)

    @dltrain.hookimpl
    def on_train_batch_start(self, state: dltrain.State, batch: Any) -> None:
        self.ids.setdefault(state.epoch, []).extend(self._ids[v] for v in batch[0][:, 0].tolist())


class LagOnRank0:
    """Holds rank 0 back at the end of fit, so rank 1 starts the next run (and process group) first."""

    name = "lag_on_rank_0"

    @dltrain.hookimpl
    def on_fit_end(self, state: dltrain.State) -> None:
        if state.rank == 0:
            time.sleep(0.5)


def _trainer(recorder: Recorder, *plugins: object, **config: Any) -> dltrain.Trainer:
    fields: dict[str, Any] = {"device": "cpu", "progress": "off", "run_dir": None, **config}
    return dltrain.Trainer(plugins=[recorder, *plugins], **fields)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_sequential(
    *, epochs: int = 2, checkpoint_dir: str | None = None, resume: str | None = None
) -> dict[str, Any]:
    """DataLoaders without shuffling, SGD with momentum, a per-step StepLR, validation, then test."""
    x, y = data(N_TRAIN, 0)
    vx, vy = data(N_VAL, 1)
    tx, ty = data(N_TEST, 2)
    bs = per_rank_batch()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    recorder = Recorder(x)
    checkpoint = {"dir": checkpoint_dir, "keep_last": 5} if checkpoint_dir else None
    trainer = _trainer(
        recorder, LagOnRank0(), max_epochs=epochs, scheduler_interval="step", checkpoint=checkpoint
    )
    history = trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=bs),
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        val_data=DataLoader(TensorDataset(vx, vy), batch_size=bs),
        scheduler=scheduler,
        resume=resume,
        resume_strict=False,
    )
    model_after_fit = type(trainer.model).__name__
    test = trainer.test(model, DataLoader(TensorDataset(tx, ty), batch_size=bs, shuffle=True))
    model(x[:4]).sum().backward()  # a plain backward after fit: no DDP hook left behind
    return {
        "weights": _weights(model),
        "history": history.epochs,
        "test": test,
        "lr": scheduler.get_last_lr(),
        "ids": recorder.ids,
        "world": recorder.world,
        "model_after_fit": model_after_fit,
    }


def fit_in_memory_shuffled() -> dict[str, Any]:
    """InMemoryLoaders made before any process group exists (so the plugin shards them), shuffled."""
    x, y = data(N_TRAIN, 0)
    vx, vy = data(N_VAL, 1)
    bs = per_rank_batch()
    train = InMemoryLoader(x, y, batch_size=bs, shuffle=True, seed=3)
    val = InMemoryLoader(vx, vy, batch_size=bs)
    model = make_model()
    recorder = Recorder(x)
    history = _trainer(recorder, max_epochs=2).fit(
        model,
        train,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=val,
    )
    return {"weights": _weights(model), "history": history.epochs, "ids": recorder.ids}


def fit_loader_shuffled() -> dict[str, Any]:
    """A shuffling DataLoader with ``seed=5``: the sample order of each rank and epoch."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    recorder = Recorder(x)
    _trainer(recorder, max_epochs=2, seed=5).fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=per_rank_batch(), shuffle=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=nn.CrossEntropyLoss(),
    )
    return {"ids": recorder.ids}


class StopOnOneRank:
    """Requests a stop on one rank only, after a given step or at the end of a given epoch."""

    name = "stop_on_one_rank"

    def __init__(self, rank: int, *, step: int | None = None, epoch_end: int | None = None) -> None:
        self.rank, self.step, self.epoch_end = rank, step, epoch_end

    @dltrain.hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.rank == self.rank and state.global_step == self.step:
            trainer.request_stop(f"asked on rank {self.rank} only")

    @dltrain.hookimpl
    def on_train_epoch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.rank == self.rank and state.epoch == self.epoch_end:
            trainer.request_stop(f"asked on rank {self.rank} only, at an epoch's end")


class NanOnRank:
    """A loss function that returns NaN on one rank at its ``at``-th call (1-based)."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at, self.calls = rank, at, 0
        self.loss = nn.CrossEntropyLoss()

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.loss(outputs, targets)
        mine = int(os.environ.get("RANK", "0")) == self.rank
        return loss * float("nan") if mine and self.calls == self.at else loss


def fit_with_stop(plugin: object | None = None, loss_fn: Any = None, **config: Any) -> dict[str, Any]:
    """A 3-epoch fit with validation that something stops early; where and why it stopped."""
    x, y = data(N_TRAIN, 0)
    vx, vy = data(N_VAL, 1)
    model = make_model()
    recorder = Recorder(x)
    plugins = [recorder] if plugin is None else [recorder, plugin]
    fields: dict[str, Any] = {"device": "cpu", "progress": "off", "run_dir": None, "max_epochs": 3, **config}
    trainer = dltrain.Trainer(plugins=plugins, **fields)
    history = trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=per_rank_batch()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=loss_fn or nn.CrossEntropyLoss(),
        val_data=DataLoader(TensorDataset(vx, vy), batch_size=per_rank_batch()),
    )
    assert trainer.state is not None
    return {
        "global_step": trainer.state.global_step,
        "stop_reason": trainer.state.stop_reason,
        "epochs": [{k: v for k, v in row.items() if k in ("epoch", "val_loss")} for row in history.epochs],
    }


def fit_skipping_nan() -> dict[str, Any]:
    """``on_nonfinite="skip"`` with a NaN loss on rank 1 only: every rank must skip that step."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None, on_nonfinite="skip")
    trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=per_rank_batch()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=NanOnRank(rank=1, at=2),
    )
    assert trainer.state is not None
    return {"skipped_steps": trainer.state.skipped_steps, "weights": _weights(model)}


def fit_resumed_mid_epoch(checkpoint_dir: str) -> dict[str, Any]:
    """One epoch saving every 3 steps, then the same epoch resumed from step 3: both epochs' metrics."""

    def one_epoch(resume: str | None) -> list[dict[str, float]]:
        x, y = data(N_TRAIN, 0)
        model = make_model()
        checkpoint = {"dir": checkpoint_dir, "every_n_steps": 3, "keep_last": 10}
        trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None, checkpoint=checkpoint)
        history = trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=per_rank_batch()),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss_fn=nn.CrossEntropyLoss(),
            resume=resume,
        )
        return history.epochs

    uninterrupted = one_epoch(None)
    return {"uninterrupted": uninterrupted, "resumed": one_epoch(f"{checkpoint_dir}/step-000000003.ckpt")}


class RaiseOnRank1:
    """Raises on rank 1 at its second training batch."""

    name = "raise_on_rank_1"

    @dltrain.hookimpl
    def on_train_batch_start(self, state: dltrain.State) -> None:
        if state.rank == 1 and state.global_step == 1:
            raise RuntimeError("boom on rank 1")


def fit_failing() -> None:
    """A fit in which rank 1 raises: the job must fail rather than hang."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    dltrain.Trainer(device="cpu", progress="off", run_dir=None, max_epochs=50, plugins=[RaiseOnRank1()]).fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=per_rank_batch()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=nn.CrossEntropyLoss(),
    )


class CountAllReduces:
    """Registers a DDP communication hook that counts the gradient all-reduces (bucket calls)."""

    name = "count_all_reduces"

    def __init__(self) -> None:
        self.calls = 0
        self.by_batch: list[tuple[int, int]] = []  # (micro_step after the batch, all-reduces in it)
        self._before = 0

    @dltrain.hookimpl
    def on_train_batch_start(self) -> None:
        self._before = self.calls

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.by_batch.append((state.micro_step, self.calls - self._before))

    @dltrain.hookimpl
    def on_fit_start(self, trainer: dltrain.Trainer) -> None:
        model = trainer.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads the annotations: none
                self.calls += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting)


def fit_accumulating() -> dict[str, Any]:
    """Two micro-batches per step, Adam; under DDP the first of each pair runs under no_sync."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    counter = CountAllReduces()
    trainer = _trainer(Recorder(x), counter, max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=per_rank_batch() // 2),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=nn.CrossEntropyLoss(),
    )
    state = trainer.state
    assert state is not None
    return {"weights": _weights(model), "by_batch": counter.by_batch, "steps": state.global_step}


def fit_rolling_back(checkpoint_dir: str) -> dict[str, Any]:
    """on_nonfinite="rollback": a NaN loss on rank 1 (on the one process, at the same batch) at the
    7th training batch; every rank rolls back to the checkpoint of step 4 and skips that batch."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    trainer = _trainer(
        Recorder(x), max_epochs=2, on_nonfinite="rollback", log_every_n_steps=2,
        checkpoint={"dir": checkpoint_dir, "every_n_steps": 2, "keep_last": 3},
    )  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=per_rank_batch()),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            loss_fn=NanOnRank(rank=min(1, world_size() - 1), at=7),
        )
    state = trainer.state
    assert state is not None
    return {"weights": _weights(model), "rollbacks": state.rollbacks, "steps": state.global_step}


def main_runs(out: Path, resume_from: str | None) -> dict[str, Any]:
    """Every run of the ``main`` scenario, keyed by name."""
    results: dict[str, Any] = {"sequential": fit_sequential(checkpoint_dir=str(out / "checkpoints"))}
    if resume_from:
        results["resumed_from_single"] = fit_sequential(resume=resume_from)
    results["in_memory"] = fit_in_memory_shuffled()
    results["loader_shuffled"] = fit_loader_shuffled()
    results["stop_at_step"] = fit_with_stop(StopOnOneRank(1, step=3), stop_check_every_n_steps=1)
    results["stop_every_2_steps"] = fit_with_stop(StopOnOneRank(1, step=1), stop_check_every_n_steps=2)
    results["stop_adaptive"] = fit_with_stop(StopOnOneRank(1, step=3))
    results["stop_at_epoch_end"] = fit_with_stop(StopOnOneRank(0, epoch_end=0))
    results["stop_nonfinite"] = fit_with_stop(
        loss_fn=NanOnRank(rank=1, at=2), on_nonfinite="stop", log_every_n_steps=1, stop_check_every_n_steps=1
    )
    results["skip_nonfinite"] = fit_skipping_nan()
    results["resumed_mid_epoch"] = fit_resumed_mid_epoch(str(out / "mid_epoch_checkpoints"))
    results["accumulating"] = fit_accumulating()
    results["rolling_back"] = fit_rolling_back(str(out / "rollback_checkpoints"))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run a scenario in this process (one rank of a torchrun job) and save its results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", choices=("main", "fail"), default="main")
    parser.add_argument("--resume-from", default=None)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    start = time.perf_counter()
    if args.scenario == "fail":
        fit_failing()
        return 0
    results: Mapping[str, Any] = main_runs(args.out, args.resume_from)
    results = {**results, "seconds": time.perf_counter() - start}
    torch.save(results, args.out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
