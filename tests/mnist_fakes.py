"""Small, learnable stand-ins for the MNIST files, in the original IDX format.

``write_fake_mnist(root)`` writes ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
exactly as torchvision expects them (big-endian header, magic numbers 2051 for
images and 2049 for labels, then one unsigned byte per pixel or label), so the
example's real loading code runs end to end without the 55 MB data set.

Each image of class ``c`` is a bright 7x7 block at the ``c``-th of ten
positions, on dim noise: a linear model learns it in a few epochs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SIDE = 28
NUM_CLASSES = 10
_BLOCK = 7
# Top-left corners of the ten class blocks: a 4x4 grid of 7x7 cells, first ten cells.
_CORNERS = [(_BLOCK * (k // 4), _BLOCK * (k % 4)) for k in range(NUM_CLASSES)]


def fake_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, ``(n, 28, 28)``) and labels (uint8, ``(n,)``), balanced, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=gen)].to(torch.uint8)
    images = torch.randint(0, 64, (n, SIDE, SIDE), generator=gen, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        r, c = _CORNERS[label]
        images[i, r : r + _BLOCK, c : c + _BLOCK] = torch.randint(
            192, 256, (_BLOCK, _BLOCK), generator=gen, dtype=torch.uint8
        )
    return images, labels


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """Write uint8 images ``(n, rows, cols)`` as an IDX3 file."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", IMAGES_MAGIC, n, rows, cols) + images.numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    """Write uint8 labels ``(n,)`` as an IDX1 file."""
    path.write_bytes(struct.pack(">II", LABELS_MAGIC, len(labels)) + labels.numpy().tobytes())


def write_fake_mnist(root: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """Write a fake MNIST in torchvision's layout under ``root``; return ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, split_seed in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = fake_images(n, split_seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root
