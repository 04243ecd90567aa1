"""The batches of a training epoch, and where a resumed epoch continues in them.

A checkpoint saved inside an epoch holds the random state from just before
the epoch's ``iter(data)`` (the "epoch RNG", which decides its order) and the
random state at the save. A resume sets the epoch RNG, starts the epoch's
data again, moves past the batches already done, then sets the saved random
state: the batches that follow, and everything random after them, are those
of the uninterrupted run. A checkpoint saved between epochs holds the
training data's own generators, so the next epoch shuffles as it would have.

How the resumed epoch moves past the batches done, cheapest first:

- an :class:`~dltrain.data.InMemoryLoader` starts its iteration at that batch;
- torchdata's ``StatefulDataLoader`` continues from its own state, which the
  Trainer saved and loaded (its ``state_dict``), when that state is inside the epoch;
- a plain ``torch.utils.data.DataLoader`` over a map-style dataset with a batch
  size (and without ``persistent_workers``) fast-forwards its index sampler:
  the resumed epoch's loader draws the indices of the batches already done and
  drops them, without loading a sample. The sampler's random draws, and the
  workers' base seed, are those of the whole epoch;
- anything else is replayed: its batches are fetched and dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from dltrain._rng import get_rng_state, set_rng_state
from dltrain.data import InMemoryLoader

__all__ = ["EpochData", "data_generators", "length_of", "resume_method"]


def length_of(data: Any) -> int | None:
    """``len(data)`` when the data knows it, else None."""
    try:
        return len(data)
    except TypeError:
        return None


def data_generators(data: Any) -> list[torch.Generator]:
    """The torch Generators a DataLoader shuffles or seeds its workers with (its own RNG)."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    owners = (data, sampler, batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _set_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch`` on the data, its sampler or batch sampler (the first that has it)."""
    for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _stateful_loader(data: Any) -> bool:
    """Whether ``data`` is torchdata's ``StatefulDataLoader`` (never imported here: only when in use)."""
    module = sys.modules.get("torchdata.stateful_dataloader")
    cls = getattr(module, "StatefulDataLoader", None)
    return isinstance(cls, type) and isinstance(data, cls)


def _fast_forwardable(data: Any) -> bool:
    """A plain DataLoader whose batches are index batches of a map-style dataset.

    Persistent workers are left to the replay: their loader draws the workers'
    base seed once per process, which a second loader for the resumed epoch
    would change.
    """
    return (
        type(data) is DataLoader
        and data.batch_sampler is not None
        and not isinstance(data.dataset, IterableDataset)
        and not data.persistent_workers
    )


def resume_method(data: Any) -> str:
    """How a resume moves past the batches of an epoch already done (see the module docs):
    ``"position"`` (the loader starts there), ``"state"`` (the loader's own saved state),
    ``"fast-forward"`` (index batches only) or ``"replay"``."""
    if isinstance(data, InMemoryLoader):
        return "position"
    if _stateful_loader(data):
        return "state"
    return "fast-forward" if _fast_forwardable(data) else "replay"


class _SkipBatches(Sampler[list[int]]):
    """The index batches of ``batch_sampler`` after its first ``skip``; ``then()`` once they are passed.

    The skipped ones are drawn, so every random draw of the sampler is that of
    the whole epoch, but no sample is loaded for them. The skip happens where
    the sampler's draws happen in an uninterrupted epoch: when the loader asks
    for its first index batch (at its first ``next``, or while its workers
    start), after ``iter(loader)`` drew the workers' base seed.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int, then: Callable[[], None]) -> None:
        self.batch_sampler, self.skip, self.then = batch_sampler, skip, then

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(batches, None) is None:
                break
        self.then()
        yield from batches

    def __len__(self) -> int:
        total = len(self.batch_sampler) if isinstance(self.batch_sampler, Sized) else 0
        return max(total - self.skip, 0)


def _fast_forward(loader: DataLoader[Any], skip: int, then: Callable[[], None]) -> Iterator[Any]:
    """The batches of ``loader`` after its first ``skip``, from a loader for this one epoch.

    Same dataset, workers, collation and generator; its index batches are the
    original's after ``skip``, and ``then()`` runs once they are passed, before
    the first sample is loaded. Creating its iterator draws the workers' base
    seed from the same generator as ``iter(loader)`` would, before the sampler's draws.
    """
    from dltrain.default_plugins._sharding import _loader_kwargs

    settings = _loader_kwargs(loader)
    for name in ("batch_size", "drop_last"):  # they belong to the batch sampler
        settings.pop(name)
    settings["persistent_workers"] = False
    batches = _SkipBatches(loader.batch_sampler, skip, then)  # type: ignore[arg-type]
    return iter(DataLoader(loader.dataset, batch_sampler=batches, **settings))


class EpochData:
    """Starts each training epoch's batches, replaying to a checkpoint's position after a resume.

    Args:
        limit: ``TrainerConfig.limit_train_batches``.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.epoch_rng: dict[str, Any] | None = None  # RNG before this epoch's iter(data)
        self._resume_rng: dict[str, Any] | None = None  # RNG at the save, set once the replay is done
        self._resume_generators: list[torch.Tensor] | None = None  # the data's own RNG at the save

    def last_index(self, data: Any) -> int | None:
        """The index of the epoch's last batch, or None when the data's length is unknown."""
        length, limit = length_of(data), self.limit
        last = (min(length, limit) if limit is not None else length) if length is not None else limit
        return None if last is None else last - 1

    def begin(self, data: Iterable[Any], epoch: int, resume_after: int | None) -> Iterator[Any]:
        """An iterator over epoch ``epoch``'s batches; after a resume, past batch ``resume_after``.

        Batches are fetched one at a time, never ahead: the RNG saved after
        batch k is then exactly the RNG that fetches batch k+1.
        """
        generators = data_generators(data)
        if resume_after is not None and self.epoch_rng is not None:
            set_rng_state(self.epoch_rng)  # the same RNG gives the same order
            for gen, gen_state in zip(generators, self.epoch_rng.get("data_generators", []), strict=False):
                gen.set_state(gen_state)
            first = resume_after + 1
            self._resume_generators = None  # the epoch RNG above already holds them
        else:
            self.epoch_rng = get_rng_state()
            self.epoch_rng["data_generators"] = [gen.get_state() for gen in generators]
            first = 0
        _set_epoch(data, epoch)
        if self.limit is not None and first >= self.limit:
            batches: Iterator[Any] = iter(())  # resumed after the epoch's last batch
        else:
            batches = self._batches_from(data, epoch, first)
        if not first:
            # What creating the iterator drew from the data's generators, for a loader that
            # restores its own state on a resume (its restore does not redo those draws).
            self.epoch_rng["generators_after_iter"] = [gen.get_state() for gen in generators]
        if resume_method(data) != "fast-forward" or not first:
            self._restore_resume_rng()  # else when the fast-forward has passed the batches done
        if self.limit is not None:
            batches = (b for _, b in zip(range(first, self.limit), batches, strict=False))
        return batches

    def _restore_resume_rng(self) -> None:
        """Set the random state of the checkpoint (once, after a resume): from here on, the run
        draws what the uninterrupted one drew."""
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    def _batches_from(self, data: Iterable[Any], epoch: int, first: int) -> Iterator[Any]:
        """The epoch's batches from batch ``first`` on, the cheapest way the data allows."""
        method = resume_method(data)
        if method == "state":
            # A StatefulDataLoader continues from the state the Trainer loaded into it, when
            # that state is inside an epoch and the resume is too; else it starts afresh.
            state = getattr(data, "next_iter_state", None)
            inside = isinstance(state, dict) and not state.get("_iterator_finished", False)
            if first and inside:
                batches = iter(data)
                after = (self.epoch_rng or {}).get("generators_after_iter", [])
                for gen, gen_state in zip(data_generators(data), after, strict=False):
                    gen.set_state(gen_state)
                return batches
            data.next_iter_state = None  # type: ignore[attr-defined]
            method = "replay"
        if first == 0:
            return iter(data)
        if method == "position":
            assert isinstance(data, InMemoryLoader)
            data.set_epoch(epoch, batch=first)
            return iter(data)
        if method == "fast-forward":
            assert isinstance(data, DataLoader)
            return _fast_forward(data, first, then=self._restore_resume_rng)
        batches = iter(data)
        for _ in range(first):
            next(batches, None)
        return batches

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self, data: Any) -> dict[str, Any]:
        """The epoch RNG, and the training data's own generators now (to continue from an epoch's end)."""
        return {
            "epoch_rng": self.epoch_rng,
            "data_generators": [gen.get_state() for gen in data_generators(data)],
        }

    def load_state_dict(self, saved: dict[str, Any], rng: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; ``rng`` is the random state at the save."""
        self.epoch_rng = saved.get("epoch_rng")
        self._resume_rng = rng
        self._resume_generators = saved.get("data_generators")

    def resume_between_epochs(self, data: Any) -> None:
        """A resume at an epoch boundary: set the saved RNG and the data's generators now."""
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        for gen, gen_state in zip(data_generators(data), self._resume_generators or [], strict=False):
            gen.set_state(gen_state)
        self._resume_generators = None
