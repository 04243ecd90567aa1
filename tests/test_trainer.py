"""Training with the Trainer matches hand-written PyTorch, step for step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import StepOutput, hookimpl
from dltrain.testing import tiny_loader, tiny_model


def make_trainer(**kw: Any) -> dltrain.Trainer:
    kw.setdefault("progress", "off")
    kw.setdefault("run_dir", None)
    kw.setdefault("device", "cpu")
    return dltrain.Trainer(**kw)


class LossRecorder:
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    @hookimpl
    def on_train_batch_end(self, output: StepOutput) -> None:
        assert output.loss is not None
        self.losses.append(output.loss.detach().clone())


def test_fit_matches_a_hand_written_loop_bit_for_bit() -> None:
    def loader() -> Any:  # the same shuffled loader, freshly seeded for each side
        return tiny_loader(samples=96, batch_size=16, shuffle=True, seed=3)

    model_a = tiny_model()
    model_b = copy.deepcopy(model_a)
    loss_fn = nn.CrossEntropyLoss()

    torch.manual_seed(7)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    plain_losses = []
    plain_loader = loader()
    for _ in range(3):
        for x, y in plain_loader:
            opt_a.zero_grad()
            loss = loss_fn(model_a(x), y)
            loss.backward()
            opt_a.step()
            plain_losses.append(loss.detach().clone())

    torch.manual_seed(7)
    recorder = LossRecorder()
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    make_trainer(max_epochs=3, plugins=[recorder]).fit(model_b, loader(), optimizer=opt_b, loss_fn=loss_fn)

    assert len(recorder.losses) == len(plain_losses) == 18
    for a, b in zip(plain_losses, recorder.losses, strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_accumulating_four_batches_of_25_matches_one_batch_of_100() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=gen), torch.randint(0, 3, (100,), generator=gen)
    big, small = tiny_model(), tiny_model()
    loss_fn = nn.CrossEntropyLoss()
    make_trainer(max_steps=1).fit(
        big, [(x, y)], optimizer=torch.optim.SGD(big.parameters(), lr=0.5), loss_fn=loss_fn
    )
    chunks = [(x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)]
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=4)
    trainer.fit(small, chunks, optimizer=torch.optim.SGD(small.parameters(), lr=0.5), loss_fn=loss_fn)
    assert trainer.state is not None and trainer.state.global_step == 1
    for pa, pb in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_a_last_partial_accumulation_group_is_scaled_by_its_own_size() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 8, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    whole, parts = tiny_model(), tiny_model()
    loss_fn = nn.CrossEntropyLoss()
    # 2 batches of 25 with accumulate=4: the group is cut short at the epoch's end.
    make_trainer(max_epochs=1).fit(
        whole, [(x, y)], optimizer=torch.optim.SGD(whole.parameters(), lr=0.5), loss_fn=loss_fn
    )
    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(
        parts,
        [(x[:25], y[:25]), (x[25:], y[25:])],
        optimizer=torch.optim.SGD(parts.parameters(), lr=0.5),
        loss_fn=loss_fn,
    )
    assert trainer.state is not None and trainer.state.global_step == 1
    for pa, pb in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


class DictStep:
    """Supports batches like {"features": x, "value": y} for a regression model."""

    @hookimpl
    def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        pred = model(batch["features"]).squeeze(-1)
        return StepOutput(trainer.loss_fn(pred, batch["value"]), pred, batch["value"], len(pred))

    @hookimpl
    def eval_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        pred = model(batch["features"]).squeeze(-1)
        return StepOutput(trainer.loss_fn(pred, batch["value"]), pred, batch["value"], len(pred))


def test_a_regression_model_with_dict_batches_trains_through_a_step_plugin() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    batches = [{"features": x[i : i + 32], "value": y[i : i + 32]} for i in range(0, 256, 32)]
    model = nn.Linear(4, 1)
    trainer = make_trainer(max_epochs=30, plugins=[DictStep()])
    history = trainer.fit(
        model,
        batches,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loss_fn=nn.MSELoss(),
        val_data=batches,
    )
    assert history["train_loss"][-1] < 0.01 * history["train_loss"][0]
    assert "train_accuracy" not in history  # regression: no accuracy
    assert trainer.validate(model, batches)["val_loss"] < 0.01


def test_default_step_understands_dict_batches_with_standard_keys() -> None:
    model = tiny_model()
    batches = [{"inputs": x, "targets": y} for x, y in tiny_loader()]
    history = make_trainer(train_accuracy=True).fit(
        model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss()
    )
    assert "train_accuracy" in history


def test_accuracy_is_reported_for_evaluation_and_for_training_only_when_asked() -> None:
    def run(**config: Any) -> dltrain.History:
        model = tiny_model()
        return make_trainer(max_epochs=2, seed=0, **config).fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
            val_data=tiny_loader(),
        )

    default = run()
    assert "train_accuracy" not in default and len(default["val_accuracy"]) == 2
    asked = run(train_accuracy=True)
    assert len(asked["train_accuracy"]) == 2 and asked["val_accuracy"] == default["val_accuracy"]
    assert "val_accuracy" not in run(accuracy="never", train_accuracy=True)


def test_epoch_metrics_are_sample_weighted_not_a_mean_of_batch_means() -> None:
    model = tiny_model()
    x, y = next(iter(tiny_loader(samples=48, batch_size=48)))
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    trainer = make_trainer()
    metrics = trainer.test(model, batches, loss_fn=nn.CrossEntropyLoss())
    with torch.no_grad():
        expected = nn.CrossEntropyLoss()(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert metrics["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(accuracy)


def test_epoch_loss_sums_over_many_batches_and_resumes_to_the_same_bits() -> None:
    """The metrics plugin sums losses in folds; a resume anywhere gives the uninterrupted bits."""
    from types import SimpleNamespace

    from dltrain.default_plugins.metrics import MetricsPlugin
    from dltrain.state import Phase, State

    gen = torch.Generator().manual_seed(0)
    sizes = [10] * 300 + [7] * 3 + [10] * 400 + [3]  # folds at 256 batches and at each size change
    # One huge loss first: then float64 sums of the others in another grouping differ in the last bits.
    losses = [torch.tensor(2.0**37)] + [1 + torch.rand((), generator=gen) for _ in sizes[1:]]

    def epoch(plugin: MetricsPlugin, state: State, start: int, stop: int) -> None:
        for loss, size in zip(losses[start:stop], sizes[start:stop], strict=True):
            plugin.on_train_batch_end(state, StepOutput(loss, None, None, size))

    def fresh() -> tuple[MetricsPlugin, State, Any]:
        state = State(run="fit", phase=Phase.TRAIN, device=torch.device("cpu"))
        plugin = MetricsPlugin()
        plugin.on_train_epoch_start(state)
        return plugin, state, SimpleNamespace(state=state)

    plugin, state, trainer = fresh()
    epoch(plugin, state, 0, len(sizes))
    mean = float(plugin.compute_metrics(trainer, state)["loss"])
    expected = sum(float(loss) * size for loss, size in zip(losses, sizes, strict=True)) / sum(sizes)
    assert mean == pytest.approx(expected, rel=1e-12)
    straight = plugin.state_dict(trainer)  # the raw sums, to compare bit for bit

    for cut in (1, 255, 256, 257, 301, 303, 555):
        first, state, trainer = fresh()
        epoch(first, state, 0, cut)
        saved = first.state_dict(trainer)
        second, state, trainer = fresh()
        second.load_state_dict(trainer, saved)
        state.batch_idx = cut  # a resumed epoch keeps the restored sums
        second.on_train_epoch_start(state)
        epoch(second, state, cut, len(sizes))
        resumed = second.state_dict(trainer)
        for key in ("loss", "pending"):
            assert torch.equal(resumed[key], straight[key]), (cut, key)
        assert float(second.compute_metrics(trainer, state)["loss"]) == mean


def test_stop_conditions_max_steps_and_limit_train_batches() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(max_steps=5)
    trainer.fit(model, tiny_loader(samples=64, batch_size=16), optimizer=opt, loss_fn=nn.CrossEntropyLoss())
    assert trainer.state is not None
    assert trainer.state.global_step == 5 and trainer.state.stop_reason == "max_steps reached"

    trainer = make_trainer(max_epochs=3, limit_train_batches=2)
    trainer.fit(model, tiny_loader(samples=64, batch_size=16), optimizer=opt, loss_fn=nn.CrossEntropyLoss())
    assert trainer.state is not None and trainer.state.global_step == 6


def test_request_stop_ends_the_run_with_its_reason() -> None:
    class StopAtThree:
        @hookimpl
        def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
            if state.global_step == 3:
                trainer.request_stop("enough")

    model = tiny_model()
    trainer = make_trainer(max_epochs=10, plugins=[StopAtThree()])
    trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert trainer.state is not None
    assert trainer.state.global_step == 3 and trainer.state.stop_reason == "enough"


def test_validation_runs_every_n_epochs_and_after_the_last() -> None:
    model = tiny_model()
    history = make_trainer(max_epochs=5, val_every_n_epochs=2).fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16),
    )
    assert [("val_loss" in row) for row in history.epochs] == [False, True, False, True, True]


def test_schedulers_step_per_epoch_per_step_and_on_plateau() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    make_trainer(max_epochs=3).fit(
        model, tiny_loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), scheduler=sched
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    make_trainer(max_epochs=1, scheduler_interval="step").fit(
        model,
        tiny_loader(samples=64, batch_size=16),
        optimizer=opt,
        loss_fn=nn.CrossEntropyLoss(),
        scheduler=sched,
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 16)

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    with pytest.raises(dltrain.DltrainError, match=r"ReduceLROnPlateau monitors 'val_loss'.*train_loss"):
        make_trainer(max_epochs=1).fit(
            model, tiny_loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), scheduler=plateau
        )
    make_trainer(max_epochs=2, scheduler_monitor="train_loss").fit(
        model, tiny_loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), scheduler=plateau
    )


def test_gradient_clipping_by_norm_and_value() -> None:
    seen: list[float] = []

    class GradProbe:
        @hookimpl
        def on_before_optimizer_step(self, trainer: dltrain.Trainer) -> None:
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            seen.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            )
            seen.append(float(max(g.abs().max() for g in grads)))

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    make_trainer(max_steps=2, gradient_clip_val=0.01, plugins=[GradProbe()]).fit(
        model, tiny_loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss()
    )
    assert max(seen[0::2]) <= 0.01 + 1e-6
    seen.clear()
    make_trainer(
        max_steps=2, gradient_clip_val=0.001, gradient_clip_algorithm="value", plugins=[GradProbe()]
    ).fit(model, tiny_loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss())
    assert max(seen[1::2]) <= 0.001 + 1e-9


def test_train_eval_modes_and_inference_mode() -> None:
    modes: list[tuple[str, bool, bool]] = []

    class ModeProbe:
        @hookimpl
        def on_train_batch_start(self, trainer: dltrain.Trainer) -> None:
            modes.append(("train", trainer.model.training, torch.is_inference_mode_enabled()))

        @hookimpl
        def on_eval_batch_start(self, trainer: dltrain.Trainer) -> None:
            modes.append(("eval", trainer.model.training, torch.is_inference_mode_enabled()))

    model = tiny_model()
    make_trainer(plugins=[ModeProbe()]).fit(
        model,
        tiny_loader(samples=16),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16),
    )
    assert modes == [("train", True, False), ("eval", False, True)]


def test_predict_returns_outputs_per_batch_for_bare_input_batches() -> None:
    model = tiny_model()
    outputs = make_trainer().predict(model, [torch.randn(5, 8), torch.randn(3, 8)])
    assert [o.shape for o in outputs] == [torch.Size([5, 3]), torch.Size([3, 3])]


def test_custom_metrics_callables_and_stateful_objects() -> None:
    class CountingMetric:
        def __init__(self) -> None:
            self.n = 0

        def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
            self.n += len(targets)

        def compute(self) -> torch.Tensor:
            return torch.tensor(float(self.n))

        def reset(self) -> None:
            self.n = 0

    def top2(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean()

    model = tiny_model()
    trainer = make_trainer(metrics={"top2": top2, "seen": CountingMetric()}, train_accuracy=True)
    history = trainer.fit(
        model,
        tiny_loader(samples=48),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert history["train_seen"] == [48.0]
    assert 0.0 <= history["train_top2"][0] <= 1.0
    assert history["train_top2"][0] >= history["train_accuracy"][0]


def test_fit_returns_history_also_on_the_trainer() -> None:
    model = tiny_model()
    trainer = make_trainer(max_epochs=2)
    history = trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert history is trainer.history
    assert [row["epoch"] for row in history.epochs] == [1, 2]
    assert len(history["train_loss"]) == 2


def test_any_iterable_of_batches_works_not_only_dataloaders() -> None:
    model = tiny_model()

    class Batches:
        def __iter__(self) -> Any:
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                yield torch.randn(4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)

    history = make_trainer().fit(
        model, Batches(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss()
    )
    assert len(history.epochs) == 1


def test_a_finished_run_continues_for_more_epochs_from_its_last_checkpoint(tmp_path: Any) -> None:
    def run(epochs: int, resume: str | None, folder: str = "ckpt") -> tuple[dltrain.Trainer, nn.Module]:
        model = tiny_model()
        trainer = make_trainer(max_epochs=epochs, checkpoint={"dir": tmp_path / folder})
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
            resume=resume,
        )
        return trainer, model

    first, _ = run(2, None)
    assert first.state is not None and first.state.epoch == 2  # epochs completed
    resumed, model = run(3, "last")
    assert resumed.state is not None and resumed.state.epoch == 3
    assert [row["epoch"] for row in resumed.history.epochs] == [1, 2, 3]
    _, straight_model = run(3, None, "straight")  # a directory of its own: a fresh run
    for a, b in zip(model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_epoch_counts_completed_epochs_after_an_early_stop() -> None:
    class StopAfterFirst:
        @hookimpl
        def on_train_epoch_end(self, trainer: dltrain.Trainer) -> None:
            trainer.request_stop("one is enough")

    model = tiny_model()
    trainer = make_trainer(max_epochs=5, plugins=[StopAfterFirst()])
    trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert trainer.state is not None and trainer.state.epoch == 1


def test_resume_replays_the_order_of_a_dataloader_with_its_own_generator(tmp_path: Any) -> None:
    def run(max_steps: int, resume: str | None, folder: str = "ckpt") -> nn.Module:
        model = tiny_model()
        loader = tiny_loader(samples=64, batch_size=8, shuffle=True, seed=5)  # DataLoader(generator=...)
        trainer = make_trainer(max_steps=max_steps, checkpoint={"dir": tmp_path / folder, "every_n_steps": 1})
        trainer.fit(
            model,
            loader,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            loss_fn=nn.CrossEntropyLoss(),
            resume=resume,
        )
        return model

    run(11, None)  # stops inside the second epoch
    resumed = run(20, "last")
    straight = run(20, None, "straight")
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_validation", [False, True])
def test_resume_at_an_epochs_end_continues_a_dataloaders_own_generator(
    tmp_path: Any, with_validation: bool
) -> None:
    """A checkpoint at an epoch's end carries the loader's generator: the next epoch's shuffle
    is the uninterrupted run's, not the loader's first one again."""

    def run(max_epochs: int, resume: str | None, folder: str = "ckpt") -> nn.Module:
        model = tiny_model()
        loader = tiny_loader(samples=64, batch_size=8, shuffle=True, seed=5)  # DataLoader(generator=...)
        trainer = make_trainer(max_epochs=max_epochs, checkpoint={"dir": tmp_path / folder})
        trainer.fit(
            model,
            loader,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            loss_fn=nn.CrossEntropyLoss(),
            val_data=tiny_loader(samples=16, seed=1) if with_validation else None,
            resume=resume,
        )
        return model

    run(2, None)  # ends at an epoch boundary, with a checkpoint there
    resumed = run(4, "last")
    straight = run(4, None, "straight")
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_on_train_batch_end_gets_the_undivided_loss_detached() -> None:
    """Backward has used the graph: plugins get the loss as a plain value, divided by nothing."""
    seen: list[tuple[bool, float]] = []

    class Watch:
        @hookimpl
        def on_before_backward(self, loss: torch.Tensor) -> None:
            seen.append((loss.requires_grad, float(loss.detach())))

        @hookimpl
        def on_train_batch_end(self, output: StepOutput) -> None:
            assert output.loss is not None
            seen.append((output.loss.requires_grad, float(output.loss)))

    model = tiny_model()
    make_trainer(max_epochs=1, accumulate_grad_batches=2, plugins=[Watch()]).fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    before, after = seen[0::2], seen[1::2]
    assert before and all(grad for grad, _ in before) and not any(grad for grad, _ in after)
    assert [value for _, value in after] == pytest.approx([2 * value for _, value in before])


def test_on_step_metrics_gets_each_intervals_mean_loss_and_lr() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.calls: list[tuple[int, dict[str, float]]] = []

        @dltrain.hookimpl
        def on_train_batch_end(self, output: dltrain.StepOutput) -> None:
            self.losses.append(float(output.loss))

        @dltrain.hookimpl
        def on_step_metrics(self, state: dltrain.State, metrics: dict[str, float]) -> None:
            self.calls.append((state.global_step, dict(metrics)))

    recorder = Recorder()
    model = tiny_model()
    make_trainer(max_epochs=2, log_every_n_steps=3, accumulate_grad_batches=2, plugins=[recorder]).fit(
        model,
        tiny_loader(samples=96, batch_size=8),  # 12 micro-batches, 6 optimizer steps per epoch
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert [step for step, _ in recorder.calls] == [3, 6, 9, 12]
    for i, (_, metrics) in enumerate(recorder.calls):
        window = recorder.losses[6 * i : 6 * (i + 1)]  # 3 steps of 2 micro-batches
        assert metrics["train_loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert metrics["lr"] == 0.05


def test_unwrap_model_reaches_the_users_module_and_leaves_others_alone() -> None:
    class Holder(nn.Module):  # a user module with a submodule named like DDP's attribute
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    holder = Holder()
    assert dltrain.unwrap_model(holder) is holder
    compiled = torch.compile(holder, backend="eager")  # wraps only; nothing compiles until called
    assert dltrain.unwrap_model(compiled) is holder


# -- custom metrics: ratios and phases ---------------------------------------------------------------


def test_an_epoch_metric_is_computed_from_the_epochs_exact_values() -> None:
    import math

    calls: list[str] = []

    def batch_perplexity(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append("batch")
        return torch.exp(nn.functional.cross_entropy(outputs, targets))

    model = tiny_model()
    trainer = make_trainer(
        max_epochs=1,
        metrics={
            "perplexity": dltrain.EpochMetric(lambda m: math.exp(m["loss"]), phases=("validate", "test")),
            "batch_ppl": dltrain.Metric(batch_perplexity, phases=["validate"]),
        },
    )
    history = trainer.fit(
        model, tiny_loader(samples=64, batch_size=16), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), val_data=tiny_loader(samples=48, batch_size=16, seed=3),
    )  # fmt: skip
    row = history.last()
    assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
    # The mean of the batches' exp is another (wrong) number; and the batch metric ran on validation only.
    assert row["val_batch_ppl"] != pytest.approx(row["val_perplexity"], rel=1e-6)
    assert "train_perplexity" not in row and "train_batch_ppl" not in row
    assert calls == ["batch"] * 3
    assert trainer.test(model, tiny_loader(samples=16))["test_perplexity"] > 1


def test_an_epoch_metric_reading_a_missing_value_names_those_there_are() -> None:
    model = tiny_model()
    trainer = make_trainer(max_epochs=1, metrics={"ppl": dltrain.EpochMetric(lambda m: m["los"])})
    with pytest.raises(dltrain.ConfigError, match=r"epoch metric 'ppl' reads 'los'.*\['loss'\]"):
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )


def test_a_metric_phase_that_does_not_exist_is_refused_at_once() -> None:
    with pytest.raises(dltrain.ConfigError, match=r"metric 'm': phase 'valid' is not one of"):
        make_trainer(metrics={"m": dltrain.Metric(lambda o, t: o.mean(), phases=("valid",))})


def test_plugins_add_step_metrics_that_every_logger_receives() -> None:
    seen: list[dict[str, float]] = []

    class StepCounter:
        def __init__(self) -> None:
            self.count = torch.zeros(())

        @hookimpl
        def on_train_batch_end(self) -> None:
            self.count += 1  # on the device, no sync

        @hookimpl
        def compute_step_metrics(self) -> dict[str, torch.Tensor]:
            return {"batches_seen": self.count.clone()}

    class Logger:
        @hookimpl
        def on_step_metrics(self, metrics: dict[str, float]) -> None:
            seen.append(dict(metrics))

    model = tiny_model()
    make_trainer(max_steps=4, log_every_n_steps=2, plugins=[StepCounter(), Logger()]).fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
    )
    assert [m["batches_seen"] for m in seen] == [2.0, 4.0]
    assert set(seen[0]) == {"train_loss", "lr", "batches_seen"}


def test_a_step_metric_reported_twice_names_both_reporters() -> None:
    class LR:
        @hookimpl
        def compute_step_metrics(self) -> dict[str, float]:
            return {"lr": 1.0}

    class Logger:
        @hookimpl
        def on_step_metrics(self) -> None:
            pass

    model = tiny_model()
    with pytest.raises(dltrain.PluginError, match=r"'lr' is reported by two plugins, 'the Trainer' and 'LR'"):
        make_trainer(max_steps=2, log_every_n_steps=1, plugins=[LR(), Logger()]).fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )
