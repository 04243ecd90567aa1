"""Command-line options and error handling shared by ``train.py`` and ``plain_pytorch.py``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

from mnist_data import LOADERS, default_data_dir
from mnist_model import ACTIVATIONS

from dltrain.errors import DltrainError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _device(text: str) -> str:
    # The names dltrain.TrainerConfig accepts; checked here so a typo is a usage error.
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return text


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options both scripts take, with the tutorial's values as defaults."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="directory that holds MNIST/raw/ (default from $DLTRAIN_MNIST_DIR, else ./data)",
    )
    data.add_argument(
        "--download", action="store_true", help="download MNIST into --data-dir if it is missing"
    )
    data.add_argument(
        "--loader",
        choices=LOADERS,
        default="torchvision",
        help="torchvision: the tutorial's DataLoader with ToTensor(); "
        "memory: the same tensors held in memory by dltrain.data.InMemoryLoader (~8x faster)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=10, help="epochs to train")
    train.add_argument("--batch-size", type=_positive_int, default=100, help="samples per batch")
    train.add_argument("--lr", type=_positive_float, default=0.01, help="SGD learning rate")
    train.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="none",
        help="none: the tutorial's network (linear); relu: ReLU between the layers",
    )
    train.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and the shuffling; the same seed gives the same numbers "
        "in train.py and plain_pytorch.py",
    )
    return parser


def run_main(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Call ``run(args)``; report dltrain's errors (bad data, device, ...) in one line.

    Returns the exit status: 0, 2 for an error the user can fix, 130 on Ctrl-C.
    """
    try:
        run(args)
    except DltrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
