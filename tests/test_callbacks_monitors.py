"""LearningRateMonitor, GradientNormMonitor and ModelSummary on real runs: what reaches the metric log."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import ConfigError
from dltrain.callbacks import GradientNormMonitor, LearningRateMonitor, ModelSummary
from dltrain.default_plugins.metric_log import read_metrics
from dltrain.state import RunKind, State
from dltrain.testing import tiny_loader, tiny_model


def two_optimizers(model: nn.Module) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """'body': SGD over the first layer in two groups (with and without momentum), its learning rate
    halved every step; 'head': Adam over the last layer."""
    body = torch.optim.SGD(
        [
            {"params": [model[0].weight], "lr": 0.1, "momentum": 0.9},
            {"params": [model[0].bias], "lr": 0.05},
        ]
    )
    head = torch.optim.Adam(model[2].parameters(), lr=0.01, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.StepLR(body, step_size=1, gamma=0.5)
    return {"body": body, "head": head}, {"body": {"scheduler": schedule, "interval": "step"}}


def fit_logged(*plugins: object, **config: Any) -> tuple[dltrain.Trainer, list[dict[str, Any]]]:
    """Two epochs of 4 steps with both optimizers, logged every 2 steps; the trainer and its metric rows."""
    model = tiny_model()
    optimizers, schedulers = two_optimizers(model)
    fields: dict[str, Any] = {"log_every_n_steps": 2, **config}
    trainer = dltrain.Trainer(max_epochs=2, device="cpu", progress="off", plugins=list(plugins), **fields)
    trainer.fit(
        model, tiny_loader(), optimizer=optimizers, scheduler=schedulers, loss_fn=nn.CrossEntropyLoss()
    )
    run = trainer.get_plugin("metric_log").run_path
    assert isinstance(run, Path)
    return trainer, read_metrics(run)


def test_every_group_of_every_optimizer_reaches_the_step_and_epoch_rows() -> None:
    trainer, rows = fit_logged(LearningRateMonitor())
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    for row in steps:
        assert row["lr-body/group0"] == pytest.approx(0.1 * 0.5 ** row["step"])  # after the step's scheduler
        assert row["lr-body/group1"] == pytest.approx(0.05 * 0.5 ** row["step"])
        assert row["lr-body/group0"] == row["lr_body"]  # the Trainer's own: the first group's, kept
        assert row["momentum-body/group0"] == 0.9
        assert "momentum-body/group1" not in row  # SGD without momentum: nothing to watch
        assert (row["lr-head/group0"], row["beta1-head/group0"], row["beta2-head/group0"]) == (
            0.01,
            0.8,
            0.99,
        )
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["train_lr-body/group0"] for r in epochs] == pytest.approx([0.1 * 0.5**4, 0.1 * 0.5**8])
    assert trainer.history["train_beta2-head/group0"] == [0.99, 0.99]


def test_momentum_false_reports_the_learning_rates_alone() -> None:
    _, rows = fit_logged(LearningRateMonitor(momentum=False))
    step = next(r for r in rows if r["kind"] == "step")
    assert {k for k in step if "-" in k} == {"lr-body/group0", "lr-body/group1", "lr-head/group0"}


class GradientsBeforeEachStep:
    """The reference: each optimizer's gradients as the optimizer is about to step, by resulting step."""

    name = "gradients_before_each_step"

    def __init__(self) -> None:
        self.grads: dict[tuple[int, str], list[torch.Tensor]] = {}

    @dltrain.hookimpl
    def on_before_optimizer_step(
        self, state: State, optimizer: torch.optim.Optimizer, optimizer_name: str
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grads[(state.global_step + 1, optimizer_name)] = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]


def norm(tensors: list[torch.Tensor], p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p))


def test_the_gradient_norm_is_computed_at_logged_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    foreach_norm = torch._foreach_norm

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return foreach_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counted)
    reference = GradientsBeforeEachStep()
    _, rows = fit_logged(GradientNormMonitor(), reference, log_every_n_steps=3)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [3, 6]
    assert len(calls) == 2 * 2  # two logged steps, two optimizers: nothing at the six other steps
    for row in steps:
        for name in ("body", "head"):
            expected = norm(reference.grads[(row["step"], name)])
            assert row[f"grad_norm-{name}"] == pytest.approx(expected, rel=1e-5)


def fit_one_optimizer(*plugins: object, **config: Any) -> list[dict[str, Any]]:
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=1, device="cpu", progress="off", log_every_n_steps=1, plugins=list(plugins), **config
    )
    trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loss_fn=nn.CrossEntropyLoss(),
    )
    run = trainer.get_plugin("metric_log").run_path
    return [r for r in read_metrics(run) if r["kind"] == "step"]


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_per_layer_and_per_parameter_norms(p: float) -> None:
    reference = GradientsBeforeEachStep()
    rows = fit_one_optimizer(GradientNormMonitor(norm_type=p, per_layer=True, per_parameter=True), reference)
    assert len(rows) == 4
    for row in rows:
        weight0, bias0, weight2, bias2 = reference.grads[(row["step"], "default")]
        assert row["grad_norm"] == pytest.approx(norm([weight0, bias0, weight2, bias2], p), rel=1e-5)
        assert row["grad_norm_layer/0"] == pytest.approx(norm([weight0, bias0], p), rel=1e-5)
        assert row["grad_norm_layer/2"] == pytest.approx(norm([weight2, bias2], p), rel=1e-5)
        assert row["grad_norm_param/2.bias"] == pytest.approx(norm([bias2], p), rel=1e-5)
        assert {k for k in row if k.startswith("grad_norm")} == {
            "grad_norm",
            "grad_norm_layer/0",
            "grad_norm_layer/2",
            "grad_norm_param/0.weight",
            "grad_norm_param/0.bias",
            "grad_norm_param/2.weight",
            "grad_norm_param/2.bias",
        }


def test_a_module_with_parameters_in_two_optimizers_has_one_norm() -> None:
    model = tiny_model()
    reference = GradientsBeforeEachStep()
    trainer = dltrain.Trainer(
        max_epochs=1, device="cpu", progress="off", log_every_n_steps=2,
        plugins=[GradientNormMonitor(per_layer=True), reference],
    )  # fmt: skip
    optimizers = {
        "weights": torch.optim.SGD([model[0].weight, model[2].weight], lr=0.1),
        "biases": torch.optim.SGD([model[0].bias, model[2].bias], lr=0.1),
    }
    trainer.fit(model, tiny_loader(), optimizer=optimizers, loss_fn=nn.CrossEntropyLoss())
    rows = [r for r in read_metrics(trainer.get_plugin("metric_log").run_path) if r["kind"] == "step"]
    for row in rows:
        (w0, w2), (b0, _) = (
            reference.grads[(row["step"], "weights")],
            reference.grads[(row["step"], "biases")],
        )
        assert row["grad_norm_layer/0"] == pytest.approx(norm([w0, b0]), rel=1e-5)
        assert row["grad_norm-weights"] == pytest.approx(norm([w0, w2]), rel=1e-5)


def test_no_metric_name_is_a_folder_of_another() -> None:
    """A store that keeps one file per metric (MLflow's file store) needs it: 'a' and 'a/b' cannot both be."""
    model = tiny_model()
    optimizers, schedulers = two_optimizers(model)
    monitors = [LearningRateMonitor(), GradientNormMonitor(per_layer=True, per_parameter=True)]
    trainer = dltrain.Trainer(
        max_epochs=1, device="cpu", progress="off", log_every_n_steps=2, plugins=monitors
    )
    trainer.fit(
        model, tiny_loader(), optimizer=optimizers, scheduler=schedulers, loss_fn=nn.CrossEntropyLoss()
    )
    names = {k for r in read_metrics(trainer.get_plugin("metric_log").run_path) for k in r}
    assert {"grad_norm-body", "grad_norm_layer/0", "grad_norm_param/0.weight", "lr-head/group0"} <= names
    assert not [(a, b) for a in names for b in names if b.startswith(a + "/")]


def test_the_reported_norm_is_the_clipped_one() -> None:
    rows = fit_one_optimizer(GradientNormMonitor(), gradient_clip_val=0.01)
    assert all(0 < r["grad_norm"] <= 0.01 * (1 + 1e-5) for r in rows)
    unclipped = fit_one_optimizer(GradientNormMonitor())
    assert all(r["grad_norm"] > 0.01 for r in unclipped)


def test_a_bad_norm_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match="norm_type must be a positive number or inf, got 0"):
        GradientNormMonitor(norm_type=0)


def frozen_first_layer() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    return model


def test_the_summary_is_printed_once_at_fit_start(capsys: pytest.CaptureFixture[str]) -> None:
    model = frozen_first_layer()
    trainer = dltrain.Trainer(
        max_epochs=2, device="cpu", progress="off", run_dir=None, plugins=[ModelSummary()]
    )
    trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model[1].parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    printed = capsys.readouterr().out
    assert printed == ModelSummary().summarize(model) + "\n"
    lines = printed.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "",
        "Name",
        "Type",
        "Trainable",
        "Frozen",
        "Size (MB)",
    ]
    assert [c.strip() for c in lines[2].split("|")] == ["0", "0", "Sequential", "0", "144", "0.001"]
    assert [c.strip() for c in lines[3].split("|")] == ["1", "1", "Linear", "51", "0", "0.000"]
    assert [line.split() for line in lines[-4:]] == [
        ["51", "trainable", "parameters"],
        ["144", "frozen", "parameters"],
        ["195", "total", "parameters"],
        ["0.001", "total", "size", "of", "the", "parameters", "(MB)"],
    ]


def test_max_depth_lists_nested_modules_and_zero_the_totals_alone() -> None:
    model = frozen_first_layer()
    deep = ModelSummary(max_depth=2).summarize(model)
    assert [line.split(" | ")[1].strip() for line in deep.splitlines()[2:5]] == ["0", "0.0", "0.1"]
    assert ModelSummary(max_depth=0).summarize(model).splitlines()[0].split() == [
        "51",
        "trainable",
        "parameters",
    ]
    with pytest.raises(ConfigError, match="max_depth must be an integer >= 0"):
        ModelSummary(max_depth=-1)


def test_only_rank_0_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    trainer.model = tiny_model()
    ModelSummary().on_fit_start(trainer, State(run=RunKind.FIT, rank=1, world_size=2))
    assert capsys.readouterr().out == ""
