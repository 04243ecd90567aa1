"""A run resumed inside an epoch reaches its place in the data without loading the batches before it.

- a plain ``DataLoader`` fast-forwards its index sampler: the skipped batches'
  indices are drawn (the sampler's random draws stay those of the whole epoch),
  no sample is loaded for them;
- an ``InMemoryLoader`` starts its iteration at that batch;
- torchdata's ``StatefulDataLoader`` continues from its own saved state;
- any other iterable is replayed.

Each way ends bit-identical to the uninterrupted run, resumed at several places
(inside the first epoch, at its end, inside the second), shuffled with the
global RNG or a generator of its own, with 0 and 2 worker processes; a dataset
that counts its reads shows which samples were loaded.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import dltrain
from dltrain._epoch_data import resume_method
from dltrain.data import InMemoryLoader

N, BATCH = 60, 8  # 8 batches an epoch, the last one of 4 samples
SIZES = [BATCH] * 7 + [N - 7 * BATCH]  # the batch sizes of an epoch
PLACES = [3, 8, 13]  # inside epoch 1, at its end, inside epoch 2 (global steps)


class Counted(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """60 samples; ``reads`` (shared with worker processes) counts the samples loaded."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(N, 6, generator=gen)
        self.y = (self.x[:, 0] > 0).long()
        self.reads = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.reads.get_lock():
            self.reads.value += 1
        return self.x[i], self.y[i]


class Replayed:
    """A loader behind an iterable of one's own: all dltrain can do is replay it."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batch_size = loader, loader.batch_size

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def fit(data: Any, directory: Path, *, max_steps: int | None = None, resume: str | None = None) -> nn.Module:
    """Two epochs of a small MLP with dropout (it draws from the global RNG), SGD with momentum."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    trainer = dltrain.Trainer(
        max_epochs=2,
        max_steps=max_steps,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        checkpoint={"dir": directory, "every_n_steps": None, "every_n_epochs": None},
    )
    trainer.fit(
        model,
        data,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        resume=resume,
    )
    return model


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), f"{name} differs from the uninterrupted run's"


def _drop_iterator(loader: Any) -> None:
    """Shut down the workers of a StatefulDataLoader's unfinished iterator now.

    The loader keeps its iterator, and the two refer to each other: left to the
    garbage collector, the iterator's queues are closed before it stops its
    workers, which then wait out a 5 s timeout each. Dropping the loader's
    reference while the loader is alive ends the iterator at once.
    """
    if resume_method(loader) == "state":
        loader._iterator = None


def check_resumes(make: Callable[[], Any], tmp_path: Path, *, loads_only_what_follows: bool) -> None:
    """Stop at each place, resume in a new Trainer with new data, compare with the straight run."""
    straight = fit(make(), tmp_path / "straight")
    for place in PLACES:
        directory = tmp_path / f"at-{place}"
        stopped = make()
        fit(stopped, directory, max_steps=place)
        _drop_iterator(stopped)
        data = make()
        dataset = getattr(getattr(data, "loader", data), "dataset", None)
        resumed = fit(data, directory, resume="last")
        assert_same(resumed, straight)
        if isinstance(dataset, Counted) and loads_only_what_follows:
            done = sum(SIZES[i % len(SIZES)] for i in range(place))
            assert dataset.reads.value == 2 * N - done, f"resumed at step {place}: samples read again"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("generator", [False, True], ids=["global RNG", "own generator"])
def test_a_data_loader_is_fast_forwarded_and_resumes_exactly(
    tmp_path: Path, workers: int, generator: bool
) -> None:
    def make() -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(11) if generator else None
        return DataLoader(Counted(), batch_size=BATCH, shuffle=True, generator=gen, num_workers=workers)

    assert resume_method(make()) == "fast-forward"
    check_resumes(make, tmp_path, loads_only_what_follows=True)


def test_a_loader_it_cannot_fast_forward_is_replayed_exactly(tmp_path: Path) -> None:
    def make() -> Replayed:
        return Replayed(DataLoader(Counted(), batch_size=BATCH, shuffle=True))

    assert resume_method(make()) == "replay"
    check_resumes(make, tmp_path, loads_only_what_follows=False)


def test_only_a_plain_loader_of_index_batches_is_fast_forwarded() -> None:
    class Stream(IterableDataset[torch.Tensor]):
        def __iter__(self) -> Iterator[torch.Tensor]:
            return iter(torch.arange(4.0))

    class MyLoader(DataLoader[Any]):
        pass

    data = Counted()
    assert resume_method(DataLoader(data, batch_size=BATCH, shuffle=True)) == "fast-forward"
    # Workers that outlive an epoch draw their seed once: a loader for the resumed epoch would change it.
    assert (
        resume_method(DataLoader(data, batch_size=BATCH, num_workers=1, persistent_workers=True)) == "replay"
    )
    assert resume_method(DataLoader(data, batch_size=None)) == "replay"  # samples, not index batches
    assert resume_method(DataLoader(Stream(), batch_size=2)) == "replay"
    assert resume_method(MyLoader(data, batch_size=BATCH)) == "replay"  # a subclass may iterate its own way
    assert resume_method([torch.zeros(2)]) == "replay"


def test_the_fast_forward_loads_no_sample_of_the_batches_done(tmp_path: Path) -> None:
    """Resumed after batch 5 of 8 (step 6): only the last two batches of that epoch are read."""
    directory = tmp_path / "ckpt"
    fit(DataLoader(Counted(), batch_size=BATCH, shuffle=True), directory, max_steps=6)
    data = DataLoader(Counted(), batch_size=BATCH, shuffle=True)
    fit(data, directory, resume="last", max_steps=8)
    assert isinstance(data.dataset, Counted) and data.dataset.reads.value == BATCH + 4


def test_an_in_memory_loader_starts_at_the_batch(tmp_path: Path) -> None:
    def make() -> InMemoryLoader:
        data = Counted()
        return InMemoryLoader(data.x, data.y, batch_size=BATCH, shuffle=True, seed=5)

    assert resume_method(make()) == "position"
    check_resumes(make, tmp_path, loads_only_what_follows=True)


def test_an_in_memory_loader_continues_from_its_own_state() -> None:
    data = Counted()
    loader = InMemoryLoader(data.x, data.y, batch_size=BATCH, shuffle=True, seed=5)
    loader.set_epoch(1)
    whole = [b[1] for b in loader]
    loader.set_epoch(1)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 3)
    again = InMemoryLoader(data.x, data.y, batch_size=BATCH, shuffle=True, seed=5)
    again.load_state_dict(state)
    rest = [b[1] for b in again]
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:], strict=True))
    assert again.epoch == 2 and again.state_dict()["batch"] == 0
    # A state saved after the epoch's last batch, before the iteration noticed its end: the next epoch.
    again.load_state_dict({**state, "batch": len(again)})
    assert (again.epoch, again.state_dict()["batch"]) == (2, 0)
    # dltrain 0.2 saved no place: the epoch from its start.
    again.load_state_dict({k: v for k, v in state.items() if k != "batch"})
    assert (again.epoch, len(list(again))) == (1, 8)
    with pytest.raises(dltrain.DataError, match=r"batch must be an integer in 0\.\.8"):
        again.set_epoch(0, batch=9)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 on a newer torch
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("generator", [False, True], ids=["global RNG", "own generator"])
def test_a_stateful_data_loader_continues_from_its_own_state(
    tmp_path: Path, workers: int, generator: bool
) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> Any:
        gen = torch.Generator().manual_seed(11) if generator else None
        torch.manual_seed(2)  # without a generator, its sampler seeds one of its own from torch's, now
        return stateful.StatefulDataLoader(
            Counted(), batch_size=BATCH, shuffle=True, generator=gen, num_workers=workers
        )

    assert resume_method(make()) == "state"
    check_resumes(make, tmp_path, loads_only_what_follows=workers == 0)
