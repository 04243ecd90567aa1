"""Elastic and multi-node torchrun jobs for ``tests/test_elastic.py``.

Every rank trains the same small job: the MNIST-shaped MLP on 96 synthetic
samples, a shuffling DataLoader (the ``distributed`` plugin gives each rank a
``DistributedSampler`` shard), SGD with momentum, 2 epochs of 6 steps.

Scenarios (``--scenario``):

* ``plain``: the job once; each rank writes ``rank<N>.pt`` (weights, world, and
  its node and local rank as torchrun numbered them). A plugin saves a
  checkpoint by hand at step 3, as the checkpoint guide shows: every rank calls
  ``trainer.state_dict()`` (a collective), rank 0 writes it. The job is then run
  again from that checkpoint (``resumed``: its weights).
* ``restart``: the job as a preemptible one, run under ``torchrun
  --max-restarts=1``: a checkpoint every 2 steps, ``resume="auto"``, and on the
  first attempt (``TORCHELASTIC_RESTART_COUNT=0``) rank ``--kill-rank`` kills
  itself with SIGKILL at the end of step ``--kill-step``, as a lost machine
  would; torchrun restarts the group, which resumes by itself. Before it, each
  rank runs the job uninterrupted once (first attempt only), for reference.
  Each rank writes ``reference<N>.pt`` and ``rank<N>.pt`` (weights, the
  attempt, the steps it trained).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dltrain
from dltrain.checkpoint import list_checkpoints, save_checkpoint

N_TRAIN, BATCH = 96, 8  # per rank with 2 processes: 6 batches an epoch


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(N_TRAIN, 784, generator=gen), torch.randint(0, 10, (N_TRAIN,), generator=gen)
    )


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


class KillAt:
    """SIGKILLs this process at the end of global step ``step`` if its rank is ``rank``, on the first attempt."""

    name = "kill_at"

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and state.rank == self.rank and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveByHand:
    """At the end of step ``step``: ``trainer.state_dict()`` on every rank, ``save_checkpoint`` on rank 0."""

    name = "save_by_hand"

    def __init__(self, directory: Path, step: int) -> None:
        self.directory, self.step = directory, step

    @dltrain.hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.global_step == self.step:
            payload = trainer.state_dict()  # every rank: the metrics plugin all-reduces in it
            if state.is_global_zero:
                save_checkpoint(payload, self.directory)


class Steps:
    """The global step after each training batch of this attempt."""

    name = "steps"

    def __init__(self) -> None:
        self.steps: list[int] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.steps.append(state.global_step)


def fit(*plugins: object, checkpoint_dir: Path | None = None, resume: str | None = None) -> dict[str, Any]:
    """The job; its weights, the world it saw and the steps it trained."""
    model = make_model()
    steps = Steps()
    checkpoint = {"dir": checkpoint_dir, "every_n_steps": 2, "keep_last": 10} if checkpoint_dir else None
    trainer = dltrain.Trainer(
        max_epochs=2,
        device="cpu",
        seed=1,
        progress="off",
        run_dir=None,
        checkpoint=checkpoint,
        plugins=[steps, *plugins],
    )
    trainer.fit(
        model,
        DataLoader(data(), batch_size=BATCH, shuffle=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        resume=resume,
    )
    state = trainer.state
    assert state is not None
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "world": (state.world_size, state.rank),
        "node": (int(os.environ.get("GROUP_RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))),
        "steps": steps.steps,
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", choices=("plain", "restart"), required=True)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-step", type=int, default=5)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if args.scenario == "plain":
        by_hand = args.out / "by_hand"
        result = fit(SaveByHand(by_hand, 3))
        (checkpoint,) = list_checkpoints(by_hand)
        result["resumed"] = fit(resume=str(checkpoint.payload_path))["weights"]
        torch.save(result, args.out / f"rank{rank}.pt")
        return 0
    reference = args.out / f"reference{rank}.pt"
    if not reference.exists():
        torch.save(fit(), reference)
    result = fit(KillAt(args.kill_rank, args.kill_step), checkpoint_dir=args.out / "ckpt", resume="auto")
    torch.save(result, args.out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
