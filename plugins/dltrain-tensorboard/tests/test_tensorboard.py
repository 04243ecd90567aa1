"""The TensorBoard plugin, installed as a distribution and found through its entry point."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model

pytest.importorskip("tensorboard", reason="needs tensorboard: pip install -e plugins/dltrain-tensorboard")

from dltrain_tensorboard import TensorBoardPlugin, metric_tag
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test in its own folder, with entry-point plugins loading as for a user."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("DLTRAIN_TENSORBOARD_DIR", raising=False)
    return tmp_path


def fit(trainer: dltrain.Trainer, *, val: bool = True) -> dltrain.History:
    model = tiny_model()
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1) if val else None,
    )
    trainer.test(model, tiny_loader(samples=32, seed=2))
    return history


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_the_installed_distribution_registers_its_entry_point() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dltrain")}
    if "tensorboard" not in names:
        pytest.skip("dltrain-tensorboard is not installed: pip install -e plugins/dltrain-tensorboard")
    assert names["tensorboard"] == "dltrain_tensorboard:TensorBoardPlugin"
    info = {p.name: p for p in dltrain.Trainer().plugin_manager.plugins()}["tensorboard"]
    assert info.source == "entrypoint"
    assert "on_step_metrics" in info.hooks and "on_train_batch_end" not in info.hooks


def test_a_fit_writes_scalars_and_hparams_next_to_the_metric_log() -> None:
    trainer = dltrain.Trainer(
        max_epochs=3,
        device="cpu",
        progress="off",
        log_every_n_steps=4,
        plugins=[TensorBoardPlugin()],
        autoload_plugins=False,
    )
    history = fit(trainer)
    run_path = trainer.plugin_manager.get_plugin("metric_log").run_path  # type: ignore[union-attr]
    plugin = trainer.plugin_manager.get_plugin("tensorboard")
    assert isinstance(plugin, TensorBoardPlugin) and plugin.log_dir == run_path / "tensorboard"

    events = read_events(run_path / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/val", "loss/train_step", "lr"} <= scalars
    assert {"loss/test", "accuracy/test", "epoch"} <= scalars
    val_loss = [e.value for e in events.Scalars("loss/val")]
    assert val_loss[:3] == pytest.approx(history["val_loss"], rel=1e-6)
    # add_hparams repeats the final values at the last step, for the HParams tab
    assert sorted({e.step for e in events.Scalars("loss/train")}) == [8, 16, 24]
    assert [e.step for e in events.Scalars("loss/train_step")] == [4, 8, 12, 16, 20, 24]
    assert events.Scalars("loss/test")[0].step == 24  # after the fit's last step
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_the_entry_point_plugin_needs_no_setup_and_writes_in_the_run_folder() -> None:
    if "tensorboard" not in {ep.name for ep in importlib.metadata.entry_points(group="dltrain")}:
        pytest.skip("dltrain-tensorboard is not installed: pip install -e plugins/dltrain-tensorboard")
    trainer = dltrain.Trainer(max_epochs=1, device="cpu", progress="off")
    fit(trainer, val=False)
    run_path = trainer.plugin_manager.get_plugin("metric_log").run_path  # type: ignore[union-attr]
    assert "loss/train" in read_events(run_path / "tensorboard").Tags()["scalars"]


def test_disabled_by_name_or_by_autoload_it_is_not_there_and_the_run_works(tmp_path: Path) -> None:
    for trainer in (
        dltrain.Trainer(device="cpu", progress="off", disable_plugins=["tensorboard"]),
        dltrain.Trainer(device="cpu", progress="off", autoload_plugins=False),
    ):
        assert trainer.plugin_manager.get_plugin("tensorboard") is None
        fit(trainer, val=False)
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_without_a_run_dir_it_writes_nothing_and_stays_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = dltrain.Trainer(
        device="cpu", progress="off", run_dir=None, autoload_plugins=False, plugins=[TensorBoardPlugin()]
    )
    fit(trainer)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_log_dir_from_the_constructor_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit(
        dltrain.Trainer(
            device="cpu",
            progress="off",
            run_dir=None,
            autoload_plugins=False,
            plugins=[TensorBoardPlugin(tmp_path / "mine")],
        )
    )
    assert list((tmp_path / "mine").glob("events.out.tfevents*"))
    monkeypatch.setenv("DLTRAIN_TENSORBOARD_DIR", str(tmp_path / "from_env"))
    fit(
        dltrain.Trainer(
            device="cpu", progress="off", run_dir=None, autoload_plugins=False, plugins=[TensorBoardPlugin()]
        )
    )
    assert list((tmp_path / "from_env").glob("events.out.tfevents*"))


def test_metric_names_become_grouped_tags() -> None:
    assert metric_tag("val_loss") == "loss/val"
    assert metric_tag("train_top5_accuracy") == "top5_accuracy/train"
    assert metric_tag("lr") == "lr"
