"""Command-line options shared by ``train.py`` and ``plain_pytorch.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from gan_data import default_data_dir

from dltrain.errors import DltrainError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options both scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="directory holding MNIST/raw/ (default: $DLTRAIN_MNIST_DIR, else ./data)",
    )
    parser.add_argument("--subset", type=_positive_int, default=None, help="train on the first N images only")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default 64)")
    parser.add_argument(
        "--steps", type=_positive_int, default=300, help="optimizer steps of each network (default 300)"
    )
    parser.add_argument(
        "--width", type=_positive_int, default=16, help="channels of the first layers (default 16)"
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the noise and the data order")
    parser.add_argument(
        "--log-every", type=_positive_int, default=50, help="print the mean losses every N steps"
    )
    parser.add_argument("--save", default=None, help="write the final networks and optimizers to this file")
    return parser


def run_main(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> int:
    """Parse, run, and turn a dltrain error into a one-line message and exit status 2."""
    args = parser.parse_args()
    try:
        run(args)
    except DltrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
