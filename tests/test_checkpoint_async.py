"""Asynchronous checkpoint saves: the snapshot, training going on while a save is written, at most
one save in flight, background failures, and nothing lost when fit ends, fails or is interrupted."""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import dltrain
from dltrain import CheckpointError, Trainer
from dltrain.checkpoint import (
    FAULT_ENV,
    _io,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from dltrain.checkpoint._async import BackgroundSave, Snapshot
from dltrain.checkpoint._lock import LOCK_NAME
from dltrain.default_plugins.checkpoint import CheckpointPlugin
from dltrain.testing import tiny_loader, tiny_model

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")


def writers() -> list[str]:
    """Names of the live checkpoint writer threads."""
    return [t.name for t in threading.enumerate() if t.name.startswith("dltrain-checkpoint")]


def make_trainer(directory: Path, *plugins: object, **checkpoint: Any) -> Trainer:
    """8 batches an epoch with :func:`fit`; saves every step unless told otherwise."""
    settings = {"dir": directory, "every_n_steps": 1, "every_n_epochs": None, "keep_last": 100, **checkpoint}
    return Trainer(
        max_epochs=1,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint=settings,
        plugins=plugins,
    )


def fit(trainer: Trainer) -> torch.nn.Module:
    model = tiny_model()
    trainer.fit(
        model,
        tiny_loader(batch_size=8, shuffle=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    return model


def plugin_of(trainer: Trainer) -> CheckpointPlugin:
    plugin = trainer.plugin_manager.get_plugin("checkpoint")
    assert isinstance(plugin, CheckpointPlugin)
    return plugin


def steps(directory: Path) -> list[int]:
    return [i.global_step for i in list_checkpoints(directory)]


def assert_same(left: Any, right: Any, where: str = "payload") -> None:
    """``left`` and ``right`` hold the same data, tensors compared with ``torch.equal``."""
    assert type(left) is type(right), where
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_same(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


def no_leftovers(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".tmp-") or p.name == LOCK_NAME]


# -- the snapshot --------------------------------------------------------------------------------


def test_the_snapshot_is_a_copy_that_later_training_does_not_change() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    history = {"epochs": [{"loss": 1.0}]}
    live = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    before = io.BytesIO()
    torch.save(live, before)
    copy, events = Snapshot().take(live)
    assert events == []  # all on the CPU
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    history["epochs"].append({"loss": 0.5})
    assert all(torch.equal(copy["model"][k], v) for k, v in expected.items())
    assert copy["history"] == {"epochs": [{"loss": 1.0}]}
    assert copy["model"]._metadata == live["model"]._metadata  # module versions are saved too
    after = io.BytesIO()
    torch.save(copy, after)
    assert after.getvalue() == before.getvalue()  # the file the live state would have given


def test_the_snapshot_reuses_its_buffers_and_keeps_shared_storage_shared() -> None:
    weight = torch.randn(10, 4)
    live = {"model": {"embed": weight, "head": weight, "row": weight[2]}, "step": 3}
    snapshot = Snapshot()
    copy, _ = snapshot.take(live)
    ptr = copy["model"]["embed"].untyped_storage().data_ptr()
    assert copy["model"]["head"].untyped_storage().data_ptr() == ptr  # tied weights stay tied
    assert copy["model"]["row"].untyped_storage().data_ptr() == ptr and torch.equal(
        copy["model"]["row"], weight[2]
    )
    assert snapshot.nbytes == weight.nbytes
    again, _ = snapshot.take(live)
    assert again["model"]["embed"].untyped_storage().data_ptr() == ptr  # no new allocation
    bigger, _ = snapshot.take({"model": {"embed": torch.randn(20, 4)}})
    assert snapshot.nbytes == 20 * 4 * 4 and bigger["model"]["embed"].shape == (20, 4)


def test_a_background_save_keeps_its_result_or_error() -> None:
    done = BackgroundSave(lambda: 42)
    done.start()
    done.wait()
    assert done.result == 42 and done.error is None and done.done
    failed = BackgroundSave(lambda: 1 / 0)
    failed.start()
    failed.wait()
    assert isinstance(failed.error, ZeroDivisionError) and failed.result is None


# -- through the Trainer -----------------------------------------------------------------------


def test_asynchronous_and_synchronous_saves_write_the_same_checkpoints(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path / "async", async_save=True))
    fit(make_trainer(tmp_path / "sync", async_save=False))
    assert steps(tmp_path / "async") == steps(tmp_path / "sync") == list(range(1, 9))
    for a, s in zip(list_checkpoints(tmp_path / "async"), list_checkpoints(tmp_path / "sync"), strict=True):
        left, right = load_checkpoint(a.payload_path), load_checkpoint(s.payload_path)
        left["config"]["checkpoint"] = right["config"]["checkpoint"]  # its dir and async_save differ
        assert_same(left, right)
    assert no_leftovers(tmp_path / "async") and writers() == []


class Watch:
    """Records, at each batch start, the committed checkpoints' steps and the live writer threads."""

    name = "watch"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[tuple[int, list[int], int]] = []

    @dltrain.hookimpl
    def on_train_batch_start(self, state: dltrain.State) -> None:
        self.seen.append((state.global_step, steps(self.directory), len(writers())))


def test_training_goes_on_while_a_save_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "payload-tmp@3:pause")  # the save of step 3 takes half a second more
    watch = Watch(tmp_path)
    fit(make_trainer(tmp_path, watch, every_n_steps=3))
    after_step_3 = next(seen for seen in watch.seen if seen[0] == 3)
    assert after_step_3 == (3, [], 1)  # the next batch starts; step 3 is still being written
    assert steps(tmp_path) == [3, 6, 8]
    assert all(count <= 1 for _, _, count in watch.seen)


def test_a_save_waits_for_the_one_in_flight_and_the_wait_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "payload-tmp@2:pause")
    monkeypatch.setattr(_io, "FAULT_PAUSE_S", 1.0)
    watch = Watch(tmp_path)
    trainer = make_trainer(tmp_path, watch)
    with pytest.warns(
        UserWarning, match=r"training waited \d\.\d s for checkpoint 'step-000000002'"
    ) as record:
        fit(trainer)
    assert "Save less often (checkpoint.every_n_steps) or write to a faster disk" in str(record[0].message)
    timing = plugin_of(trainer).timing
    assert (
        timing.saves == 9 and timing.waited_s > 0.5
    )  # 8 steps; the fit end replaces the last and timing.blocked_s >= timing.waited_s
    assert all(count <= 1 for _, _, count in watch.seen)  # never two saves in flight
    assert steps(tmp_path) == list(range(1, 9))


def failing_open(name_part: str) -> Any:
    """An ``open`` that fails with ENOSPC when writing a file whose name contains ``name_part``."""

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        if "w" in mode and name_part in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    return fake_open


def test_a_background_failure_is_raised_at_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_io, "open", failing_open("step-000000003.ckpt"), raising=False)
    trainer = make_trainer(tmp_path)
    with pytest.raises(CheckpointError) as info:
        fit(trainer)
    message = str(info.value)
    assert message.startswith(
        f"could not write checkpoint 'step-000000003' to {str(tmp_path)!r} at global step 3: no space is left"
    )
    assert "was being written in the background; training stopped at the next step" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert trainer.state is not None and trainer.state.global_step == 4
    assert steps(tmp_path) == [1, 2]  # the earlier ones, intact
    assert plugin_of(trainer).last == {"name": "step-000000002", "step": 2}  # the failed save is forgotten
    assert no_leftovers(tmp_path) and writers() == []


def test_an_exception_during_training_waits_for_the_save_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "manifest-tmp@3:pause")  # about to commit when the error comes

    class Boom:
        @dltrain.hookimpl
        def on_train_batch_end(self, state: dltrain.State) -> None:
            if state.global_step == 4:
                raise RuntimeError("boom")

    with pytest.raises(dltrain.PluginError, match="boom"):
        fit(make_trainer(tmp_path, Boom(), every_n_steps=3))
    assert steps(tmp_path) == [3]  # committed before fit raised
    verify_checkpoint(list_checkpoints(tmp_path)[0].payload_path)
    assert no_leftovers(tmp_path) and writers() == []


@pytest.fixture
def default_handlers() -> Iterator[None]:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    yield
    for sig, handler in zip((signal.SIGINT, signal.SIGTERM), before, strict=True):
        signal.signal(sig, handler)


@POSIX
def test_ctrl_c_during_a_save_in_flight_commits_it_and_the_final_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_handlers: None
) -> None:
    # The writer of step 3 sends SIGINT, then holds the save half a second.
    monkeypatch.setenv(FAULT_ENV, "payload-tmp@3:int")
    trainer = make_trainer(tmp_path, every_n_steps=3)
    with pytest.raises(KeyboardInterrupt, match="fit stopped by SIGINT"):
        fit(trainer)
    assert trainer.state is not None
    stopped = trainer.state.global_step
    infos = list_checkpoints(tmp_path)
    assert infos[0].global_step == 3 and infos[-1].global_step == stopped
    for info in infos:
        verify_checkpoint(info.payload_path)
    assert no_leftovers(tmp_path) and writers() == []


def test_a_save_by_hand_during_a_save_in_flight_comes_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "payload-tmp@3:pause")

    class ByHand:
        @dltrain.hookimpl
        def on_train_batch_end(self, trainer: Trainer, state: dltrain.State) -> None:
            if state.global_step == 4:
                save_checkpoint(trainer.state_dict(), tmp_path, trigger="manual")

    fit(make_trainer(tmp_path, ByHand(), every_n_steps=3, save_on_fit_end=False))
    infos = list_checkpoints(tmp_path)  # oldest first
    assert [(i.global_step, i.trigger) for i in infos] == [(3, "step"), (4, "manual"), (6, "step")]
