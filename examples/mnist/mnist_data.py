"""Loading MNIST for the example scripts, with errors people can act on.

Two ways to feed the same data:

- ``"torchvision"``: the tutorial's pipeline, ``torchvision.datasets.MNIST``
  with ``transforms.ToTensor()`` in a shuffled ``DataLoader``. Every image goes
  through PIL and ``ToTensor`` every epoch, which costs most of the epoch.
- ``"memory"``: the same images converted once to one float32 tensor (exactly
  what ``ToTensor`` returns: ``uint8 / 255`` shaped ``(N, 1, 28, 28)``) and
  served in shuffled batches by :class:`dltrain.data.InMemoryLoader`.

Both read the original IDX files in torchvision's layout,
``<data dir>/MNIST/raw/train-images-idx3-ubyte`` and its three siblings.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dltrain.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import MNIST

LoaderKind = Literal["torchvision", "memory"]
LOADERS: tuple[str, ...] = ("torchvision", "memory")

#: The environment variable that names the MNIST directory (the default of ``--data-dir``); the tests
#: and the benchmarks read the same one.
DATA_DIR_ENV = "DLTRAIN_MNIST_DIR"

#: The IDX files of each split, relative to the data directory.
RAW_FILES: dict[bool, tuple[str, str]] = {
    True: ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"),
    False: ("MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"),
}

# Without a timeout, urllib can wait minutes on a network that drops packets.
_DOWNLOAD_TIMEOUT_S = 30.0


def default_data_dir() -> str:
    """The default of ``--data-dir``: ``$DLTRAIN_MNIST_DIR``, else ``./data``."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def missing_files(data_dir: str | Path, train: bool | None = None) -> list[str]:
    """The IDX files of a split (both splits when ``train`` is None) not in ``data_dir``."""
    splits = (True, False) if train is None else (train,)
    root = Path(data_dir)
    return [f for s in splits for f in RAW_FILES[s] if not (root / f).is_file()]


def _describe(data_dir: Path) -> str:
    absolute = data_dir.resolve()
    return f"{str(data_dir)!r}" + (f" ({absolute})" if str(absolute) != str(data_dir) else "")


#: What to do about missing files, said in the terms of the command that was run: the scripts'
#: options, or the run file of ``dltrain fit``.
SCRIPT_FIX = (
    "Run again with --download to fetch them (about 12 MB, needs internet), "
    f"or point --data-dir (or ${DATA_DIR_ENV}) at a directory that holds MNIST/raw/."
)
RUN_FILE_FIX = (
    f"Set ${DATA_DIR_ENV} (or data_dir in the data's init_args) to a directory that holds MNIST/raw/, "
    "or fetch them (about 12 MB, needs internet) with download: true in the init_args of data.train "
    "and data.val, e.g. --data.train.init_args.download true --data.val.init_args.download true."
)


def _not_found_message(data_dir: Path, missing: Iterable[str], fix: str = SCRIPT_FIX) -> str:
    where = _describe(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        problem = f"the MNIST data directory {where} is a file, not a directory"
    elif not data_dir.exists():
        problem = f"the MNIST data directory {where} does not exist"
    else:
        problem = f"MNIST data not found in {where}"
    return f"{problem}; expected the IDX files {', '.join(missing)} in it. {fix}"


def _download(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        # download=True fetches all four files; train=False skips parsing the big one.
        MNIST(str(data_dir), train=False, download=True)
    except Exception as exc:
        # torchvision's message spans lines (one per mirror tried): make it one.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 400:
            reason = reason[:400] + "..."
        raise DataError(
            f"downloading MNIST into {_describe(data_dir)} failed: {reason}. "
            "Check the network connection and that the directory is writable, or copy "
            f"the four IDX files into {data_dir / 'MNIST' / 'raw'} yourself "
            "and run without --download."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def load_mnist(data_dir: str | Path, train: bool, download: bool = False, fix: str = SCRIPT_FIX) -> MNIST:
    """The tutorial's dataset: ``torchvision.datasets.MNIST`` with ``ToTensor()``.

    Args:
        data_dir: The directory that holds (or will hold) ``MNIST/raw/``.
        train: The 60,000 training images (True) or the 10,000 test images (False).
        download: Fetch the files when they are missing.
        fix: What the error for missing files tells people to do (:data:`SCRIPT_FIX`
            or :data:`RUN_FILE_FIX`).

    Raises:
        DataError: The files are missing and ``download`` is False, the
            download failed, or a file is not a valid MNIST IDX file.
    """
    from torchvision import datasets, transforms

    root = Path(data_dir)
    missing = missing_files(root, train)
    if missing and download:
        _download(root)
        missing = missing_files(root, train)
    if missing:
        raise DataError(_not_found_message(root, missing, fix))
    try:
        dataset = datasets.MNIST(str(root), train=train, download=False, transform=transforms.ToTensor())
    except Exception as exc:  # torchvision reports a bad file with a bare assert
        raise DataError(
            f"could not read the MNIST files {', '.join(RAW_FILES[train])} in {_describe(root)} "
            f"({type(exc).__name__}: {exc}); they are truncated or not MNIST IDX files. "
            "Delete them and run again with --download."
        ) from exc
    if len(dataset.data) != len(dataset.targets):
        raise DataError(
            f"the MNIST files {', '.join(RAW_FILES[train])} in {_describe(root)} hold "
            f"{len(dataset.data)} images but {len(dataset.targets)} labels; "
            "delete them and run again with --download."
        )
    return dataset


@dataclass(frozen=True)
class MnistLoaders:
    """The loaders of one run, and the number of test images."""

    train: Any
    test: Any
    test_size: int


def make_loaders(
    data_dir: str | Path,
    *,
    download: bool = False,
    loader: LoaderKind = "torchvision",
    batch_size: int = 100,
    seed: int | None = None,
) -> MnistLoaders:
    """The training and test loaders of the tutorial, both shuffled, batch size 100.

    With ``loader="torchvision"`` the shuffling draws from torch's global random
    generator at the start of each epoch, as in the tutorial; seed it first.
    With ``loader="memory"`` the shuffling comes from ``seed`` alone.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader {loader!r} is not one of {LOADERS}")
    # Check both splits up front so one message lists every missing file.
    root = Path(data_dir)
    if download and missing_files(root):
        _download(root)
    missing = missing_files(root)
    if missing:
        raise DataError(_not_found_message(root, missing))
    train_set = load_mnist(root, train=True)
    test_set = load_mnist(root, train=False)
    if loader == "torchvision":
        from torch.utils.data import DataLoader

        return MnistLoaders(
            train=DataLoader(train_set, batch_size=batch_size, shuffle=True),
            test=DataLoader(test_set, batch_size=batch_size, shuffle=True),
            test_size=len(test_set),
        )
    from dltrain.data import InMemoryLoader

    # from_dataset converts a ToTensor() MNIST in one operation, bit for bit
    # what ToTensor gives each image, so both loaders train on the same values.
    return MnistLoaders(
        train=InMemoryLoader.from_dataset(
            train_set, batch_size=batch_size, shuffle=True, seed=0 if seed is None else seed
        ),
        # Order does not change accuracy, so the test set is not shuffled.
        test=InMemoryLoader.from_dataset(test_set, batch_size=batch_size, shuffle=False),
        test_size=len(test_set),
    )
