"""Train a tiny model with checkpoints, as a preemptible job; run by ``tests/test_failures.py``.

``--term-after N`` sends this process SIGTERM (a real signal, as a cluster
scheduler sends) at the end of its N-th training batch. Whatever happens,
the global step of every batch this process trained, and the final
parameters when fit returned, are written to ``--out``. Exit status: 0 when
fit returned, 143 after SIGTERM (fit raises ``SystemExit(143)``).
"""

from __future__ import annotations

import argparse
import os
import signal

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
    """Records ``state.global_step`` after each training batch this process ran."""

    name = "steps"

    def __init__(self) -> None:
        self.steps: list[int] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.steps.append(state.global_step)


def loader() -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    """64 samples, shuffled with the global RNG (which checkpoints capture), 8 batches an epoch."""
    data = tiny_loader().dataset
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--term-after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    steps = Steps()
    plugins: list[object] = [steps]
    if args.term_after:
        plugins.append(TermAfter(args.term_after))
    trainer = dltrain.Trainer(
        max_epochs=3,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": args.ckpt, "every_n_epochs": None},
        plugins=plugins,
    )
    model = tiny_model()
    result: dict[str, object] = {"steps": steps.steps}
    try:
        trainer.fit(
            model,
            loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            loss_fn=torch.nn.CrossEntropyLoss(),
            resume="last" if args.resume else None,
        )
        result["params"] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
