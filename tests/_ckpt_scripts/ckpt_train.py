"""Train a tiny model with dltrain and checkpoints; run as a subprocess by the checkpoint tests.

A small MLP with dropout on a shuffled DataLoader whose collate adds noise
from Python's, NumPy's and torch's RNGs (so every generator a checkpoint
restores matters), SGD with momentum and a StepLR scheduler. 52 samples in
batches of 8: 7 batches an epoch, the last one short.

Writes ``--out``: the final parameters, optimizer state, the loss of every
training batch as ``(epoch, batch_idx, global_step, loss)`` and the history.
Fault injection for crash tests comes from ``DLTRAIN_CHECKPOINT_FAULT``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
from collections.abc import Generator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import dltrain
from dltrain.checkpoint import save_checkpoint

N_SAMPLES, BATCH_SIZE = 52, 8


class LossRecorder:
    """Records every training batch's loss (detached, on the CPU)."""

    name = "loss_recorder"

    def __init__(self) -> None:
        self.losses: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State, batch: Any, output: dltrain.StepOutput) -> None:
        assert output.loss is not None
        self.losses.append(
            (state.epoch, state.batch_idx, state.global_step, output.loss.detach().clone(), batch[1].clone())
        )


class SaveAndDie:
    """Saves a checkpoint by hand after training batch number ``at`` (counted in this
    process, from 1), then SIGKILLs the process: a preemption right after a save
    that the built-in plugin would never make (e.g. inside an accumulation group)."""

    name = "save_and_die"

    def __init__(self, at: int, directory: str) -> None:
        self.at, self.directory, self.seen = at, directory, 0

    @dltrain.hookimpl(wrapper=True)
    def on_train_batch_end(self, trainer: dltrain.Trainer) -> Generator[None, None, None]:
        result = yield
        self.seen += 1
        if self.seen == self.at:
            save_checkpoint(trainer.state_dict(), self.directory, trigger="manual")
            os.kill(os.getpid(), signal.SIGKILL)
        return result


def noisy_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([s[0] for s in samples])
    y = torch.stack([s[1] for s in samples])
    noise = 0.01 * random.random() + 0.01 * float(np.random.rand()) + 0.01 * torch.randn_like(x)
    return x + noise, y


def make_data(val: bool, noisy: bool = True) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(
        ds, batch_size=BATCH_SIZE, shuffle=True, collate_fn=noisy_collate if noisy else None
    )
    val_data = torch.utils.data.DataLoader(ds, batch_size=16) if val else None
    return train, val_data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--every-n-steps", type=int, default=0)
    p.add_argument("--every-n-epochs", type=int, default=1)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--keep-best", type=int, default=1)
    p.add_argument("--monitor", default=None)
    p.add_argument("--mode", default="min")
    p.add_argument("--val", action="store_true")
    p.add_argument("--resume", default=None)
    p.add_argument("--no-strict", action="store_true")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--plain-collate", action="store_true", help="no RNG use while loading batches")
    p.add_argument("--save-and-die-at", type=int, default=0, help="see SaveAndDie")
    p.add_argument("--sync-save", action="store_true", help="checkpoint.async_save=False")
    a = p.parse_args(argv)

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy machine
    torch.manual_seed(99)  # the model's initial weights (a resumed run overwrites them)
    model = nn.Sequential(nn.Linear(6, a.hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(a.hidden, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    train, val = make_data(a.val, noisy=not a.plain_collate)
    recorder = LossRecorder()
    trainer = dltrain.Trainer(
        max_epochs=a.max_epochs,
        max_steps=a.max_steps,
        accumulate_grad_batches=a.accum,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={
            "dir": a.dir,
            "every_n_steps": a.every_n_steps or None,
            "every_n_epochs": a.every_n_epochs or None,
            "keep_last": a.keep_last,
            "keep_best": a.keep_best,
            "monitor": a.monitor,
            "mode": a.mode,
            "async_save": not a.sync_save,
        },
        plugins=[recorder] + ([SaveAndDie(a.save_and_die_at, a.dir)] if a.save_and_die_at else []),
    )
    history = trainer.fit(
        model,
        train,
        optimizer=opt,
        loss_fn=nn.CrossEntropyLoss(),
        val_data=val,
        scheduler=sched,
        resume=a.resume,
        resume_strict=not a.no_strict,
    )
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "losses": recorder.losses,
            "history": history.epochs,
        },
        a.out,
    )


def run_child(argv: list[str], env: Mapping[str, str]) -> None:
    """Entry point of a test's child process (forked from a server that imported torch once)."""
    os.environ.update(env)
    main(argv)


if __name__ == "__main__":
    main()
