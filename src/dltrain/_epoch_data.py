"""The batches of a training epoch, and where a resumed epoch continues in them.

A checkpoint saved inside an epoch holds the random state from just before
the epoch's ``iter(data)`` (the "epoch RNG", which decides its order) and the
random state at the save. A resume sets the epoch RNG, iterates the data
again, passes the batches already done, then sets the saved random state:
the batches that follow, and everything random after them, are those of the
uninterrupted run. A checkpoint saved between epochs holds the training
data's own generators, so the next epoch shuffles as it would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from dltrain._rng import get_rng_state, set_rng_state

__all__ = ["EpochData", "data_generators", "length_of"]


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
            skip = resume_after + 1
            self._resume_generators = None  # the epoch RNG above already holds them
        else:
            self.epoch_rng = get_rng_state()
            self.epoch_rng["data_generators"] = [gen.get_state() for gen in generators]
            skip = 0
        _set_epoch(data, epoch)
        batches: Iterator[Any] = iter(data)
        for _ in range(skip):
            next(batches, None)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        if self.limit is not None:
            batches = (b for _, b in zip(range(skip, self.limit), batches, strict=False))
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
