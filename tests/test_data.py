"""InMemoryLoader: what a user sees when training from tensors held in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from dltrain.data import InMemoryLoader
from dltrain.errors import DataError


def _data(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    # Row i of x holds i, so a batch tells which samples it took.
    x = torch.arange(n, dtype=torch.float32).repeat_interleave(3).reshape(n, 3)
    y = torch.arange(n)
    return x, y


def _ids(loader: InMemoryLoader) -> list[int]:
    """The sample ids of one epoch, in order, checking inputs and targets stay paired."""
    ids: list[int] = []
    for x, y in loader:
        assert torch.equal(x[:, 0].long(), y)
        ids += y.tolist()
    return ids


# -- what an epoch yields ------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,batch_size", [(103, 10), (100, 10), (7, 100), (1, 1)])
def test_every_sample_is_seen_exactly_once_per_epoch(shuffle: bool, n: int, batch_size: int) -> None:
    loader = InMemoryLoader(*_data(n), batch_size=batch_size, shuffle=shuffle)
    assert len(loader) == -(-n // batch_size)
    for _ in range(3):
        ids = _ids(loader)
        assert sorted(ids) == list(range(n))
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(len(b[0]) == batch_size for b in batches[:-1])


def test_batches_are_tuples_matching_the_tensors_given() -> None:
    x, y = _data()
    w = torch.ones(len(x), dtype=torch.float64)
    (batch,) = list(InMemoryLoader(x, batch_size=200))
    assert isinstance(batch, tuple) and len(batch) == 1 and torch.equal(batch[0], x)
    three = next(iter(InMemoryLoader(x, y, w, batch_size=8, shuffle=True)))
    assert [t.dtype for t in three] == [torch.float32, torch.int64, torch.float64]
    assert [t.shape[0] for t in three] == [8, 8, 8]


def test_a_tuple_of_tensors_works_like_separate_arguments() -> None:
    x, y = _data()
    a = InMemoryLoader((x, y), batch_size=10, shuffle=True, seed=3)
    b = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=3)
    assert _ids(a) == _ids(b)


def test_unshuffled_batches_are_views_in_order() -> None:
    x, y = _data()
    loader = InMemoryLoader(x, y, batch_size=10)
    assert _ids(loader) == list(range(len(x)))
    first = next(iter(loader))[0]
    assert first.data_ptr() == x.data_ptr()  # a slice, not a copy


def test_drop_last_drops_the_short_batch() -> None:
    loader = InMemoryLoader(*_data(103), batch_size=10, shuffle=True, drop_last=True)
    assert len(loader) == 10
    batches = list(loader)
    assert len(batches) == 10 and all(len(x) == 10 for x, _ in batches)
    ids = [i for _, y in batches for i in y.tolist()]
    assert len(set(ids)) == 100


# -- order: reproducible, new each epoch -------------------------------------------


def test_same_seed_and_epoch_give_the_same_order() -> None:
    a = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=7)
    b = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert _ids(a) == _ids(b)


def test_each_epoch_has_a_new_order_and_another_seed_too() -> None:
    loader = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=0)
    epochs = [_ids(loader) for _ in range(3)]  # iterating to the end moves to the next epoch
    assert loader.epoch == 3
    assert epochs[0] != epochs[1] != epochs[2]
    other = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=1)
    assert _ids(other) != epochs[0]


def test_set_epoch_selects_that_epochs_order() -> None:
    loader = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=0)
    epochs = [_ids(loader) for _ in range(3)]
    loader.set_epoch(1)
    assert _ids(loader) == epochs[1]
    assert loader.indices(2).tolist() == epochs[2]


def test_order_is_distributed_samplers_order() -> None:
    x, y = _data()
    loader = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=5)
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, shuffle=True, seed=5)
    for epoch in range(2):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        assert _ids(loader) == list(sampler)


def test_an_abandoned_epoch_is_repeated_by_the_next_iteration() -> None:
    loader = InMemoryLoader(*_data(), batch_size=10, shuffle=True)
    first = next(iter(loader))[1]
    assert loader.epoch == 0
    assert torch.equal(next(iter(loader))[1], first)


# -- checkpointing -------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically() -> None:
    x, y = _data()
    original = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=11)
    _ids(original)
    _ids(original)
    state = original.state_dict()
    rest = [_ids(original) for _ in range(3)]

    resumed = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=0)
    resumed.load_state_dict(state)
    assert resumed.seed == 11 and resumed.epoch == 2
    assert [_ids(resumed) for _ in range(3)] == rest


def test_state_dict_survives_a_weights_only_save(tmp_path: Path) -> None:
    loader = InMemoryLoader(*_data(), batch_size=10, shuffle=True, seed=2)
    loader.set_epoch(5)
    path = tmp_path / "loader.pt"
    torch.save(loader.state_dict(), path)
    restored = torch.load(path, weights_only=True)
    other = InMemoryLoader(*_data(), batch_size=10, shuffle=True)
    other.load_state_dict(restored)
    assert _ids(other) == _ids(loader)


def test_loading_state_of_another_layout_is_refused() -> None:
    state = InMemoryLoader(*_data(), batch_size=10, shuffle=True).state_dict()
    other = InMemoryLoader(*_data(), batch_size=20, shuffle=True)
    with pytest.raises(DataError, match=r"batch_size=10 .* this loader has batch_size=20"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="lacks"):
        other.load_state_dict({"epoch": 1})


# -- distributed sharding ------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_split_an_even_dataset_exactly(shuffle: bool) -> None:
    x, y = _data(100)
    ranks = [
        InMemoryLoader(x, y, batch_size=8, shuffle=shuffle, seed=3, rank=r, world_size=2) for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 7  # 50 samples each: 6 full batches and one of 2
    for _ in range(2):
        seen = [_ids(r) for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(100))


def test_uneven_ranks_are_padded_or_dropped_to_the_same_length() -> None:
    x, y = _data(101)
    padded = [InMemoryLoader(x, y, batch_size=10, shuffle=True, rank=r, world_size=2) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 6
    ids = [_ids(r) for r in padded]
    assert len(ids[0]) == len(ids[1]) == 51
    assert set(ids[0]) | set(ids[1]) == set(range(101))  # one sample seen twice

    dropped = [
        InMemoryLoader(x, y, batch_size=10, shuffle=True, drop_last=True, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(dropped[0]) == len(dropped[1]) == 5
    ids = [_ids(r) for r in dropped]
    assert len(set(ids[0] + ids[1])) == 100


def test_shards_match_distributed_sampler() -> None:
    x, y = _data(101)
    for drop_last in (False, True):
        for rank in range(3):
            loader = InMemoryLoader(
                x, y, batch_size=4, shuffle=True, seed=9, drop_last=drop_last, rank=rank, world_size=3
            )
            sampler = DistributedSampler(
                TensorDataset(x, y), num_replicas=3, rank=rank, seed=9, drop_last=drop_last
            )
            reference = DataLoader(TensorDataset(x, y), 4, sampler=sampler, drop_last=drop_last)
            assert _ids(loader) == [i for _, b in reference for i in b.tolist()]


def test_more_ranks_than_samples_still_gives_every_rank_a_batch() -> None:
    x, y = _data(2)
    loaders = [InMemoryLoader(x, y, batch_size=4, rank=r, world_size=5) for r in range(5)]
    assert all(len(loader) == 1 and len(_ids(loader)) == 1 for loader in loaders)


# -- devices ---------------------------------------------------------------------------


def test_device_argument_and_to_move_the_data_once() -> None:
    x, y = _data()
    loader = InMemoryLoader(x, y, batch_size=10, shuffle=True, device="cpu")
    assert loader.device == torch.device("cpu")
    assert loader.to("cpu") is loader
    assert all(b.device == torch.device("cpu") for b in next(iter(loader)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_data_on_cuda_gives_batches_on_cuda_in_the_cpu_order() -> None:
    x, y = _data()
    cpu = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=4)
    gpu = InMemoryLoader(x, y, batch_size=10, shuffle=True, seed=4, device="cuda")
    assert gpu.device.type == "cuda" and next(iter(gpu))[0].is_cuda
    assert _ids(gpu) == _ids(cpu)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((), {"batch_size": 1}, r"at least one tensor.*InMemoryLoader\(inputs, targets"),
        (([1, 2, 3],), {"batch_size": 1}, r"argument 0 .* list, not a torch.Tensor.*as_tensor"),
        ((torch.ones(3), "y"), {"batch_size": 1}, r"argument 1 .* str"),
        (([torch.ones(3), None],), {"batch_size": 1}, r"element 1 of the list .* NoneType"),
        ((torch.tensor(1.0),), {"batch_size": 1}, r"tensor 0 is a scalar"),
        ((torch.ones(0, 3),), {"batch_size": 1}, r"no samples"),
        ((torch.ones(5, 2), torch.ones(4)), {"batch_size": 1}, r"different numbers.*\[5, 4\]"),
        ((torch.ones(5),), {"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ((torch.ones(5),), {"batch_size": 2.5}, r"got 2.5"),
        ((torch.ones(5),), {"batch_size": True}, r"got True"),
        ((torch.ones(5),), {"batch_size": 10, "drop_last": True}, r"leaves no batch.*drop_last=False"),
        ((torch.ones(5),), {"batch_size": 1, "world_size": 0}, r"world_size must be .* got 0"),
        ((torch.ones(5),), {"batch_size": 1, "rank": 2, "world_size": 2}, r"rank must be .*0\.\.1"),
        ((torch.ones(5),), {"batch_size": 1, "seed": "0"}, r"seed must be an integer"),
    ],
)
def test_bad_input_names_the_value_and_the_fix(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        InMemoryLoader(*args, **kwargs)  # type: ignore[arg-type]


def test_set_epoch_rejects_a_negative_epoch() -> None:
    loader = InMemoryLoader(torch.ones(5), batch_size=1)
    with pytest.raises(DataError, match="epoch must be an integer >= 0, got -1"):
        loader.set_epoch(-1)


# -- from_dataset --------------------------------------------------------------------------


class _Samples(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset that builds each sample on access, like a transform would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), float(i)) / 7, i % 10


def test_from_dataset_equals_per_sample_collation() -> None:
    ds = _Samples(53)
    loader = InMemoryLoader.from_dataset(ds, batch_size=10, shuffle=True, seed=1)
    reference = DataLoader(ds, batch_size=53)
    (x_ref, y_ref), (x, y) = next(iter(reference)), loader.tensors
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and y.dtype == torch.int64
    for xb, yb in loader:  # batches are rows of the collated tensors
        assert xb.shape[1:] == (1, 4, 4) and len(xb) == len(yb)


def test_from_dataset_uses_a_tensor_dataset_and_subset_directly() -> None:
    x, y = _data()
    loader = InMemoryLoader.from_dataset(TensorDataset(x, y), batch_size=10)
    assert loader.tensors[0] is x
    sub = InMemoryLoader.from_dataset(Subset(TensorDataset(x, y), [5, 3, 9]), batch_size=10)
    assert sub.tensors[1].tolist() == [5, 3, 9]
    odd = InMemoryLoader.from_dataset(Subset(_Samples(20), [1, 3]), batch_size=10)
    assert odd.tensors[1].tolist() == [1, 3]


def test_from_dataset_rejects_what_cannot_be_stacked() -> None:
    with pytest.raises(DataError, match="map-style dataset"):
        InMemoryLoader.from_dataset(iter([1, 2]), batch_size=1)
    with pytest.raises(DataError, match="is empty"):
        InMemoryLoader.from_dataset(_Samples(0), batch_size=1)
    with pytest.raises(DataError, match=r"cannot be stacked.*ToTensor"):
        InMemoryLoader.from_dataset([object(), object()], batch_size=1)
    with pytest.raises(DataError, match="collate to a dict"):
        InMemoryLoader.from_dataset([{"x": torch.ones(2)}], batch_size=1)


def _check_mnist_fast_path(root: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    transforms = pytest.importorskip("torchvision.transforms")
    ds = datasets.MNIST(str(root), train=False, download=False, transform=transforms.ToTensor())
    loader = InMemoryLoader.from_dataset(ds, batch_size=100)
    x, y = loader.tensors
    assert x.shape == (len(ds), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    for i in sorted({0, 1, len(ds) // 2, len(ds) - 1}):
        image, label = ds[i]
        assert torch.equal(x[i], image) and int(y[i]) == label

    # Any other transform is applied sample by sample, never skipped.
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    normalized = datasets.MNIST(str(root), train=False, download=False, transform=normalize)
    xs, _ = InMemoryLoader.from_dataset(Subset(normalized, [0, 1, 2]), batch_size=3).tensors
    assert torch.equal(xs[1], normalized[1][0]) and xs.min() < 0


def test_from_torchvision_mnist_is_bit_equal_to_to_tensor(mnist_fake_dir: Path) -> None:
    _check_mnist_fast_path(mnist_fake_dir)


def test_from_real_mnist_is_bit_equal_to_to_tensor(mnist_real_dir: Path) -> None:
    _check_mnist_fast_path(mnist_real_dir)
