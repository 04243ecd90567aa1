"""on_nonfinite="rollback": a run that meets a NaN goes back to its newest checkpoint and on."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from torch import nn

import dltrain
from dltrain.default_plugins.metric_log import read_metrics
from dltrain.testing import tiny_loader, tiny_model


class PoisonBatch:
    """A loss that is NaN on one batch of one epoch (a bad sample), every time that batch comes."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)
        self.trainer: dltrain.Trainer | None = None
        self.hits = 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(outputs, targets)
        state = self.trainer.state if self.trainer is not None else None
        if (
            state is not None
            and state.phase is dltrain.Phase.TRAIN
            and (state.epoch, state.batch_idx) == self.at
        ):
            self.hits += 1
            return loss * float("nan")
        return loss


def make_trainer(tmp_path: Path, **kw: Any) -> dltrain.Trainer:
    settings: dict[str, Any] = {
        "progress": "off", "run_dir": str(tmp_path / "runs"), "device": "cpu", "on_nonfinite": "rollback",
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_n_steps": 2}, "log_every_n_steps": 2,
    }  # fmt: skip
    return dltrain.Trainer(**{**settings, **kw})


def test_rollback_needs_checkpoints() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"on_nonfinite='rollback' restores the newest checkpoint"
    ):
        dltrain.Trainer(on_nonfinite="rollback")


def test_a_bad_batch_is_rolled_back_and_skipped_and_the_run_ends_finite(tmp_path: Path) -> None:
    loss_fn = PoisonBatch(epoch=1, batch=2)
    trainer = make_trainer(tmp_path, max_epochs=3)
    loss_fn.trainer = trainer
    model = tiny_model()
    with pytest.warns(
        UserWarning, match=r"rolled back to checkpoint step-000000006.*batch 2 of epoch 2 will be skipped"
    ):
        history = trainer.fit(
            model, tiny_loader(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn
        )
    assert trainer.state is not None and trainer.state.rollbacks == 1
    assert loss_fn.hits == 1  # skipped after the rollback, also in later passes? no: it is epoch-specific
    assert all(math.isfinite(v) for v in history["train_loss"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # 3 epochs of 4 batches, one batch skipped: 11 optimizer steps
    assert trainer.state.global_step == 11
    rows = read_metrics(next((tmp_path / "runs").iterdir()))
    rollbacks = [r for r in rows if r["kind"] == "rollback"]
    assert (
        len(rollbacks) == 1 and rollbacks[0]["step"] == 6 and "batch 2 of epoch 2" in rollbacks[0]["reason"]
    )


def test_the_rolled_back_run_equals_a_run_without_that_batch(tmp_path: Path) -> None:
    """What the rollback computes: exactly the run in which the bad batch never was."""
    x, y = next(iter(tiny_loader(samples=64, batch_size=64)))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def fit(data: Any, loss_fn: Any, directory: str) -> nn.Module:
        torch.manual_seed(0)
        model = tiny_model(seed=2)
        trainer = make_trainer(tmp_path / directory, max_epochs=2)
        if isinstance(loss_fn, PoisonBatch):
            loss_fn.trainer = trainer
        trainer.fit(
            model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn=loss_fn
        )
        return model

    with pytest.warns(UserWarning, match="rolled back"):
        rolled = fit(batches, PoisonBatch(epoch=1, batch=3), "rolled")

    class WithoutOne:
        """The same batches, but epoch 2 has no batch 3."""

        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Any:
            return iter(batches if self.epoch == 0 else batches[:3])

    clean = fit(WithoutOne(), nn.CrossEntropyLoss(), "clean")
    for a, b in zip(rolled.state_dict().values(), clean.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def poisson_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Counts with a log-linear rate: a learning rate too high makes exp(rate) overflow at once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = torch.poisson(torch.exp(x @ (torch.randn(8, 1, generator=gen) * 0.5)), generator=gen)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]


def test_a_run_that_diverges_at_a_high_learning_rate_recovers(tmp_path: Path) -> None:
    """A schedule raises the learning rate 8x at epoch 3; the loss overflows; each rollback halves it."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 8 if epoch >= 2 else 1)
    trainer = make_trainer(
        tmp_path, max_epochs=6, log_every_n_steps=4, rollback_lr_scale=0.5,
        checkpoint={"dir": str(tmp_path / "c"), "every_n_steps": 4, "keep_last": 4},
    )  # fmt: skip
    with pytest.warns(UserWarning, match="learning rates scaled by"):
        history = trainer.fit(
            model,
            poisson_data(),
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=nn.PoissonNLLLoss(log_input=True),
        )
    assert trainer.state is not None and trainer.state.rollbacks == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 8 * 0.25)
    assert len(history.epochs) == 6 and all(math.isfinite(v) for v in history["train_loss"])
    assert history["train_loss"][-1] < history["train_loss"][0]  # still learning


def test_after_max_rollbacks_it_gives_up_with_the_model_at_the_last_finite_checkpoint(tmp_path: Path) -> None:
    class AlwaysNan:
        def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            loss = nn.functional.cross_entropy(outputs, targets)
            return (
                loss * float("nan") if trainer.state is not None and trainer.state.global_step >= 3 else loss
            )

    trainer = make_trainer(tmp_path, max_epochs=3, max_rollbacks=2)
    model = tiny_model()
    with pytest.warns(UserWarning, match="rolled back"), pytest.raises(dltrain.NonFiniteError) as info:
        trainer.fit(
            model, tiny_loader(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=AlwaysNan()
        )
    assert str(info.value).startswith("gave up after 2 rollback(s): the loss became nan")
    assert re.search(r"back at checkpoint step-0+2(-\d+)? \(global step 2\)", str(info.value))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
