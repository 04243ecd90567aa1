"""The data factory ``config.yaml`` names: one split of MNIST as batches, for ``dltrain fit``.

``dltrain fit --config examples/mnist/config.yaml`` puts this folder on the
import path, so the run file can name ``mnist_run:mnist_batches`` and
``mnist_model:Net`` by import path.
"""

from __future__ import annotations

from typing import Any, Literal

from mnist_data import RUN_FILE_FIX, default_data_dir, load_mnist


def mnist_batches(
    split: Literal["train", "test"] = "train",
    data_dir: str | None = None,
    batch_size: int = 100,
    loader: Literal["torchvision", "memory"] = "memory",
    download: bool = False,
    seed: int = 0,
) -> Any:
    """The batches of one MNIST split, shuffled for training.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: The folder that holds ``MNIST/raw/``; None: ``$DLTRAIN_MNIST_DIR``, else ``./data``.
        batch_size: Samples per batch.
        loader: ``"memory"``: the images converted once and served from memory
            (fast); ``"torchvision"``: the tutorial's ``DataLoader`` with ``ToTensor()``.
        download: Fetch the files when they are missing (needs internet).
        seed: Seed of the training shuffle of the memory loader.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not 'train' or 'test'")
    train = split == "train"
    dataset = load_mnist(data_dir or default_data_dir(), train=train, download=download, fix=RUN_FILE_FIX)
    if loader == "torchvision":
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=batch_size, shuffle=train)
    if loader != "memory":
        raise ValueError(f"loader {loader!r} is not 'memory' or 'torchvision'")
    from dltrain.data import InMemoryLoader

    return InMemoryLoader.from_dataset(dataset, batch_size=batch_size, shuffle=train, seed=seed)
