"""Asynchronous checkpoints of a model on a GPU: pinned snapshot buffers, copies ordered on the stream.

Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dltrain
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.checkpoint._async import Snapshot
from dltrain.testing import tiny_loader, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_snapshot_of_gpu_tensors_lands_in_reused_pinned_buffers_before_later_kernels_change_them() -> None:
    weight = torch.randn(1024, 1024, device="cuda")
    snapshot = Snapshot()
    copy, events = snapshot.take({"w": weight})
    weight.add_(1.0)  # queued after the copy on the same stream
    for event in events:
        event.synchronize()
    assert events and copy["w"].device.type == "cpu" and copy["w"].is_pinned()
    torch.testing.assert_close(copy["w"] + 1.0, weight.cpu(), rtol=0, atol=1e-6)
    again, _ = snapshot.take({"w": weight})
    assert again["w"].untyped_storage().data_ptr() == copy["w"].untyped_storage().data_ptr()


def _fit(directory: Path, async_save: bool) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    dltrain.Trainer(
        max_epochs=1,
        device="cuda",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": directory, "every_n_steps": 2, "keep_last": 10, "async_save": async_save},
    ).fit(
        model,
        tiny_loader(batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )


def test_asynchronous_saves_of_a_gpu_run_hold_the_same_weights_as_synchronous_ones(tmp_path: Path) -> None:
    _fit(tmp_path / "async", True)
    _fit(tmp_path / "sync", False)
    pairs = zip(list_checkpoints(tmp_path / "async"), list_checkpoints(tmp_path / "sync"), strict=True)
    for a, s in pairs:
        left, right = load_checkpoint(a.payload_path), load_checkpoint(s.payload_path)
        assert left["model"].keys() == right["model"].keys()
        for key in left["model"]:
            assert torch.equal(left["model"][key], right["model"][key]), (a.name, key)
