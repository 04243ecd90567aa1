"""Loaders for data that fits in memory: :class:`InMemoryLoader`.

A ``DataLoader`` over a map-style dataset builds every batch from single
samples: one ``__getitem__`` (and transform) per sample, then a collation.
For MNIST-sized data that bookkeeping costs more than the model. When the
whole data set fits in memory, an :class:`InMemoryLoader` holds it as a few
tensors (on the training device, if you like) and takes each batch with one
``index_select`` per tensor.

Shuffling uses a ``torch.Generator`` seeded with ``seed + epoch``, the recipe
of ``torch.utils.data.DistributedSampler``, so the order of every epoch is
reproducible, the same on every device, and restorable from
:meth:`InMemoryLoader.state_dict`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dltrain.errors import DataError

__all__ = ["InMemoryLoader"]

# Why index_select and not slices of a permuted copy: on CPU, for
# 60000x1x28x28 float32 and batches of 100, one index_select per batch costs
# ~18 ms an epoch, while permuting the whole tensor once per epoch (to slice it
# afterwards) costs 80-190 ms and doubles the memory held.


class InMemoryLoader:
    """Batches of in-memory tensors, shuffled reproducibly, one index operation each.

    ``InMemoryLoader(inputs, targets, batch_size=100, shuffle=True)`` yields
    ``(inputs_batch, targets_batch)`` tuples: always a tuple with one tensor
    per tensor given, in the order given (a single tensor gives 1-tuples).
    ``len(loader)`` is the number of batches in an epoch.

    Order: with ``shuffle=True`` epoch ``e`` uses the permutation drawn from a
    ``torch.Generator`` seeded with ``seed + e`` (the same permutation as
    ``DistributedSampler(seed=seed)`` after ``set_epoch(e)``). The loader
    starts at epoch 0 and moves to the next epoch each time an iteration runs
    to its end; :meth:`set_epoch` sets it explicitly (the Trainer calls it
    before every epoch), and can start the next iteration at any batch of the
    epoch: a run resumed inside an epoch starts there, without going through
    the batches before it. Without shuffling, batches are slices (views, no copy).

    Distributed training: each rank takes every ``world_size``-th index of the
    epoch's order, starting at its ``rank``. With ``drop_last=False`` the order
    is first padded with its own first indices until every rank has the same
    number of samples (a few samples are then seen twice per epoch), and the
    last batch of each rank may be short; with ``drop_last=True`` the tail
    that does not divide evenly is dropped, and so is each rank's last partial
    batch. Either way every rank has the same number of batches, and when the
    number of samples divides evenly every sample is seen exactly once per
    epoch across all ranks. ``rank`` and ``world_size`` default to those of
    the ``torch.distributed`` process group when it is initialised as the
    loader is created (so create it after ``init_process_group``), else 0 and 1.

    Args:
        *tensors: The tensors, each with one row per sample along its first
            dimension (e.g. ``inputs`` of shape ``(N, 1, 28, 28)`` and
            ``targets`` of shape ``(N,)``), or one tuple or list of them.
        batch_size: Samples per batch (per rank).
        shuffle: Draw a new order each epoch (training) or keep the order
            given (evaluation).
        seed: Base seed of the shuffle; epoch ``e`` uses ``seed + e``.
        drop_last: Drop the last batch when it would be short (and, under
            distributed training, the samples that do not divide evenly).
        device: Move the tensors there once, now (e.g. ``"cuda"``), so no
            batch is copied during training. None leaves them where they are.
        rank: This process's rank; None: from ``torch.distributed``, else 0.
        world_size: Number of processes; None: from ``torch.distributed``, else 1.

    Raises:
        DataError: When the tensors are missing, not tensors, scalars, empty,
            on different devices or of different lengths, or when an argument
            is out of range; the message names the value and the fix.

    Example:
        >>> import torch
        >>> x, y = torch.randn(1000, 784), torch.randint(0, 10, (1000,))
        >>> loader = InMemoryLoader(x, y, batch_size=100, shuffle=True, seed=0)
        >>> len(loader)
        10
        >>> inputs, targets = next(iter(loader))
        >>> inputs.shape, targets.shape
        (torch.Size([100, 784]), torch.Size([100]))
    """

    def __init__(
        self,
        *tensors: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        flat = _flatten_tensor_args(tensors)
        if device is not None:
            flat = tuple(t.to(device) for t in flat)
        _check_tensors(flat)
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(
                f"batch_size must be a positive integer, got {batch_size!r}; pass e.g. batch_size=100"
            )
        if not _is_int(seed):
            raise DataError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0")
        rank, world_size = _resolve_rank(rank, world_size)

        self.tensors: tuple[torch.Tensor, ...] = flat
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._start = 0  # the batch the next iteration starts at (set_epoch)
        self._position = 0  # batches of `epoch` handed out by the latest iteration (or _start)

        n = self.num_samples
        if self.drop_last:
            self._per_rank = n // world_size
            self._num_batches = self._per_rank // batch_size
        else:
            self._per_rank = math.ceil(n / world_size)
            self._num_batches = math.ceil(self._per_rank / batch_size)
        if self._num_batches == 0:
            raise DataError(
                f"drop_last=True with batch_size={batch_size} leaves no batch: there are "
                f"{self._per_rank} samples per rank ({n} samples, world_size={world_size}); "
                "lower batch_size or pass drop_last=False"
            )

    # -- construction from a dataset ------------------------------------------

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> InMemoryLoader:
        """Read a map-style dataset once, stack it, and load from memory.

        Every sample is read once (``dataset[0]`` ... ``dataset[len - 1]``,
        transforms included) and collated like ``DataLoader`` collates a batch,
        so the loader yields what a ``DataLoader`` over ``dataset`` would, in
        one piece. Samples must be tensors, numbers, or tuples of them
        (``(image, label)``). A random augmentation is thereby frozen: it is
        applied once, not every epoch.

        Shortcuts that skip the per-sample reads give the same tensors:
        a ``TensorDataset`` is used as it is; a torchvision MNIST-family data
        set (``MNIST``, ``FashionMNIST``, ``KMNIST``, ``EMNIST``, ``QMNIST``)
        whose transform is exactly ``ToTensor()`` and that has no target
        transform is converted from its ``.data``/``.targets`` tensors in one
        operation (``data.float().div(255).unsqueeze(1)``, bit for bit what
        ``ToTensor`` gives); a ``Subset`` of either is indexed after.

        Args:
            dataset: A map-style dataset (``__len__`` and ``__getitem__``).
            batch_size: See :class:`InMemoryLoader`.
            shuffle: See :class:`InMemoryLoader`.
            seed: See :class:`InMemoryLoader`.
            drop_last: See :class:`InMemoryLoader`.
            device: See :class:`InMemoryLoader`.
            rank: See :class:`InMemoryLoader`.
            world_size: See :class:`InMemoryLoader`.

        Raises:
            DataError: When the dataset has no length or indexing, is empty, or
                its samples cannot be stacked into tensors.
        """
        tensors = _dataset_tensors(dataset)
        return cls(
            *tensors,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            device=device,
            rank=rank,
            world_size=world_size,
        )

    # -- properties -------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Number of samples held (all ranks together)."""
        return int(self.tensors[0].shape[0])

    @property
    def device(self) -> torch.device:
        """The device the tensors (and so the batches) are on."""
        return self.tensors[0].device

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        return self._num_batches

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        dist = f", rank={self.rank}, world_size={self.world_size}" if self.world_size > 1 else ""
        return (
            f"InMemoryLoader({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, device={str(self.device)!r}{dist})"
        )

    # -- moving and epochs -------------------------------------------------------

    def to(self, device: torch.device | str) -> InMemoryLoader:
        """Move the tensors to ``device`` (in place) and return the loader."""
        self.tensors = tuple(t.to(device) for t in self.tensors)
        return self

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Make the next iteration yield the order of ``epoch`` (0-based), from its batch ``batch``.

        The Trainer calls this before each epoch with ``state.epoch``; a run
        resumed inside an epoch starts at the batch after the checkpoint's.

        Raises:
            DataError: ``epoch`` is not an integer >= 0, or ``batch`` not one of
                ``0 .. len(self)``.
        """
        if not _is_int(epoch) or epoch < 0:
            raise DataError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not _is_int(batch) or not 0 <= batch <= self._num_batches:
            raise DataError(
                f"batch must be an integer in 0..{self._num_batches} (the batches of an epoch), got {batch!r}"
            )
        self.epoch, self._start, self._position = epoch, batch, batch

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield this epoch's batches (from the batch :meth:`set_epoch` gave); at the end, move on
        to the next epoch."""
        tensors, size, n = self.tensors, self.batch_size, self._per_rank
        order = self._indices(self.epoch)
        start, self._start = self._start, 0
        for b in range(start, self._num_batches):
            lo, hi = b * size, min((b + 1) * size, n)
            self._position = b + 1
            if order is None:
                yield tuple(t[lo:hi] for t in tensors)
            else:
                idx = order[lo:hi]
                yield tuple(t.index_select(0, idx) for t in tensors)
        self.epoch += 1
        self._position = 0

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """The sample indices this rank takes in ``epoch`` (default: the current one), in order.

        Only the first ``len(self) * batch_size`` of them are used when
        ``drop_last`` drops a partial batch.
        """
        e = self.epoch if epoch is None else epoch
        order = self._indices(e)
        return torch.arange(self._per_rank) if order is None else order.cpu()

    def _indices(self, epoch: int) -> torch.Tensor | None:
        """This rank's order for ``epoch`` on the data's device; None means 0..n-1 (slice)."""
        n, world = self.num_samples, self.world_size
        if not self.shuffle and world == 1:
            return None
        if self.shuffle:
            # A CPU generator: the same order whatever device the data is on.
            gen = torch.Generator()
            gen.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self._per_rank * world
        if total > n:  # pad with the order's own beginning, as DistributedSampler does
            order = order.repeat(math.ceil(total / n))
        order = order[self.rank : total : world]
        return order.to(self.device)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The seed, the epoch and the place in it, with the layout they give an order for.

        ``batch`` counts the batches of ``epoch`` the latest iteration handed
        out: :meth:`load_state_dict` makes the next iteration continue after
        them. The layout (number of samples, batch size, shuffle, drop_last,
        world size) is checked by :meth:`load_state_dict`. Plain Python data,
        safe for ``torch.load(weights_only=True)``.
        """
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch": self._position,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the seed, epoch and place saved by :meth:`state_dict`.

        The next iteration yields the rest of the saved epoch's batches, in the
        same order (the whole next epoch when the saved one was complete), and
        the epochs after it follow as they would have. A state without
        ``batch`` (dltrain 0.2 and earlier) starts at the epoch's beginning.

        Raises:
            DataError: When the state lacks the seed or epoch, or comes from a
                loader of another layout (another number of samples, batch
                size, shuffle, drop_last or world size gives another order).
        """
        missing = [k for k in ("seed", "epoch") if k not in state]
        if missing:
            raise DataError(f"loader state lacks {missing}; pass what InMemoryLoader.state_dict() returned")
        current = self.state_dict()
        for key in ("num_samples", "batch_size", "shuffle", "drop_last", "world_size"):
            if key in state and state[key] != current[key]:
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={current[key]!r}, so it cannot continue the same order; build the "
                    f"loader with {key}={state[key]!r}, or do not restore its state"
                )
        if not _is_int(state["seed"]):
            raise DataError(f"loader state has seed={state['seed']!r}; it must be an integer")
        epoch, batch = state["epoch"], state.get("batch", 0)
        if _is_int(epoch) and batch == self._num_batches:  # the epoch was complete
            epoch, batch = epoch + 1, 0
        self.set_epoch(epoch, batch)
        self.seed = state["seed"]


# -- helpers --------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flatten_tensor_args(args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    where = "argument {} of InMemoryLoader"
    given_one_sequence = len(args) == 1 and isinstance(args[0], (tuple, list))
    if given_one_sequence and any(isinstance(t, torch.Tensor) for t in args[0]):
        where = f"element {{}} of the {type(args[0]).__name__} given to InMemoryLoader"
        args = tuple(args[0])
    if not args:
        raise DataError(
            "InMemoryLoader needs at least one tensor; "
            "pass e.g. InMemoryLoader(inputs, targets, batch_size=100)"
        )
    for i, t in enumerate(args):
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"{where.format(i)} is a {type(t).__name__}, not a torch.Tensor; "
                "convert it with torch.as_tensor(...), or use InMemoryLoader.from_dataset(...) "
                "for a dataset"
            )
    return tuple(args)


def _check_tensors(tensors: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(tensors):
        if t.dim() == 0:
            raise DataError(
                f"tensor {i} is a scalar; every tensor needs a first dimension with one row "
                "per sample (use t.unsqueeze(0) for a single sample)"
            )
    lengths = [int(t.shape[0]) for t in tensors]
    if len(set(lengths)) > 1:
        raise DataError(
            f"the tensors have different numbers of samples along their first dimension: "
            f"{lengths}; every tensor needs one row per sample"
        )
    if lengths[0] == 0:
        raise DataError(
            f"the tensors hold no samples (shapes {[tuple(t.shape) for t in tensors]}); "
            "pass tensors with at least one row"
        )
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        raise DataError(
            f"the tensors are on different devices {sorted(devices)}; pass device=... to put them all on one"
        )


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    if not _is_int(world_size) or world_size < 1:
        raise DataError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise DataError(
            f"rank must be an integer in 0..{world_size - 1} (world_size={world_size}), got {rank!r}"
        )
    return rank, world_size


def _dataset_tensors(dataset: Any) -> tuple[torch.Tensor, ...]:
    """The whole dataset as tensors: a shortcut when one applies, else read and collate."""
    fast = _fast_tensors(dataset)
    if fast is not None:
        return fast
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(
            f"from_dataset needs a map-style dataset (with __len__ and __getitem__), got a "
            f"{type(dataset).__name__}; for an iterable dataset use a DataLoader"
        )
    n = len(dataset)
    if n == 0:
        raise DataError(f"the dataset {type(dataset).__name__} is empty; it needs samples")
    from torch.utils.data import default_collate

    try:
        stacked = default_collate([dataset[i] for i in range(n)])
    except (TypeError, RuntimeError) as exc:
        raise DataError(
            f"the samples of {type(dataset).__name__} cannot be stacked into tensors ({exc}); "
            "samples must be tensors of one shape, numbers, or tuples of them; for images, "
            "add transform=ToTensor()"
        ) from exc
    if isinstance(stacked, torch.Tensor):
        return (stacked,)
    if isinstance(stacked, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in stacked):
        return tuple(stacked)
    raise DataError(
        f"the samples of {type(dataset).__name__} collate to a {type(stacked).__name__}; "
        "InMemoryLoader needs tensors or tuples of tensors (not dicts or nested structures)"
    )


def _fast_tensors(dataset: Any) -> tuple[torch.Tensor, ...] | None:
    """The dataset's tensors without reading samples one by one, or None."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors)
    if isinstance(dataset, Subset):
        base = _fast_tensors(dataset.dataset)
        if base is None:
            return None
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return tuple(t.index_select(0, idx.to(t.device)) for t in base)
    # torchvision is imported already when the dataset is one of its datasets;
    # never import it here (import dltrain must stay light).
    tv = sys.modules.get("torchvision")
    if tv is None:
        return None
    if (
        isinstance(dataset, tv.datasets.MNIST)
        and type(dataset.transform) is tv.transforms.ToTensor
        and dataset.target_transform is None
        and isinstance(dataset.data, torch.Tensor)
        and dataset.data.dtype == torch.uint8
        and dataset.data.dim() == 3
        and isinstance(dataset.targets, torch.Tensor)
    ):
        if dataset.targets.dim() != 1:  # QMNIST keeps extra columns: read it sample by sample
            return None
        # Exactly what ToTensor does to each uint8 image: to the default float dtype, / 255.
        images = dataset.data.to(torch.get_default_dtype()).div(255).unsqueeze(1)
        return images, dataset.targets.long()
    return None
