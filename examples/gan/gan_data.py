"""MNIST for the GAN: the training images scaled to [-1, 1] (the generator's Tanh range), in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from dltrain.errors import DataError

#: The environment variable that names the MNIST directory (as for examples/mnist).
DATA_DIR_ENV = "DLTRAIN_MNIST_DIR"
_FILES = ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte")


def default_data_dir() -> str:
    """``$DLTRAIN_MNIST_DIR``, else ``./data``."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def mnist_images(data_dir: str | Path, limit: int | None = None) -> torch.Tensor:
    """The training images as float32 ``(N, 1, 28, 28)`` in [-1, 1] (the first ``limit`` of them).

    Raises:
        DataError: the IDX files are not in ``data_dir`` (the message names them and the fix).
    """
    root = Path(data_dir)
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"MNIST not found in {str(root)!r} ({root.resolve()}): expected {', '.join(missing)}. Point "
            f"--data-dir (or ${DATA_DIR_ENV}) at a directory that holds MNIST/raw/ (examples/mnist/train.py "
            f"--download fetches it)"
        )
    from torchvision.datasets import MNIST

    images = MNIST(str(root), train=True, download=False).data[:limit]
    return (images.float() / 255.0).sub_(0.5).div_(0.5).unsqueeze(1)


def make_loader(
    images: torch.Tensor, batch_size: int = 64, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """Shuffled batches of ``(images,)``, the order drawn from a generator of its own (seeded)."""
    return DataLoader(
        TensorDataset(images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
