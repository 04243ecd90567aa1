"""The MLflow plugin, installed as a distribution: a local store, and a real tracking server."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model

pytest.importorskip("mlflow", reason="needs mlflow: pip install -e 'plugins/dltrain-mlflow[test]'")

from dltrain_mlflow import MLflowPlugin
from mlflow.tracking import MlflowClient

SERVER_START_TIMEOUT_S = 120.0


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test in its own folder, with entry-point plugins loading as for a user."""
    monkeypatch.chdir(tmp_path)
    for name in ("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def fit_and_test(trainer: dltrain.Trainer) -> tuple[dltrain.History, dict[str, float]]:
    model = tiny_model()
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
    )
    return history, trainer.test(model, tiny_loader(samples=32, seed=2))


def make_trainer(**config: object) -> dltrain.Trainer:
    config.setdefault("device", "cpu")
    config.setdefault("progress", "off")
    return dltrain.Trainer(**config)  # type: ignore[arg-type]


def check_tracked_run(
    client: MlflowClient, run_id: str, history: dltrain.History, test: dict[str, float]
) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "2" and run.data.params["optimizer"] == "SGD"
    assert run.data.params["lr"] == "0.1"
    val_loss = client.get_metric_history(run_id, "val_loss")
    assert [m.value for m in sorted(val_loss, key=lambda m: m.step)] == pytest.approx(history["val_loss"])
    assert [m.step for m in client.get_metric_history(run_id, "train_loss_step")] == [4, 8, 12, 16]
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["test_accuracy"])
    artifacts = [a.path for a in client.list_artifacts(run_id, "model")]
    assert artifacts == ["model/model_state_dict.pt"]


def test_the_installed_distribution_registers_its_entry_point() -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dltrain")}
    if "mlflow" not in names:
        pytest.skip("dltrain-mlflow is not installed: pip install -e plugins/dltrain-mlflow")
    assert names["mlflow"] == "dltrain_mlflow:MLflowPlugin"
    info = {p.name: p for p in make_trainer().plugin_manager.plugins()}["mlflow"]
    assert info.source == "entrypoint"


def test_a_fit_is_tracked_in_a_local_store_under_the_run_dir(tmp_path: Path) -> None:
    plugin = MLflowPlugin()
    trainer = make_trainer(max_epochs=2, log_every_n_steps=4, autoload_plugins=False, plugins=[plugin])
    history, test = fit_and_test(trainer)
    assert plugin.tracking_uri == (tmp_path / "runs" / "mlruns").as_uri()
    assert plugin.run_id is not None
    check_tracked_run(MlflowClient(tracking_uri=plugin.tracking_uri), plugin.run_id, history, test)
    run = MlflowClient(tracking_uri=plugin.tracking_uri).get_run(plugin.run_id)
    run_path = trainer.plugin_manager.get_plugin("metric_log").run_path  # type: ignore[union-attr]
    assert run.info.run_name == run_path.name and run.data.tags["dltrain.run_path"] == str(run_path)


def test_a_failed_fit_is_marked_failed(tmp_path: Path) -> None:
    class Boom:
        @dltrain.hookimpl
        def on_train_epoch_end(self) -> None:
            raise RuntimeError("boom")

    plugin = MLflowPlugin(log_model=False)
    trainer = make_trainer(autoload_plugins=False, plugins=[plugin, Boom()])
    with pytest.raises(dltrain.PluginError, match="boom"):
        fit_and_test(trainer)
    assert plugin.run_id is not None
    assert MlflowClient(tracking_uri=plugin.tracking_uri).get_run(plugin.run_id).info.status == "FAILED"


def test_disabled_by_name_or_by_autoload_or_without_a_run_dir_it_records_nothing(tmp_path: Path) -> None:
    for trainer in (
        make_trainer(disable_plugins=["mlflow"]),
        make_trainer(autoload_plugins=False),
    ):
        assert trainer.plugin_manager.get_plugin("mlflow") is None
        fit_and_test(trainer)
    plugin = MLflowPlugin()
    fit_and_test(make_trainer(run_dir=None, autoload_plugins=False, plugins=[plugin]))
    assert plugin.run_id is None
    assert not list(tmp_path.rglob("mlruns"))


# -- a real tracking server ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 and a free port; stopped (with its children) after the tests."""
    if importlib.util.find_spec("flask") is None:
        pytest.skip("the MLflow tracking server needs the full mlflow: pip install 'dltrain-mlflow[server]'")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    env = {
        **os.environ,
        "MLFLOW_ALLOW_FILE_STORE": "true",  # a file store starts in seconds; sqlite migrates first
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job workers
    }
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", str(root / "store"), "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                state = f"exited with {server.returncode}" if server.poll() is not None else "did not answer"
                pytest.fail(f"mlflow server {state} within {SERVER_START_TIMEOUT_S:.0f} s:\n{tail}")
            time.sleep(0.3)
        yield url
    finally:
        # The server runs in its own session: stop its whole process group, then make sure.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


def test_a_fit_is_tracked_on_a_tracking_server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dltrain-server-test")
    trainer = make_trainer(max_epochs=2, log_every_n_steps=4)  # the installed plugin, no setup
    plugin = trainer.plugin_manager.get_plugin("mlflow")
    if plugin is None:
        plugin = MLflowPlugin()
        trainer = make_trainer(max_epochs=2, log_every_n_steps=4, autoload_plugins=False, plugins=[plugin])
    assert isinstance(plugin, MLflowPlugin)
    history, test = fit_and_test(trainer)
    assert plugin.tracking_uri == mlflow_server and plugin.run_id is not None
    client = MlflowClient(tracking_uri=mlflow_server)
    check_tracked_run(client, plugin.run_id, history, test)
    assert client.get_experiment_by_name("dltrain-server-test") is not None
