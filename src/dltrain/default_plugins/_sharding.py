"""How the ``distributed`` plugin gives each process its shard of the data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from dltrain._warnings import warn
from dltrain.data import InMemoryLoader
from dltrain.errors import DataError
from dltrain.state import Phase

__all__ = ["ShardSampler", "shard_data"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``num_samples``: one shard, without padding.

    For evaluation: unlike ``DistributedSampler``, no sample is repeated to
    even out the shards, so sums and counts all-reduced across ranks equal
    those of one process. Shards may differ in length by one sample.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def _loader_kwargs(loader: DataLoader[Any]) -> dict[str, Any]:
    """The settings of ``loader`` other than its dataset and sampling, to rebuild it."""
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "prefetch_factor": loader.prefetch_factor,
    }
    if getattr(loader, "pin_memory_device", ""):
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    return kwargs


def shard_data(data: Any, rank: int, world: int, phase: Phase, *, seed: int) -> Any:
    """This rank's shard of ``data`` (a rebuilt loader), or None to keep ``data`` as it is.

    Training data is split into equal shards (every rank makes the same number
    of steps; a shuffling ``DataLoader`` gets a ``DistributedSampler`` seeded with
    ``seed``); evaluation data into unpadded shards (metrics are exact). Predict
    data, and data that cannot be sharded (with a warning on rank 0), stays whole.
    """
    if world < 2 or phase is Phase.PREDICT:
        return None
    if isinstance(data, InMemoryLoader):
        return _shard_in_memory(data, rank, world, phase=phase)
    if type(data) is DataLoader:
        if isinstance(data.sampler, (DistributedSampler, ShardSampler)):
            return None  # sharded already
        if (
            not isinstance(data.dataset, IterableDataset)
            and data.batch_size is not None
            and (type(data.sampler) is SequentialSampler or _plain_random(data.sampler))
        ):
            return _shard_loader(data, rank, world, phase=phase, seed=seed)
    if rank == 0:
        warn(
            f"the {phase.value} data (a {type(data).__name__}) cannot be sharded automatically, so "
            f"every one of the {world} processes uses all of it. Pass a DataLoader with the default "
            f"sampler (shuffle=True or False), an InMemoryLoader, or give each rank its own shard "
            f"(e.g. with torch.utils.data.DistributedSampler)"
        )
    return None


def _shard_loader(
    loader: DataLoader[Any], rank: int, world: int, *, phase: Phase, seed: int
) -> DataLoader[Any]:
    dataset: Any = loader.dataset
    sampler: Sampler[int]
    if phase is Phase.TRAIN:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
        )
    else:
        n = len(dataset)
        _check_eval_size(n, world, phase)
        sampler = ShardSampler(n, rank, world)
    return DataLoader(dataset, sampler=sampler, **_loader_kwargs(loader))


def _shard_in_memory(loader: InMemoryLoader, rank: int, world: int, *, phase: Phase) -> InMemoryLoader | None:
    if phase is Phase.TRAIN:
        if loader.world_size == world and loader.rank == rank:
            return None
        # Made before the process group existed: shard it as it would have sharded itself.
        sharded = InMemoryLoader(
            *loader.tensors,
            batch_size=loader.batch_size,
            shuffle=loader.shuffle,
            seed=loader.seed,
            drop_last=loader.drop_last,
            rank=rank,
            world_size=world,
        )
        sharded.set_epoch(loader.epoch)
        return sharded
    n = loader.num_samples
    _check_eval_size(n, world, phase)
    index = torch.arange(rank, n, world, device=loader.device)
    return InMemoryLoader(
        *(t.index_select(0, index) for t in loader.tensors),
        batch_size=loader.batch_size,
        shuffle=loader.shuffle,
        seed=loader.seed,
        drop_last=loader.drop_last,
        rank=0,
        world_size=1,
    )


def _plain_random(sampler: object) -> bool:
    """A ``RandomSampler`` that draws each sample once per epoch (what ``shuffle=True`` makes)."""
    if type(sampler) is not RandomSampler:
        return False
    return not sampler.replacement and sampler.num_samples == len(sampler.data_source)


def _check_eval_size(n: int, world: int, phase: Phase) -> None:
    if n < world:
        raise DataError(
            f"the {phase.value} data has {n} sample(s), fewer than the {world} processes: every process "
            f"needs at least one. Use more samples or fewer processes (torchrun --nproc-per-node)"
        )
