"""A data-parallel job of which one process is preempted; run under torchrun by ``tests/test_failures.py``.

Rank ``--term-rank`` sends itself SIGTERM at the end of its ``--term-after``-th
training batch. Each rank writes ``rank<N>.pt`` into ``--out``: the global
step after each of its training batches, the stop reason, and how ``fit``
ended (``"returned"`` or ``"SystemExit(<code>)"``).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model


class TermAfter:
    """Sends SIGTERM to this process at the end of its ``n``-th training batch."""

    name = "term_after"

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    @dltrain.hookimpl
    def on_train_batch_end(self) -> None:
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


class Steps:
    """Records ``state.global_step`` after each training batch."""

    name = "steps"

    def __init__(self) -> None:
        self.steps: list[int] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.steps.append(state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--term-rank", type=int, default=1)
    parser.add_argument("--term-after", type=int, default=3)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])

    steps = Steps()
    plugins: list[object] = [steps]
    if rank == args.term_rank:
        plugins.append(TermAfter(args.term_after))
    out = Path(args.out)
    trainer = dltrain.Trainer(
        max_epochs=3,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        checkpoint={"dir": out / "ckpt", "every_n_epochs": None},
        stop_check_every_n_steps=1,  # the stop lands one step after the signal: a step the test can name
        plugins=plugins,
    )
    model = tiny_model()
    ended = "returned"
    try:
        trainer.fit(
            model,
            tiny_loader(batch_size=8),  # 4 batches an epoch per process
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
    except SystemExit as exit:
        ended = f"SystemExit({exit.code})"
        raise
    finally:
        reason = trainer.state.stop_reason if trainer.state is not None else None
        torch.save({"steps": steps.steps, "reason": reason, "ended": ended}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
