"""Train a tiny model with checkpoints, as a preemptible job; run by ``tests/test_failures.py``.

``--term-after N`` sends this process SIGTERM (a real signal, as a cluster
scheduler sends) at the end of its N-th training batch; ``--signal`` names
another one (``SIGUSR1``, added to ``preemption_signals``). ``--again WHEN``
sends it a second time: ``now`` (right after the first), ``save`` (during the
final checkpoint's ``state_dict``), ``teardown`` (from an ``on_teardown`` that
runs after the signals plugin put its handlers back) or ``exit`` (after fit
raised, while the script writes its results). Whatever happens,
the global step of every batch this process trained, and the final
parameters when fit returned, are written to ``--out``. Exit status: 0 when
fit returned, 128 + the signal's number after it (fit raises ``SystemExit``).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model


class TermAfter:
    """Sends ``sig`` to this process at the end of its ``n``-th training batch, and maybe again later."""

    name = "term_after"

    def __init__(self, n: int, sig: signal.Signals, again: str | None) -> None:
        self.n, self.sig, self.again, self.seen = n, sig, again, 0

    @dltrain.hookimpl
    def on_train_batch_end(self) -> None:
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), self.sig)
            if self.again == "now":
                os.kill(os.getpid(), self.sig)

    @dltrain.hookimpl
    def state_dict(self) -> None:
        if self.again == "save" and self.seen >= self.n:
            os.kill(os.getpid(), self.sig)

    @dltrain.hookimpl
    def on_teardown(self) -> None:
        if self.again == "teardown":
            os.kill(os.getpid(), self.sig)


class Steps:
    """Records ``state.global_step`` after each training batch this process ran; creates ``ready``
    (a file) after the first, and sleeps ``slow`` seconds after each (for signals from outside)."""

    name = "steps"

    def __init__(self, ready: str | None = None, slow: float = 0.0) -> None:
        self.steps: list[int] = []
        self.ready, self.slow = ready, slow

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.steps.append(state.global_step)
        if self.ready and len(self.steps) == 1:
            Path(self.ready).touch()
        time.sleep(self.slow)


def loader() -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    """64 samples, shuffled with the global RNG (which checkpoints capture), 8 batches an epoch."""
    data = tiny_loader().dataset
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--term-after", type=int, default=0)
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--again", choices=("now", "save", "teardown", "exit"), default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ready", default=None, help="a file to create after the first batch")
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each batch")
    args = parser.parse_args()
    sig = signal.Signals[args.signal]

    steps = Steps(args.ready, args.slow)
    plugins: list[object] = [steps]
    if args.term_after:
        plugins.append(TermAfter(args.term_after, sig, args.again))
    trainer = dltrain.Trainer(
        max_epochs=3,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": args.ckpt, "every_n_epochs": None},
        preemption_signals=tuple(dict.fromkeys(("SIGTERM", sig.name))),
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
        if args.again == "exit":
            os.kill(os.getpid(), sig)
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
