"""The tutorial's MNIST network, trained through dltrain.

Same network, loss, optimizer, data and printed lines as the tutorial (see
``plain_pytorch.py`` for its hand-written loop); the loop is dltrain's
``Trainer``, and the tutorial's per-epoch line comes from a small plugin.

    python examples/mnist/train.py --download             # the tutorial, 10 epochs
    python examples/mnist/train.py --loader memory        # same data, held in memory
    python examples/mnist/train.py --activation relu      # the MLP the tutorial meant
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
import torch.optim as optim
from mnist_cli import build_parser, run_main
from mnist_data import make_loaders
from mnist_model import Net

import dltrain


class TutorialEpochLine:
    """A plugin that prints the tutorial's line after each training epoch.

    ``Epoch 3: [600/600], Loss: 0.4537``: the epoch (1-based), the batches
    trained this epoch out of the loader's length, and the epoch's mean loss.
    """

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches

    @dltrain.hookimpl
    def on_train_epoch_end(self, state: dltrain.State, metrics: Mapping[str, float]) -> None:
        # state.epoch counts the epochs completed before this one, and
        # state.batch_idx is the index of the epoch's last batch.
        if state.is_global_zero:
            print(
                f"Epoch {state.epoch + 1}: [{state.batch_idx + 1}/{self.num_batches}], "
                f"Loss: {metrics['train_loss']:.4f}",
                flush=True,
            )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and test as the tutorial does, through dltrain; print the tutorial's lines.

    Returns:
        ``history`` (dltrain's per-epoch metrics), ``test_metrics`` (``test_loss``,
        ``test_accuracy`` as a fraction), ``correct``, ``total`` and
        ``accuracy`` (percent, ``100 * correct / total``).
    """
    # Seed, then create the model, as plain_pytorch.py does, so both start from
    # the same weights; the Trainer then gets seed=None so it does not reseed
    # between the model's initialisation and the first epoch's shuffle.
    dltrain.seed_everything(args.seed)
    model = Net(args.activation)
    optimizer = optim.SGD(model.parameters(), lr=args.lr)

    loaders = make_loaders(
        args.data_dir,
        download=args.download,
        loader=args.loader,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    trainer = dltrain.Trainer(
        max_epochs=args.epochs,
        device=args.device,
        seed=None,
        progress="off",  # the plugin prints the tutorial's lines instead
        run_dir=None,  # the tutorial writes no files
        # --checkpoint-dir (to come): checkpoint=dltrain.CheckpointConfig(dir=args.checkpoint_dir).
        plugins=[TutorialEpochLine(num_batches=len(loaders.train))],
    )
    # --resume (to come): trainer.fit(..., resume=args.resume).
    history = trainer.fit(model, loaders.train, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())

    test_metrics = trainer.test(model, loaders.test)
    total = loaders.test_size
    # test_accuracy is correct / total in float64: the count comes back exactly.
    correct = round(test_metrics["test_accuracy"] * total)
    accuracy = 100 * correct / total
    print(f"Accuracy of the network on the {total} test images: {accuracy} %", flush=True)
    return {
        "history": history,
        "test_metrics": test_metrics,
        "correct": correct,
        "total": total,
        "accuracy": accuracy,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run; the exit status (2 for missing data, a bad device, ...)."""
    parser = build_parser("Train the tutorial's MNIST network with dltrain.")
    # Options only train.py has (--checkpoint-dir, --resume, to come) are added here.
    return run_main(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
