"""The built-in ``checkpoint`` plugin in a real Trainer: when it saves, what it keeps, its state."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain import CheckpointError, DltrainError, Trainer, TrainerConfig
from dltrain.checkpoint import list_checkpoints, load_checkpoint, load_for_resume
from dltrain.default_plugins.checkpoint import CheckpointPlugin, make_plugin
from dltrain.state import RunKind, State
from dltrain.testing import tiny_loader, tiny_model


def make_trainer(directory: Path, *, plugins: tuple[object, ...] = (), **settings: Any) -> Trainer:
    """8 batches an epoch (64 samples, batches of 8); ``ckpt_*`` settings go to the checkpoint config."""
    checkpoint = {
        "dir": directory,
        **{k[5:]: settings.pop(k) for k in list(settings) if k.startswith("ckpt_")},
    }
    defaults: dict[str, Any] = {"max_epochs": 2, "device": "cpu", "seed": 0, "progress": "off"}
    return Trainer(
        **{**defaults, **settings},
        run_dir=None,
        autoload_plugins=False,
        checkpoint=checkpoint,
        plugins=plugins,
    )


def fit(trainer: Trainer, *, val: bool = False, resume: str | None = None, **kw: Any) -> dltrain.History:
    model = kw.pop("model", None) or tiny_model()
    return trainer.fit(
        model,
        tiny_loader(batch_size=8, shuffle=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1) if val else None,
        resume=resume,
        **kw,
    )


def saved(directory: Path) -> list[tuple[int, str]]:
    return [(i.global_step, i.trigger) for i in list_checkpoints(directory)]


def plugin_of(trainer: Trainer) -> CheckpointPlugin:
    plugin = trainer.plugin_manager.get_plugin("checkpoint")
    assert isinstance(plugin, CheckpointPlugin)
    return plugin


def test_the_plugin_exists_only_when_checkpointing_is_configured(tmp_path: Path) -> None:
    assert make_plugin(TrainerConfig()) is None
    plugin = make_plugin(TrainerConfig(checkpoint={"dir": tmp_path}))
    assert isinstance(plugin, CheckpointPlugin) and plugin.name == "checkpoint"


def test_it_saves_every_n_steps_and_at_each_epoch_end_once_per_step(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, ckpt_every_n_steps=3, ckpt_keep_last=100))
    # steps 3, 6, 9...; epochs end at steps 8 and 16; step 15 and the fit end add nothing new
    assert saved(tmp_path) == [
        (3, "step"),
        (6, "step"),
        (8, "epoch"),
        (9, "step"),
        (12, "step"),
        (15, "step"),
        (16, "epoch"),
    ]


def test_an_epoch_end_save_replaces_the_step_save_of_the_same_step(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, ckpt_every_n_steps=4, ckpt_keep_last=100))
    assert saved(tmp_path) == [(4, "step"), (8, "epoch"), (12, "step"), (16, "epoch")]
    assert [i.name for i in list_checkpoints(tmp_path)][-1] == "step-000000016-1"


def test_with_accumulation_it_saves_only_after_whole_optimizer_steps(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, accumulate_grad_batches=3, ckpt_every_n_steps=1, ckpt_keep_last=100))
    infos = list_checkpoints(tmp_path)
    assert [i.global_step for i in infos] == [1, 2, 3, 4, 5, 6]  # 8 batches: groups of 3, 3, 2
    assert all(i.micro_step == 0 for i in infos)


def test_epoch_saves_wait_for_validation_so_best_can_rank_by_val_loss(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, max_epochs=3, ckpt_monitor="val_loss", ckpt_keep_last=1, ckpt_keep_best=1
    )
    history = fit(trainer, val=True)
    infos = list_checkpoints(tmp_path)
    best_epoch = min(range(3), key=lambda e: history["val_loss"][e])
    expected_steps = sorted({(best_epoch + 1) * 8, 24})
    assert [i.global_step for i in infos] == expected_steps
    assert all(i.stage == "done" and i.score is not None and "val_loss" in i.metrics for i in infos)
    _, path = load_for_resume("best", tmp_path)
    assert path.name == f"step-{(best_epoch + 1) * 8:09d}.ckpt"
    assert plugin_of(trainer).best_path == path


def test_without_validation_that_epoch_the_epoch_save_happens_after_training(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, max_epochs=3, val_every_n_epochs=2, ckpt_keep_last=10), val=True)
    infos = list_checkpoints(tmp_path)
    assert [(i.global_step, "val_loss" in i.metrics) for i in infos] == [(8, False), (16, True), (24, True)]


def test_fit_end_saves_where_a_max_steps_stop_left_off(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, max_steps=5, ckpt_every_n_steps=3, ckpt_keep_last=10))
    assert [step for step, _ in saved(tmp_path)] == [3, 5]


class PoisonAtStep:
    """Turns one weight into NaN after optimizer step ``at``."""

    name = "poison"

    def __init__(self, at: int) -> None:
        self.at = at

    @dltrain.hookimpl
    def on_train_batch_end(self, trainer: Trainer, state: State) -> None:
        if state.global_step == self.at:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.nan


def test_a_model_with_nan_weights_is_never_saved(tmp_path: Path) -> None:
    # "stop": the run ends cleanly at the poisoned step ("raise", the default, would raise there).
    trainer = make_trainer(
        tmp_path, max_steps=2, on_nonfinite="stop", ckpt_every_n_steps=1, plugins=(PoisonAtStep(2),)
    )
    with pytest.warns(UserWarning, match="not saving a checkpoint at global step 2: the model has NaN"):
        fit(trainer)
    assert saved(tmp_path) == [(1, "step")]


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    plugin = CheckpointPlugin(TrainerConfig(checkpoint={"dir": tmp_path / "ckpt", "every_n_steps": 1}))
    state = State(run=RunKind.FIT, rank=1, world_size=2)
    plugin.on_fit_start(state)
    state.global_step = 1
    payloads: list[int] = []

    class StubTrainer:  # what the plugin uses of a Trainer on rank 1: check the weights, build the payload
        model = torch.nn.Linear(2, 2)

        def state_dict(self) -> dict[str, int]:
            payloads.append(1)
            return {}

    hook = plugin.on_train_batch_end(trainer=StubTrainer(), state=state)  # type: ignore[arg-type]
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(None)
    assert not (tmp_path / "ckpt").exists()
    assert payloads == [1]  # built on every rank, for state that is gathered across ranks


def test_the_plugin_state_round_trips_and_is_in_every_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, max_epochs=3, ckpt_monitor="val_loss", ckpt_keep_best=2, ckpt_keep_last=1
    )
    fit(trainer, val=True)
    plugin = plugin_of(trainer)
    state = plugin.state_dict()
    assert len(state["best"]) == 2 and state["last"]["step"] == 24
    fresh = CheckpointPlugin(trainer.config)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.best_path == plugin.best_path and fresh.last_path == plugin.last_path
    last = list_checkpoints(tmp_path)[-1]
    assert load_checkpoint(last.payload_path)["plugins"]["checkpoint"] == state  # it knows itself


def test_a_fresh_run_into_a_used_directory_warns(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning, match="already holds 1 checkpoint") as record:
        fit(make_trainer(tmp_path, max_epochs=1))
    # Attributed to the user's code that started the run, not to a frame inside the loop.
    assert record[0].filename == __file__


# -- resume through the Trainer ------------------------------------------------------------


def test_resume_last_without_checkpointing_says_how_to_fix_it() -> None:
    trainer = Trainer(max_epochs=1, device="cpu", progress="off", run_dir=None, autoload_plugins=False)
    with pytest.raises(CheckpointError, match=r"set checkpoint=\{'dir'"):
        fit(trainer, resume="last")


def test_resume_with_a_run_that_computes_differently_is_an_error_listing_the_differences(
    tmp_path: Path,
) -> None:
    fit(make_trainer(tmp_path, max_epochs=1))
    with pytest.raises(DltrainError, match="accumulate_grad_batches: 1 in the checkpoint, 2 now"):
        fit(make_trainer(tmp_path, accumulate_grad_batches=2), resume="last")
    with pytest.raises(DltrainError, match=r"shape \[16, 8\] in the checkpoint, \[16, 9\] now"):
        fit(make_trainer(tmp_path), resume="last", model=torch.nn.Sequential(torch.nn.Linear(9, 16)))


def test_resume_strict_false_downgrades_the_difference_to_a_warning(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning, match="accumulate_grad_batches"):
        history = fit(make_trainer(tmp_path, accumulate_grad_batches=2), resume="last", resume_strict=False)
    assert len(history.epochs) == 2


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    fit(make_trainer(tmp_path, max_epochs=2, ckpt_keep_last=2))
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.payload_path.read_bytes())
    data[-100] ^= 0xFF
    newest.payload_path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=newest.name):
        history = fit(make_trainer(tmp_path, max_epochs=3), resume="last")
    assert [row["epoch"] for row in history.epochs] == [1, 2, 3]
    manifest = json.loads(list_checkpoints(tmp_path)[-1].manifest_path.read_text())
    assert manifest["global_step"] == 24
