"""The tutorial's own training loop, made runnable: the baseline dltrain is measured against.

The tutorial's code with what it leaves out added (the imports, ``net = Net()``)
and its constants turned into options. ``train.py`` trains the same network
through dltrain; with the same ``--seed`` and ``--loader`` both print the same
losses and accuracy.

    python examples/mnist/plain_pytorch.py --download          # the tutorial, 10 epochs
    python examples/mnist/plain_pytorch.py --loader memory     # same data, held in memory

Benchmarks import :func:`run`, which returns the numbers it printed and the
time each epoch took.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.optim as optim
from mnist_cli import build_parser, run_main
from mnist_data import make_loaders
from mnist_model import Net

from dltrain.errors import DeviceError


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch, as ``dltrain.seed_everything`` does."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; otherwise the device named, if it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(
            f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count()),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not available:
        raise DeviceError(f"--device {name!r} is not available on this machine; use --device auto or cpu")
    return device


def run(args: argparse.Namespace, *, echo: bool = True) -> dict[str, Any]:
    """Train and test as the tutorial does; print its lines when ``echo``.

    Returns:
        ``train_loss`` (mean batch loss per epoch), ``epoch_time_s`` (seconds
        of each epoch's training loop), ``correct``, ``total``, ``accuracy``
        (percent, ``100 * correct / total``) and ``lines`` (what it printed).
    """
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if echo:
            print(line, flush=True)

    # Seed, then create the model, then the loaders: the weights come from the
    # first draws of torch's generator and each epoch's shuffle from the next
    # ones. train.py consumes the generator in the same order.
    seed_everything(args.seed)
    device = resolve_device(args.device)
    net = Net(args.activation).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=args.lr)

    loaders = make_loaders(
        args.data_dir,
        download=args.download,
        loader=args.loader,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    train_data, test_data = loaders.train, loaders.test

    train_loss: list[float] = []
    epoch_time_s: list[float] = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        running_loss = 0.0
        seen = 0
        for data in train_data:
            inputs, labels = data
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += 1
        epoch_time_s.append(time.perf_counter() - start)
        train_loss.append(running_loss / len(train_data))
        say(f"Epoch {epoch + 1}: [{seen}/{len(train_data)}], Loss: {train_loss[-1]:.4f}")

    correct = 0
    total = 0
    with torch.no_grad():
        for data in test_data:
            images, labels = data
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    accuracy = 100 * correct / total
    say(f"Accuracy of the network on the {total} test images: {accuracy} %")
    return {
        "train_loss": train_loss,
        "epoch_time_s": epoch_time_s,
        "correct": correct,
        "total": total,
        "accuracy": accuracy,
        "lines": lines,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run; the exit status (2 for missing data or a bad device)."""
    parser = build_parser("Train the tutorial's MNIST network with its hand-written loop.")
    return run_main(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
