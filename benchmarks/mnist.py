"""The MNIST example three ways: dltrain in memory, dltrain over torchvision, a plain loop.

All three train the example's ``Net`` (the tutorial's 784-128-64-10 MLP)
from the same initial weights with SGD (lr 0.01), batch size 100, shuffled,
and then test it on the test set:

- dltrain, ``--loader memory``: ``Trainer.fit`` over ``InMemoryLoader.from_dataset``
  (the images converted once, exactly as ``ToTensor`` does);
- dltrain, ``--loader torchvision``: ``Trainer.fit`` over the tutorial's pipeline,
  a shuffled ``DataLoader`` over ``torchvision.datasets.MNIST`` with ``ToTensor()``;
- plain loop, in memory: the loop a careful PyTorch user writes, over the same
  in-memory batches (``_common.plain_epoch``).

Epoch times are medians over the epochs (dltrain's are timed from the
``on_train_epoch_start`` to the ``on_train_epoch_end`` hook). The plain loop's
epochs run interleaved with dltrain's in-memory ones: after each dltrain epoch
(outside its timed window) comes one plain epoch, and the ratio to the plain
loop is the median of these pairs' ratios, so drift in the machine's speed
cancels. The torchvision run comes after, on its own. Without the real
files in ``--data-dir``, random MNIST-shaped IDX files are written to a
temporary folder, so every pipeline runs as it would; the accuracy is then
chance (~10 %) and says nothing.

    python benchmarks/mnist.py --data-dir <dir holding MNIST/raw>
    python benchmarks/mnist.py --quick          # seconds; a smoke test, not a measurement

The last line is ``RESULT speedup_vs_torchvision=<x> ratio_vs_plain=<y> accuracy=<percent>``:
dltrain's epoch over torchvision / in memory, dltrain in memory / the plain loop,
and dltrain's test accuracy (in memory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from _common import (
    EpochTimer,
    default_data_dir,
    example_net,
    fmt,
    has_mnist,
    has_torchvision,
    median,
    mnist_tensors,
    plain_accuracy,
    plain_epoch,
    table,
    write_fake_mnist,
)
from torch import nn

import dltrain
from dltrain.data import InMemoryLoader

BATCH_SIZE = 100
LR = 0.01


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return example_net()()


def run_dltrain(
    train_data: Any, test_data: Any, *, epochs: int, seed: int, beside: PlainLoop | None = None
) -> tuple[list[float], float]:
    """Epoch times and test accuracy (percent) of the example's Trainer set-up.

    With ``beside``, one epoch of that plain loop runs after each of dltrain's.
    """
    model = _model(seed)
    timer = EpochTimer(after_epoch=beside.epoch if beside is not None else None)
    trainer = dltrain.Trainer(
        max_epochs=epochs,
        device="cpu",
        seed=None,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        plugins=[timer],
    )
    trainer.fit(
        model,
        train_data,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        loss_fn=nn.CrossEntropyLoss(),
    )
    return timer.times, 100.0 * trainer.test(model, test_data)["test_accuracy"]


class PlainLoop:
    """The hand-written loop, one epoch per :meth:`epoch` call, timing each."""

    def __init__(self, train_data: Any, *, seed: int) -> None:
        self.model = _model(seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loss_fn = nn.CrossEntropyLoss()
        self.train_data = train_data
        self.times: list[float] = []

    def epoch(self) -> None:
        start = time.perf_counter()
        plain_epoch(self.model, self.optimizer, self.loss_fn, self.train_data)
        self.times.append(time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each variant")
    parser.add_argument("--quick", action="store_true", help="2,000 images, 1 epoch: seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffling")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one keeps timings stable on a shared machine",
    )
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    if epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train, n_test = (2000, 500) if args.quick else (None, None)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        real = has_mnist(data_dir)
        if not real:
            data_dir = str(write_fake_mnist(tmp, n_train or 60000, n_test or 10000, seed=args.seed))
        x, y, source = mnist_tensors(data_dir, train=True, limit=n_train)
        tx, ty, _ = mnist_tensors(data_dir, train=False, limit=n_test)
        if not real and has_torchvision():
            source = f"synthetic, random MNIST-shaped IDX files (no MNIST in {args.data_dir})"
        memory_train = InMemoryLoader(x, y, batch_size=BATCH_SIZE, shuffle=True, seed=args.seed)
        memory_test = InMemoryLoader(tx, ty, batch_size=BATCH_SIZE)

        # The plain loop gets its own loader with the same seed: both see the same batches.
        plain = PlainLoop(
            InMemoryLoader(x, y, batch_size=BATCH_SIZE, shuffle=True, seed=args.seed), seed=args.seed
        )
        results: dict[str, tuple[list[float], float] | str] = {}
        results["dltrain, --loader memory"] = run_dltrain(
            memory_train, memory_test, epochs=epochs, seed=args.seed, beside=plain
        )
        results["plain loop, in memory"] = (plain.times, plain_accuracy(plain.model, memory_test))
        if has_torchvision():
            results["dltrain, --loader torchvision"] = run_dltrain(
                *_torchvision_loaders(data_dir, n_train, n_test), epochs=epochs, seed=args.seed
            )
        else:
            results["dltrain, --loader torchvision"] = "torchvision not installed"

    epoch_s = {k: median(v[0]) for k, v in results.items() if not isinstance(v, str)}
    base = epoch_s["dltrain, --loader memory"]
    rows = []
    for name, value in results.items():
        if isinstance(value, str):
            rows.append([name, value, "", "", ""])
            continue
        _, accuracy = value
        steps = len(memory_train)
        rows.append(
            [
                name,
                f"{epoch_s[name]:.3f}",
                f"{1e3 * epoch_s[name] / steps:.3f}",
                f"{epoch_s[name] / base:.3f}",
                f"{accuracy:.2f}",
            ]
        )
    speedup = epoch_s.get("dltrain, --loader torchvision", float("nan")) / base
    dltrain_times = results["dltrain, --loader memory"][0]
    ratio = median([t / b for t, b in zip(dltrain_times, plain.times, strict=True)])
    print(f"data: {source}; {len(x)} training, {len(tx)} test images, batch {BATCH_SIZE}")
    print(
        f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads; {epochs} epochs each, "
        "median epoch" + ("; --quick: not a measurement" if args.quick else "")
    )
    print()
    print(table(["variant", "epoch s", "ms/step", "time vs dltrain memory", "test accuracy %"], rows))
    print()
    headline = results["dltrain, --loader memory"]
    assert not isinstance(headline, str)
    print(
        f"RESULT speedup_vs_torchvision={fmt(speedup, 3)} ratio_vs_plain={fmt(ratio, 4)} "
        f"accuracy={headline[1]:.2f}"
    )
    return 0


def _torchvision_loaders(data_dir: str, n_train: int | None, n_test: int | None) -> tuple[Any, Any]:
    """The tutorial's pipeline: shuffled DataLoaders over torchvision MNIST with ToTensor()."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    train: Any = datasets.MNIST(data_dir, train=True, download=False, transform=transforms.ToTensor())
    test: Any = datasets.MNIST(data_dir, train=False, download=False, transform=transforms.ToTensor())
    if n_train is not None:
        train = Subset(train, range(n_train))
    if n_test is not None:
        test = Subset(test, range(n_test))
    return DataLoader(train, batch_size=BATCH_SIZE, shuffle=True), DataLoader(test, batch_size=BATCH_SIZE)


if __name__ == "__main__":
    sys.exit(main())
