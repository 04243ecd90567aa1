"""Device placement: choosing a device, moving models and any batch structure."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch

import dltrain
from dltrain.default_plugins.device import available_devices, move_to_device, resolve_device


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    label: int


def test_nested_batches_are_moved_and_other_values_left_alone() -> None:
    meta = object()
    batch = {
        "a": [torch.ones(2), (torch.zeros(1), "text")],
        "p": Pair(torch.ones(1), torch.ones(1)),
        "s": Sample(torch.ones(3), 4),
        "m": meta,
    }
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == "text" and moved["m"] is meta
    assert isinstance(moved["p"], Pair) and moved["p"].x.device.type == "meta"
    assert isinstance(moved["s"], Sample) and moved["s"].image.device.type == "meta" and moved["s"].label == 4


def test_auto_picks_an_available_device() -> None:
    device = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if "mps" in available_devices() else "cpu")
    assert device.type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_missing_device_names_the_available_ones() -> None:
    trainer = dltrain.Trainer(device="cuda:3", progress="off", run_dir=None)
    with pytest.raises(dltrain.DeviceError, match=r"'cuda:3' is not available.*available: \['cpu'"):
        trainer.validate(torch.nn.Linear(2, 2), [(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_and_batches_move_to_cuda() -> None:
    from dltrain.testing import tiny_loader, tiny_model

    model = tiny_model()
    dltrain.Trainer(device="cuda", progress="off", run_dir=None).fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert next(model.parameters()).device.type == "cuda"
