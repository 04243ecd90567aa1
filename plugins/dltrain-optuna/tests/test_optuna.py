"""The Optuna pruning plugin: trials that report each epoch, get pruned, and end as PRUNED."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain.testing import tiny_loader, tiny_model

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install -e plugins/dltrain-optuna")

from dltrain_optuna import OptunaPruning  # noqa: E402  (after the skip)

HERE = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test in its own folder; installed plugins stay out (the plugin is registered by hand)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tmp_path


def fit(
    plugin: OptunaPruning, max_epochs: int = 4, val: bool = True
) -> tuple[dltrain.Trainer, dltrain.History]:
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=max_epochs, device="cpu", progress="off", run_dir=None, plugins=[plugin]
    )
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1) if val else None,
    )
    return trainer, history


def test_a_pruned_trial_stops_its_fit_and_ends_as_pruned() -> None:
    # The threshold pruner prunes any trial whose val_loss is above 0 once 2 epochs are reported.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=2))
    seen: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        plugin = OptunaPruning(trial, monitor="val_loss")
        trainer, history = fit(plugin, max_epochs=5)
        seen.update(history=history, state=trainer.state, plugin=plugin)
        plugin.check_pruned()
        return history["val_loss"][-1]

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state is optuna.trial.TrialState.PRUNED
    history, state, plugin = seen["history"], seen["state"], seen["plugin"]
    assert len(history.epochs) == 2 and state.global_step == 16  # 8 steps an epoch, stopped after epoch 2
    assert trial.intermediate_values == pytest.approx({1: history["val_loss"][0], 2: history["val_loss"][1]})
    assert plugin.pruned and plugin.pruned_epoch == 2 and plugin.reported == trial.intermediate_values
    assert state.stop_reason.startswith("optuna pruned the trial after epoch 2 (val_loss=")


def test_a_trial_that_is_not_pruned_reports_every_epoch_and_completes() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())

    def objective(trial: optuna.Trial) -> float:
        plugin = OptunaPruning(trial, monitor="val_accuracy")
        _, history = fit(plugin, max_epochs=3)
        plugin.check_pruned()  # not pruned: returns
        assert not plugin.pruned
        return history["val_accuracy"][-1]

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state is optuna.trial.TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    assert trial.value == trial.intermediate_values[3]


def test_a_standalone_validate_after_the_fit_reports_nothing() -> None:
    study = optuna.create_study()
    trial = study.ask()
    plugin = OptunaPruning(trial)
    trainer, _ = fit(plugin, max_epochs=2)
    trainer.validate(tiny_model(), tiny_loader(samples=32, seed=1), loss_fn=torch.nn.CrossEntropyLoss())
    assert sorted(study.trials[0].intermediate_values) == [1, 2]


def test_a_metric_the_validation_does_not_compute_is_an_error_naming_those_it_does() -> None:
    plugin = OptunaPruning(optuna.create_study().ask(), monitor="val_acc")
    with pytest.raises(dltrain.ConfigError, match=r"val_acc.*\['val_accuracy', 'val_loss'\]"):
        fit(plugin)


def test_without_a_trial_the_fit_fails_at_its_start_with_the_fix() -> None:
    with pytest.raises(dltrain.ConfigError, match=r"no trial.*OptunaPruning\(trial"):
        fit(OptunaPruning(monitor="val_loss"))


def test_a_fit_without_validation_warns_that_nothing_was_reported() -> None:
    with pytest.warns(UserWarning, match="ran no validation"):
        fit(OptunaPruning(optuna.create_study().ask()), max_epochs=1, val=False)


def test_a_torch_distributed_trial_is_refused_with_the_fix() -> None:
    class TorchDistributedTrial:  # stands in for optuna_integration's class of that name
        pass

    with pytest.raises(dltrain.ConfigError, match="pass the trial it wraps on rank 0 and None"):
        OptunaPruning(TorchDistributedTrial())


def test_it_is_listed_among_the_trainers_plugins_from_plain_keyword_arguments() -> None:
    # Only JSON-able arguments: how a configuration file's plugin list would build it.
    plugin = OptunaPruning(**json.loads('{"monitor": "val_accuracy", "name": "pruning"}'))
    trainer = dltrain.Trainer(progress="off", run_dir=None, plugins=[plugin])
    info = {p.name: p for p in trainer.plugin_manager.plugins()}["pruning"]
    assert info.source == "user" and info.origin == "dltrain_optuna.OptunaPruning"
    assert {"on_fit_start", "on_eval_epoch_end", "on_fit_end"} <= set(info.hooks)
    assert "pruning" in next(
        line for line in trainer.explain_hooks().splitlines() if "on_eval_epoch_end" in line
    )


# -- under torchrun ----------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)
def test_under_torchrun_every_rank_stops_at_the_step_where_rank_0_prunes(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",  # a hung collective fails the job before the test's timeout
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(HERE / "_dist_prune.py"), "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 64 samples, 2 ranks, batches of 8: 4 steps an epoch; pruned after epoch 2 of 6.
    assert rank0["global_step"] == rank1["global_step"] == 8
    assert rank0["epochs"] == rank1["epochs"] == 2
    assert rank0["pruned_epoch"] == rank1["pruned_epoch"] == 2
    assert rank0["raised"] == rank1["raised"] and rank0["raised"].startswith("pruned after epoch 2")
    assert rank0["trial_state"] == "PRUNED" and rank0["reported"] == ["1", "2"]
    assert rank1["reported"] == []  # only rank 0 talks to the study
