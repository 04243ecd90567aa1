"""The default step's helpers, which third-party steps may use too: unpack_batch, batch_size_of."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from dltrain.default_plugins.step import batch_size_of, split_batch, unpack_batch
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


# -- dict batches: nothing is dropped silently ---------------------------------------------------------


class Masked(torch.nn.Module):
    """A model that takes a mask next to its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.masks: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.masks.append(mask)
        return self.linear(x) * mask.unsqueeze(-1)


def _fit(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], loss_fn: object = None) -> object:
    import dltrain

    trainer = dltrain.Trainer(max_epochs=1, progress="off", run_dir=None, device="cpu")
    return trainer.fit(
        model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=loss_fn or torch.nn.CrossEntropyLoss(),
    )  # fmt: skip


def test_split_batch_passes_extra_dict_keys_as_keyword_arguments() -> None:
    mask = torch.ones(5)
    split = split_batch({"x": X, "y": Y, "mask": mask})
    assert split.args == (X,) and split.kwargs == {"mask": mask} and split.targets is Y
    hf = {"input_ids": Y, "attention_mask": mask, "labels": Y}
    split = split_batch(hf)
    assert split.args == () and split.kwargs == hf and split.targets is Y


def test_a_dict_batch_with_a_mask_reaches_the_model() -> None:
    model = Masked()
    _fit(model, [{"x": X, "y": Y % 2, "mask": torch.ones(5)}])
    assert len(model.masks) == 1


def test_a_dict_batch_the_model_cannot_take_names_the_keys_and_the_fix() -> None:
    with pytest.raises(
        DataError, match=r"model\(inputs, mask=\.\.\.\).*keys \['mask'\].*Sequential\.forward\(\)"
    ):
        _fit(torch.nn.Sequential(torch.nn.Linear(3, 2)), [{"x": X, "y": Y % 2, "mask": torch.ones(5)}])


class TinyLM(torch.nn.Module):
    """Shaped like a Hugging Face model: keyword inputs, a record with ``loss`` and ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


def test_a_hugging_face_shaped_batch_trains_with_the_models_own_loss() -> None:
    ids = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 6), "labels": ids}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the initial weights do not depend on the tests that ran before
        model = TinyLM()
    with torch.no_grad():
        before = float(model(**batch)["loss"])
    history = _fit(model, [batch] * 20)
    with torch.no_grad():
        after = float(model(**batch)["loss"])
    # It learned to copy its input from its own loss (a drop of 0.6 to 1.0 for any initial weights).
    assert after < before - 0.4
    assert after < history["train_loss"][0] < before
