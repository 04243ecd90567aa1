"""The default step's helpers, which third-party steps may use too: unpack_batch, batch_size_of."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from dltrain.default_plugins.step import batch_size_of, unpack_batch
from dltrain.errors import DataError

X, Y = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (X, 5),
        ((X, Y), 5),
        ([X, Y], 5),
        ({"inputs": X, "targets": Y}, 5),
        (((X, X), Y), 5),  # nested: the first tensor found, depth first
        ([{"x": torch.zeros(7, 2)}, Y], 7),
        (torch.tensor(3.0), 1),  # a 0-d tensor is one sample
        ((), 1),
        ({}, 1),
        ("text", 1),
    ],
)
def test_batch_size_is_the_first_dimension_of_the_first_tensor(batch: object, expected: int) -> None:
    size = batch_size_of(batch)
    assert size == expected and type(size) is int


def test_unpack_batch_splits_pairs_and_dicts() -> None:
    assert unpack_batch((X, Y)) == (X, Y)
    inputs, targets = unpack_batch([X, Y])
    assert inputs is X and targets is Y
    inputs, targets = unpack_batch({"x": X, "labels": Y})
    assert inputs is X and targets is Y
    assert unpack_batch((X,), allow_no_targets=True) == (X, None)
    assert unpack_batch(X, allow_no_targets=True) == (X, None)


def test_unpack_batch_refuses_a_named_tuple_and_other_lengths() -> None:
    pair = namedtuple("Pair", ["image", "label"])
    with pytest.raises(DataError, match="Pair of length 2"):
        unpack_batch(pair(X, Y))
    with pytest.raises(DataError, match="tuple of length 3"):
        unpack_batch((X, Y, Y))
    with pytest.raises(DataError, match="tuple of length 1"):
        unpack_batch((X,))
