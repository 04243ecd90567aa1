"""What the benchmark scripts share: data, the plain loop, timing and the table.

Not a public module: the scripts import it from their own folder.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dltrain

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO / "examples" / "mnist"

#: The environment variable that points at a directory holding MNIST/raw/ (as for the example).
DATA_DIR_ENV = "DLTRAIN_MNIST_DIR"

RAW_FILES = (
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)


def default_data_dir() -> str:
    """``$DLTRAIN_MNIST_DIR``, else ``data``."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def has_mnist(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds the four MNIST IDX files in torchvision's layout."""
    return all((Path(data_dir) / f).is_file() for f in RAW_FILES)


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def example_net() -> type[nn.Module]:
    """The MNIST example's ``Net`` (the tutorial's 784-128-64-10 MLP)."""
    if str(EXAMPLE_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_DIR))
    from mnist_model import Net

    net: type[nn.Module] = Net
    return net


def write_fake_mnist(root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images and labels as MNIST IDX files under ``root/MNIST/raw``.

    So the torchvision pipeline (PIL image, ``ToTensor``) runs as it would on
    the real files when they are not there.
    """
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for split, count in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=gen)
        header = bytes([0, 0, 8, 3]) + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        label_header = bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(label_header + labels.numpy().tobytes())
    return Path(root)


def mnist_tensors(
    data_dir: str | Path, *, train: bool, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST as ``(images (N,1,28,28) float32, labels (N,) int64, where from)``.

    Real MNIST (through torchvision, converted exactly as ``ToTensor`` does)
    when the files and torchvision are there, else random data of the same shape.
    """
    n = limit if limit is not None else (60000 if train else 10000)
    if has_mnist(data_dir) and has_torchvision():
        from torchvision import datasets, transforms

        from dltrain.data import InMemoryLoader

        ds = datasets.MNIST(str(data_dir), train=train, download=False, transform=transforms.ToTensor())
        x, y = InMemoryLoader.from_dataset(ds, batch_size=1).tensors
        return x[:n], y[:n], f"real MNIST from {data_dir}"
    gen = torch.Generator().manual_seed(1 if train else 2)
    why = "no torchvision" if has_mnist(data_dir) else f"no MNIST in {data_dir}"
    x = torch.rand(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y, f"synthetic, MNIST-shaped random data ({why})"


def plain_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batches: Iterable[Any]
) -> float:
    """One epoch of the loop a careful PyTorch user writes; returns the mean batch loss.

    The loss is summed on the device (``running += loss.detach()``) and read
    once at the end, as dltrain's metrics plugin does: the tutorial's
    ``running_loss += loss.item()`` would add a host sync per step to the
    baseline, and so flatter dltrain.
    """
    model.train()
    running = None
    steps = 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        running = loss.detach() if running is None else running + loss.detach()
        steps += 1
    assert running is not None
    return float(running) / steps


def plain_accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Test accuracy in percent."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return 100.0 * correct / total


class EpochTimer:
    """A plugin that times each training epoch, from its start hook to its end hook.

    Args:
        after_epoch: Called after each epoch's time is taken (outside the timed
            window): e.g. an epoch of another variant, so the two run side by side.
    """

    name = "bench_epoch_timer"

    def __init__(self, after_epoch: Callable[[], None] | None = None) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._after_epoch = after_epoch

    @dltrain.hookimpl(tryfirst=True)
    def on_train_epoch_start(self) -> None:
        self._start = time.perf_counter()

    @dltrain.hookimpl(trylast=True)
    def on_train_epoch_end(self) -> None:
        self.times.append(time.perf_counter() - self._start)
        if self._after_epoch is not None:
            self._after_epoch()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(
    values: Sequence[float], level: float = 0.9, resamples: int = 2000
) -> tuple[float, float]:
    """A bootstrap interval for the median of ``values`` (seeded: the same values give the same
    interval). It treats the values as independent, which neighbouring epochs only nearly are."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return medians[tail], medians[-tail - 1]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"
