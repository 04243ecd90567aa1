"""Preemptible jobs: ``fit(..., resume="auto")`` and the run file's ``resume``, in one process.

A requeued job runs the same command every time: ``resume="auto"`` starts fresh
when ``checkpoint.dir`` holds no checkpoint and continues from the newest
intact one when it does, saying which on standard error. The same under
torchrun, with a worker killed and the group restarted: ``tests/test_elastic.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain.checkpoint import list_checkpoints
from dltrain.cli import main as dltrain_main
from dltrain.testing import tiny_loader, tiny_model


def fit(checkpoint_dir: Path, *, max_steps: int | None = None, resume: str | None = "auto") -> nn.Module:
    """Two epochs of 8 batches (16 steps), momentum, a checkpoint every 3 steps; returns the model."""
    torch.manual_seed(0)
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=2,
        max_steps=max_steps,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        checkpoint={"dir": checkpoint_dir, "every_n_steps": 3, "keep_last": 3},
    )
    trainer.fit(
        model,
        tiny_loader(batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        resume=resume,
    )
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_resume_auto_starts_fresh_then_continues_from_the_newest_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ckpt"
    fit(directory, max_steps=7)  # the run the scheduler preempted: checkpoints at steps 3 and 6, and 7
    assert f"dltrain: no checkpoint in {str(directory)!r}: starting fresh" in capsys.readouterr().err
    newest = list_checkpoints(directory)[-1]
    assert newest.global_step == 7

    resumed = fit(directory)  # the same command again
    assert f"dltrain: resuming from {str(newest.payload_path)!r} (step 7)" in capsys.readouterr().err
    assert same_weights(resumed, fit(tmp_path / "straight", resume=None))


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ckpt"
    fit(directory, max_steps=7)
    payload = list_checkpoints(directory)[-1].payload_path
    payload.write_bytes(payload.read_bytes()[:-10])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match=r"step-000000007.ckpt' is truncated or overwritten"):
        resumed = fit(directory)
    err = capsys.readouterr().err
    assert "(step 6)" in err and "step-000000006.ckpt" in err
    assert same_weights(resumed, fit(tmp_path / "straight", resume=None))


def test_resume_auto_needs_a_checkpoint_directory() -> None:
    model = tiny_model()
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    with pytest.raises(dltrain.CheckpointError, match=r"resume='auto' needs a checkpoint directory"):
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
            resume="auto",
        )


def _run_file(tmp_path: Path) -> Path:
    run: dict[str, Any] = {
        "seed": 0,
        "trainer": {
            "max_epochs": 2,
            "device": "cpu",
            "progress": "off",
            "run_dir": None,
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_n_epochs": 1},
        },
        "model": {"class_path": "dltrain.testing:tiny_model"},
        "optimizer": {"class_path": "torch.optim:SGD", "init_args": {"lr": 0.1}},
        "loss": {"class_path": "torch.nn:CrossEntropyLoss"},
        "data": {"train": {"class_path": "dltrain.testing:tiny_loader", "init_args": {"batch_size": 8}}},
        "resume": "auto",
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    return path


def test_the_run_file_and_the_command_line_take_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_file = _run_file(tmp_path)
    assert dltrain_main(["fit", "--config", str(run_file), "--trainer.max_epochs", "1"]) == 0
    assert "starting fresh" in capsys.readouterr().err
    assert [i.global_step for i in list_checkpoints(tmp_path / "ckpt")] == [8]
    assert dltrain_main(["fit", "--config", str(run_file)]) == 0  # resume: auto, from the file
    assert (
        f"resuming from {str(tmp_path / 'ckpt' / 'step-000000008.ckpt')!r} (step 8)"
        in capsys.readouterr().err
    )
    assert [i.global_step for i in list_checkpoints(tmp_path / "ckpt")][-1] == 16
    # An override on the command line, as for any key of the run file.
    assert dltrain_main(["fit", "--config", str(run_file), "--resume", "last", "--print-config"]) == 0
    assert "resume: last" in capsys.readouterr().out
