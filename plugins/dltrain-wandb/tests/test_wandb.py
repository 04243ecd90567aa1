"""The W&B plugin, offline: real runs, read back from the files W&B writes (no account, no network)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model

wandb = pytest.importorskip("wandb", reason="needs wandb: pip install -e plugins/dltrain-wandb")

from dltrain_wandb import WandbPlugin, versions  # noqa: E402  (after the skip)
from wandb.proto import wandb_internal_pb2  # noqa: E402

HERE = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 180
FLUSH_TIMEOUT_S = 30
WANDB_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_DISABLED", "WANDB_ENTITY", "WANDB_RUN_ID")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test in its own folder, W&B's own folders inside it, installed plugins loading as for a user."""
    monkeypatch.chdir(tmp_path)
    for name in ("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", *WANDB_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, folder in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "cfg"),
    ):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / folder))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


# -- reading an offline run back ---------------------------------------------------------
# W&B writes each run's records to a ``run-<id>.wandb`` file: a header, then protobuf
# ``Record`` messages in LevelDB's log format (32 KiB blocks; each chunk has a 7-byte header:
# CRC32C, length, kind = full / first / middle / last).

_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    found, pending, pos = [], b"", 7  # the file header: ":W&B", magic, version
    while pos + _HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER.size:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if pos + length > len(data):  # still being written
            break
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one local run folder holds: the run record, config, history rows, summary, artifacts, exit."""

    run_id: str = ""
    project: str = ""
    job_type: str = ""
    name: str = ""
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None


def finished_records(log: Path) -> list[Any]:
    """The records of a finished run: wandb-core may still be writing them when ``finish()`` returns."""
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while True:
        found = records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_run(folder: Path) -> OfflineRun:
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun()
    for record in finished_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.job_type, run.name = r.run_id, r.project, r.job_type, r.display_name
            run.resumed = r.resumed
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def run_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("run-*.wandb"))


# -- runs ----------------------------------------------------------------------------------


def fit(trainer: dltrain.Trainer, epochs_model: torch.nn.Module | None = None) -> dltrain.History:
    model = epochs_model or tiny_model()
    return trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
    )


def make_trainer(**config: Any) -> dltrain.Trainer:
    config.setdefault("device", "cpu")
    config.setdefault("progress", "off")
    return dltrain.Trainer(**config)


def test_an_offline_fit_records_config_metrics_versions_and_the_model(tmp_path: Path) -> None:
    plugin = WandbPlugin(mode="offline", config={"data": "tiny", "lr": 0.1}, log_model=True, tags=["test"])
    trainer = make_trainer(max_epochs=2, log_every_n_steps=4, autoload_plugins=False, plugins=[plugin])
    model = tiny_model()
    history = fit(trainer, model)
    test = trainer.test(model, tiny_loader(samples=32, seed=2))

    run_path = trainer.get_plugin("metric_log").run_path
    assert plugin.local_dir is not None and plugin.local_dir.parent == run_path / "wandb"
    fit_folder, test_folder = run_folders(run_path / "wandb")  # offline, the test's resume is a second folder
    run = read_run(fit_folder)
    assert run.run_id == plugin.run_id and run.project == "dltrain" and run.job_type == "fit"
    assert run.name == run_path.name and run.exit_code == 0

    # config: the TrainerConfig, the model and optimizer, the versions, and the user's values
    assert run.config["max_epochs"] == 2 and run.config["log_every_n_steps"] == 4
    assert (
        run.config["model"] == "Sequential" and run.config["optimizer"] == "SGD" and run.config["lr"] == 0.1
    )
    assert run.config["versions"] == versions()
    assert {"python", "torch", "dltrain"} <= set(run.config["versions"])
    assert run.config["versions"]["dltrain"] == dltrain.__version__ and run.config["data"] == "tiny"

    # history: step metrics every 4 steps; each epoch's complete row (train and val) at its last step
    steps = {row["_step"]: row for row in run.history}
    assert [s for s, row in sorted(steps.items()) if "train_loss_step" in row] == [4, 8, 12, 16]
    assert all(row["lr"] == 0.1 for row in run.history)
    epoch_rows = [steps[8], steps[16]]
    for row, expected in zip(epoch_rows, history.epochs, strict=True):
        assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert [row["epoch"] for row in epoch_rows] == [1, 2]

    # summary: the last values and why the fit stopped
    assert run.summary["val_loss"] == pytest.approx(history["val_loss"][-1])
    assert run.summary["stop_reason"] == "max_epochs reached"

    # the final model as an artifact
    (artifact,) = run.artifacts
    assert artifact.name == f"model-{plugin.run_id}" and artifact.type == "model"
    assert [entry.path for entry in artifact.manifest.contents] == ["model_state_dict.pt"]
    assert json.loads(artifact.metadata) == {"global_step": 16, "epoch": 2}

    # the test after the fit: the same run, resumed; its metrics in the summary
    later = read_run(test_folder)
    assert later.run_id == plugin.run_id and later.job_type == "test" and later.exit_code == 0
    assert later.summary["test_accuracy"] == pytest.approx(test["test_accuracy"])
    assert later.summary["test_loss"] == pytest.approx(test["test_loss"])


def test_the_installed_plugin_stays_idle_and_does_not_import_wandb_until_asked() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dltrain")}
    if "wandb" not in names:
        pytest.skip("dltrain-wandb is not installed: pip install -e plugins/dltrain-wandb")
    assert names["wandb"] == "dltrain_wandb:WandbPlugin"
    # A fresh process, as a user's script: the plugin is loaded, no W&B setting is made.
    script = (
        "import sys, torch, dltrain\n"
        "from dltrain.testing import tiny_loader, tiny_model\n"
        "trainer = dltrain.Trainer(max_epochs=1, device='cpu', progress='off')\n"
        "info = {p.name: p for p in trainer.plugin_manager.plugins()}['wandb']\n"
        "model = tiny_model()\n"
        "trainer.fit(model, tiny_loader(samples=16), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),"
        " loss_fn=torch.nn.CrossEntropyLoss())\n"
        "print(info.source, trainer.get_plugin('wandb').run_id, 'wandb' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["entrypoint", "None", "False"]
    assert not list(Path.cwd().rglob("*.wandb"))


def test_wandb_settings_in_the_environment_turn_the_installed_plugin_on_or_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if make_trainer().get_plugin("wandb") is None:
        pytest.skip("dltrain-wandb is not installed: pip install -e plugins/dltrain-wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    trainer = make_trainer(max_epochs=1, run_dir=None)
    fit(trainer)
    (folder,) = run_folders(tmp_path / "elsewhere")
    run = read_run(folder)
    assert run.project == "from-env" and run.run_id == trainer.get_plugin("wandb").run_id

    for env, value in (("WANDB_MODE", "disabled"), ("WANDB_DISABLED", "true")):
        with monkeypatch.context() as patch:
            patch.setenv(env, value)
            trainer = make_trainer(max_epochs=1)
            fit(trainer)
            assert trainer.get_plugin("wandb").run_id is None
    trainer = make_trainer(max_epochs=1, disable_plugins=["wandb"])
    assert trainer.get_plugin("wandb") is None
    mine = WandbPlugin(enabled=False)  # your instance, named "wandb", replaces the installed one
    assert make_trainer(plugins=[mine]).get_plugin("wandb") is mine
    assert len(run_folders(tmp_path)) == 1


def test_a_failed_fit_finishes_its_run_as_failed(tmp_path: Path) -> None:
    class Boom:
        @dltrain.hookimpl
        def on_train_epoch_end(self) -> None:
            raise RuntimeError("boom")

    plugin = WandbPlugin(mode="offline")
    with pytest.raises(dltrain.PluginError, match="boom"):
        fit(make_trainer(autoload_plugins=False, plugins=[plugin, Boom()]))
    (folder,) = run_folders(tmp_path)
    assert read_run(folder).exit_code == 1


def test_a_run_you_started_is_logged_into_and_left_open(tmp_path: Path) -> None:
    mine = wandb.init(project="mine", mode="offline", dir=str(tmp_path), config={"note": "mine"})
    try:
        trainer = make_trainer(max_epochs=1, run_dir=None, autoload_plugins=False, plugins=[WandbPlugin()])
        history = fit(trainer)
        assert trainer.get_plugin("wandb").run_id == mine.id
        mine.log({"after": 1.0})  # still open: the plugin leaves your run to you
    finally:
        mine.finish()
    (folder,) = run_folders(tmp_path)
    run = read_run(folder)
    assert run.config["note"] == "mine" and run.config["max_epochs"] == 1
    assert any(row.get("val_loss") == pytest.approx(history["val_loss"][0]) for row in run.history)
    assert any("after" in row for row in run.history)


def test_it_is_built_from_plain_keyword_arguments() -> None:
    # Only JSON-able arguments: how a configuration file's plugin list would build it.
    kwargs = json.loads(
        '{"project": "p", "mode": "offline", "tags": ["a"], "config": {"data": "x"}, "log_model": true,'
        ' "init_kwargs": {"group": "g"}, "name": "my_wandb"}'
    )
    trainer = make_trainer(plugins=[WandbPlugin(**kwargs)], run_dir=None)
    info = {p.name: p for p in trainer.plugin_manager.plugins()}["my_wandb"]
    assert (
        info.source == "user" and "on_step_metrics" in info.hooks and "on_train_batch_end" not in info.hooks
    )


# -- under torchrun ----------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)
def test_under_torchrun_only_rank_0_creates_a_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(HERE / "_dist_wandb.py"), "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ids = [json.loads((tmp_path / f"rank{r}.json").read_text())["run_id"] for r in (0, 1)]
    assert ids[0] is not None and ids[1] is None
    (folder,) = run_folders(tmp_path)
    run = read_run(folder)
    assert run.run_id == ids[0] and run.config["max_epochs"] == 2
    # 64 samples on 2 ranks, batches of 8: 4 steps an epoch; both epochs' rows logged once
    assert [row["epoch"] for row in run.history if "epoch" in row] == [1, 2]
