"""Small FSDP training runs for ``tests/test_fsdp.py``, in one process or under torchrun.

As in ``ddp_runs.py`` (whose data and model these runs share), the tests call
these functions in their own process (the single-process reference; with
``strategy="fsdp"`` it trains as usual) and run this file under ``python -m
torch.distributed.run --nproc-per-node=2``; each rank writes ``rank<N>.pt``
into ``--out``. The global batch is the same either way.

Evaluation batch sizes are chosen so that the shards of the two ranks have a
different number of batches (validation: 19 and 18 samples in batches of 6,
so 4 and 3 batches; test: 15 and 14 in batches of 7, so 3 and 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from ddp_runs import GLOBAL_BATCH, N_TEST, N_TRAIN, N_VAL, NanOnRank, data, make_model, world_size
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dltrain
from dltrain.checkpoint import save_checkpoint

VAL_BATCH, TEST_BATCH = 6, 7
CLIP = 0.5

#: The comparison runs use the default non-finite policy ("raise"), checked on sharded weights.
NONFINITE = "raise"


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors (an all-gather per sharded tensor: every rank calls it)."""
    out = {}
    for key, value in model.state_dict().items():
        to_full = getattr(value, "full_tensor", None)
        out[key] = (to_full() if callable(to_full) else value).detach().clone()
    return out


def _trainer(plugins: tuple[object, ...] = (), **config: Any) -> dltrain.Trainer:
    fields: dict[str, Any] = {
        "device": "cpu",
        "progress": "off",
        "run_dir": None,
        "strategy": "fsdp",
        "on_nonfinite": NONFINITE,
    }
    return dltrain.Trainer(plugins=list(plugins), **{**fields, **config})


def fit_clipped(
    *,
    strategy: str = "fsdp",
    epochs: int = 2,
    checkpoint_dir: str | None = None,
    resume: str | None = None,
    resume_strict: bool = False,
) -> dict[str, Any]:
    """SGD with momentum, gradient clipping, a per-step StepLR, uneven validation; then test and predict."""
    x, y = data(N_TRAIN, 0)
    vx, vy = data(N_VAL, 1)
    tx, ty = data(N_TEST, 2)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    checkpoint = {"dir": checkpoint_dir, "keep_last": 5} if checkpoint_dir else None
    trainer = _trainer(
        max_epochs=epochs,
        scheduler_interval="step",
        gradient_clip_val=CLIP,
        checkpoint=checkpoint,
        strategy=strategy,
    )
    history = trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=GLOBAL_BATCH // world_size()),
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        val_data=DataLoader(TensorDataset(vx, vy), batch_size=VAL_BATCH),
        scheduler=scheduler,
        resume=resume,
        resume_strict=resume_strict,
    )
    model_after_fit = type(trainer.model).__name__
    test = trainer.test(model, DataLoader(TensorDataset(tx, ty), batch_size=TEST_BATCH))
    predictions = trainer.predict(model, DataLoader(TensorDataset(tx), batch_size=TEST_BATCH))
    return {
        "weights": full_weights(model),
        "history": history.epochs,
        "test": test,
        "predictions": torch.cat(predictions),
        "lr": scheduler.get_last_lr(),
        "model_after_fit": model_after_fit,
        "optimizer_is_the_users": trainer.optimizer is optimizer,
    }


class SaveMidGroup:
    """Writes a checkpoint after the first micro-batch of the group of global step ``step`` (rank 0)."""

    name = "save_mid_group"

    def __init__(self, directory: str, step: int) -> None:
        self.directory, self.step = directory, step
        self.grads: list[str] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.global_step == self.step and state.micro_step == 1:
            payload = trainer.state_dict()  # every rank: it gathers
            self.grads = sorted(payload.get("grads", {}))
            if state.is_global_zero:
                save_checkpoint(payload, self.directory)


def fit_accumulating(*, save_dir: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """Adam, 2 micro-batches per step; optionally a checkpoint in the middle of the group of step 2."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    saver = SaveMidGroup(save_dir, 2) if save_dir else None
    trainer = _trainer((saver,) if saver else (), max_epochs=2, accumulate_grad_batches=2)
    history = trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=GLOBAL_BATCH // 2 // world_size()),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=nn.CrossEntropyLoss(),
        resume=resume,
        resume_strict=False,
    )
    return {
        "weights": full_weights(model),
        "history": history.epochs,
        "saved_grads": saver.grads if saver else [],
    }


def fit_with_stateful_optimizer() -> str:
    """An optimizer that stepped before fit: the error message, or '' when fit did not refuse."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(x[:4]).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    try:
        _trainer().fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            optimizer=optimizer,
            loss_fn=nn.CrossEntropyLoss(),
        )
    except dltrain.DltrainError as exc:
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        return f"{type(exc).__name__}: {exc} [model sharded: {sharded}]"
    return ""


class NanInRank1Shard:
    """At the end of epoch 1, puts a NaN into rank 1's shard of the last layer's weight."""

    name = "nan_in_rank_1_shard"

    @dltrain.hookimpl
    def on_train_epoch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.rank == 1:
            with torch.no_grad():
                trainer.model[4].weight.to_local()[0, 0] = float("nan")


def fit_nan_weights_on_one_rank(checkpoint_dir: str) -> list[str]:
    """Non-finite weights in one rank's shard only: no rank saves (and none hangs); the files written."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    trainer = _trainer(
        (NanInRank1Shard(),),
        max_epochs=1,
        on_nonfinite="skip",
        checkpoint={"dir": checkpoint_dir},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss_fn=nn.CrossEntropyLoss(),
        )
    return sorted(p.name for p in Path(checkpoint_dir).glob("*")) if Path(checkpoint_dir).is_dir() else []


def fit_default_policy() -> str:
    """A fit with the default ``on_nonfinite="raise"`` and finite losses: its error, or '' when it worked."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    try:
        _trainer(on_nonfinite="raise").fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss_fn=nn.CrossEntropyLoss(),
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def fit_stopping_on_nan_loss() -> dict[str, Any]:
    """``on_nonfinite="stop"`` with a NaN loss on rank 1 only: where and why the run stopped, or its error."""
    x, y = data(N_TRAIN, 0)
    model = make_model()
    trainer = _trainer(max_epochs=2, on_nonfinite="stop", log_every_n_steps=1, stop_check_every_n_steps=1)
    try:
        trainer.fit(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss_fn=NanOnRank(rank=1, at=2),
        )
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    assert trainer.state is not None
    return {"global_step": trainer.state.global_step, "stop_reason": trainer.state.stop_reason}


def main_runs(out: Path, from_single: str, mid_group_from_single: str) -> dict[str, Any]:
    """Every run of the job, keyed by name."""
    checkpoints = out / "checkpoints"
    results: dict[str, Any] = {"fsdp": fit_clipped(checkpoint_dir=str(checkpoints))}
    epoch_1 = str(checkpoints / "step-000000006.ckpt")
    results["fsdp_resumed"] = fit_clipped(resume=epoch_1, resume_strict=True)
    results["fsdp_from_single"] = fit_clipped(resume=from_single)
    results["ddp_from_fsdp"] = fit_clipped(strategy="ddp", resume=epoch_1)
    results["accumulating"] = fit_accumulating(save_dir=str(out / "mid_group"))
    mid = str(out / "mid_group" / "step-000000002.ckpt")
    results["accumulating_resumed"] = fit_accumulating(resume=mid)
    results["accumulating_from_single"] = fit_accumulating(resume=mid_group_from_single)
    results["stateful_optimizer"] = fit_with_stateful_optimizer()
    results["nan_weights"] = fit_nan_weights_on_one_rank(str(out / "nan_checkpoints"))
    results["default_policy"] = fit_default_policy()
    results["stop_on_nan_loss"] = fit_stopping_on_nan_loss()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run every scenario in this process (one rank of a torchrun job) and save the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-single", required=True)
    parser.add_argument("--mid-group-from-single", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = main_runs(args.out, args.from_single, args.mid_group_from_single)
    results["seconds"] = time.perf_counter() - start
    torch.save(results, args.out / f"rank{int(os.environ.get('RANK', '0'))}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
