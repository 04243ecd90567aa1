"""The tutorial's MNIST network, trained through dltrain.

Same network, loss, optimizer, data and printed lines as the tutorial (see
``plain_pytorch.py`` for its hand-written loop); the loop is dltrain's
``Trainer``, and the tutorial's per-epoch line comes from a small plugin.

    python examples/mnist/train.py --download             # the tutorial, 10 epochs
    python examples/mnist/train.py --loader memory        # same data, held in memory
    python examples/mnist/train.py --activation relu      # the MLP the tutorial meant
    python examples/mnist/train.py --checkpoint-dir ckpt --resume auto   # preemptible: rerun as is
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator, Mapping, Sequence
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

    @dltrain.hookimpl(wrapper=True)
    def prepare_data(self, data: Any, phase: dltrain.Phase) -> Generator[None, Any, Any]:
        # Under torchrun each process trains on its shard: count the batches it gets.
        result = yield
        if phase is dltrain.Phase.TRAIN:
            self.num_batches = len(data if result is None else result)
        return result

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
    checkpoint_dir = getattr(args, "checkpoint_dir", None)
    trainer = dltrain.Trainer(
        max_epochs=args.epochs,
        device=args.device,
        seed=None,
        progress="off",  # the plugin prints the tutorial's lines instead
        run_dir=None,  # the tutorial writes no files
        # A checkpoint after every epoch (and at Ctrl-C or SIGTERM) when asked for.
        checkpoint={"dir": checkpoint_dir} if checkpoint_dir else None,
        plugins=[TutorialEpochLine(num_batches=len(loaders.train))],
    )
    history = trainer.fit(
        model,
        loaders.train,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        resume=getattr(args, "resume", None),
    )

    test_metrics = trainer.test(model, loaders.test)
    total = loaders.test_size
    # test_accuracy is correct / total in float64: the count comes back exactly.
    correct = round(test_metrics["test_accuracy"] * total)
    accuracy = 100 * correct / total
    if trainer.state is not None and trainer.state.is_global_zero:  # one line under torchrun
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
    return run_main(run, build_train_parser().parse_args(argv))


def build_train_parser() -> argparse.ArgumentParser:
    """The shared options, plus those only train.py has: checkpoints and resume."""
    parser = build_parser("Train the tutorial's MNIST network with dltrain.")
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save a checkpoint after every epoch (and on Ctrl-C or SIGTERM) in this directory",
    )
    ckpt.add_argument(
        "--resume",
        default=None,
        metavar="auto|last|best|PATH",
        help="continue from a checkpoint: 'auto' (the newest in --checkpoint-dir if there is one, else "
        "start fresh: the same command for every run of a requeued job), 'last' in --checkpoint-dir, "
        "or a checkpoint's path; --epochs counts the epochs of the whole run",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
