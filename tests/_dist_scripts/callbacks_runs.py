"""The callbacks of ``dltrain.callbacks`` in runs under torchrun (2 processes), or in one process.

Uses the data and model of ``ddp_runs.py`` (the same global batch either way).
Under torchrun each rank saves its results as ``rank<N>.pt`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import ddp_runs as runs
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dltrain
from dltrain.callbacks import (
    EMA,
    EarlyStopping,
    GradientNormMonitor,
    LearningRateMonitor,
    ModelSummary,
    TimeLimit,
)
from dltrain.checkpoint import list_checkpoints
from dltrain.default_plugins.metric_log import read_metrics


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fit_ema_and_monitors(run_dir: str) -> dict[str, Any]:
    """Two epochs with EMA (validation sees the average), the monitors and the summary; what each rank saw."""
    x, y = runs.data(runs.N_TRAIN, 0)
    vx, vy = runs.data(runs.N_VAL, 1)
    model = runs.make_model()
    ema = EMA(decay=0.8)
    plugins = [ema, LearningRateMonitor(), GradientNormMonitor(per_layer=True), ModelSummary()]
    trainer = dltrain.Trainer(
        device="cpu", progress="off", run_dir=run_dir, max_epochs=2, log_every_n_steps=2, plugins=plugins
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=runs.per_rank_batch()),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            loss_fn=nn.CrossEntropyLoss(),
            val_data=DataLoader(TensorDataset(vx, vy), batch_size=runs.per_rank_batch()),
        )
    run_path = trainer.get_plugin("metric_log").run_path
    return {
        "average": {k: v.detach().clone() for k, v in ema.averaged_state().items()},
        "history": history.epochs,
        "printed": printed.getvalue(),
        "steps": [r for r in read_metrics(run_path) if r["kind"] == "step"] if run_path else [],
    }


class FakeClock:
    """One second per training batch, five per checkpoint save (the payload is built on every rank)."""

    name = "fake_clock"

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    @dltrain.hookimpl
    def on_train_batch_start(self) -> None:
        self.now += 1.0

    @dltrain.hookimpl
    def state_dict(self) -> None:
        self.now += 5.0


def fit_time_limited(checkpoint_dir: str, seconds: float) -> dict[str, Any]:
    """A fit that ``TimeLimit(seconds)`` stops; where it stopped and what was saved."""
    x, y = runs.data(runs.N_TRAIN, 0)
    model = runs.make_model()
    clock = FakeClock()
    limit = TimeLimit(seconds=seconds, margin=0, safety=1, clock=clock)
    trainer = dltrain.Trainer(
        device="cpu",
        progress="off",
        run_dir=None,
        max_epochs=100,
        checkpoint={"dir": checkpoint_dir},
        plugins=[clock, limit],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=runs.per_rank_batch()),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            loss_fn=nn.CrossEntropyLoss(),
        )
    assert trainer.state is not None
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
    return {
        "global_step": trainer.state.global_step,
        "stop_reason": trainer.state.stop_reason,
        "clock": clock.now,
        "saved_step": list_checkpoints(checkpoint_dir)[-1].global_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = {
        "ema": fit_ema_and_monitors(str(args.out / "runs")),
        # val_loss can never improve by 10: the second validation stops every rank.
        "early_stopping": runs.fit_with_stop(EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)),
        "time_limit": fit_time_limited(str(args.out / "same_limit"), 40.0),
        # Rank 1 has less time: its request stops both, at the same step.
        "time_limit_rank_1": fit_time_limited(str(args.out / "rank_1_first"), 40.0 if rank() == 0 else 20.0),
    }
    torch.save(results, args.out / f"rank{rank()}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
