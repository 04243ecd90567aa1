"""Several optimizers and manual optimization, as a user writing a GAN or a custom update would meet them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import PluginError, StepError, hookimpl
from dltrain.testing import HookRecorder, tiny_loader, tiny_model


def make_trainer(**kw: Any) -> dltrain.Trainer:
    kw.setdefault("progress", "off")
    kw.setdefault("run_dir", None)
    kw.setdefault("device", "cpu")
    return dltrain.Trainer(**kw)


def two_optimizers(model: nn.Sequential, *, adam: bool = True) -> dict[str, torch.optim.Optimizer]:
    return {
        "body": torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9),
        "head": (torch.optim.Adam if adam else torch.optim.SGD)(model[2].parameters(), lr=0.05),
    }


class TwoLosses:
    """A manual step with two losses, each stepping its own optimizer (a GAN's shape, on a tiny MLP)."""

    def __init__(self, clip_probe: list[float] | None = None) -> None:
        self.loss_fn = nn.CrossEntropyLoss()

    @hookimpl
    def training_step(
        self, trainer: dltrain.Trainer, model: nn.Sequential, batch: Any
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        hidden = model[1](model[0](x))
        # The head learns on detached features; the body learns through a frozen-in-time copy of the head.
        head_loss = self.loss_fn(model[2](hidden.detach()), y)
        trainer.backward(head_loss, "head")
        trainer.optimizer_step("head")
        body_loss = self.loss_fn(model[2](hidden), y)
        model[2].zero_grad()
        trainer.backward(body_loss, "body")
        trainer.optimizer_step("body")
        return {"loss_head": head_loss, "loss_body": body_loss}


def plain_two_losses(model: nn.Sequential, data: Any, epochs: int, optimizers: Mapping[str, Any]) -> None:
    """What TwoLosses does, by hand."""
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in data:
            hidden = model[1](model[0](x))
            loss_fn(model[2](hidden.detach()), y).backward()
            optimizers["head"].step()
            optimizers["head"].zero_grad(set_to_none=True)
            body_loss = loss_fn(model[2](hidden), y)
            model[2].zero_grad()
            body_loss.backward()
            optimizers["body"].step()
            optimizers["body"].zero_grad(set_to_none=True)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# -- errors a user meets first ------------------------------------------------------------------


def test_a_list_of_optimizers_says_to_name_them() -> None:
    model = tiny_model()
    with pytest.raises(StepError, match=r"pass a dict of names to optimizers"):
        make_trainer().fit(
            model, tiny_loader(), optimizer=[torch.optim.SGD(model.parameters(), lr=0.1)],  # type: ignore[arg-type]
            loss_fn=nn.CrossEntropyLoss(),
        )  # fmt: skip


def test_optimizer_none_is_only_for_manual_optimization() -> None:
    with pytest.raises(StepError, match=r"optimizer=None is only for manual_optimization=True"):
        make_trainer().fit(tiny_model(), tiny_loader(), optimizer=None, loss_fn=nn.CrossEntropyLoss())


def test_two_optimizers_over_one_parameter_are_refused() -> None:
    model = tiny_model()
    optimizers = {
        "a": torch.optim.SGD(model.parameters(), lr=0.1),
        "b": torch.optim.SGD(model[2].parameters(), lr=0.1),
    }
    with pytest.raises(StepError, match=r"optimizers 'a' and 'b' both hold a parameter"):
        make_trainer().fit(model, tiny_loader(), optimizer=optimizers, loss_fn=nn.CrossEntropyLoss())


def test_manual_optimization_without_a_step_of_ones_own_is_refused_before_the_run() -> None:
    model = tiny_model()
    with pytest.raises(PluginError, match=r"manual_optimization=True needs a training_step of yours"):
        make_trainer(manual_optimization=True).fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )


def test_backward_in_an_automatic_step_says_to_turn_on_manual_optimization() -> None:
    class CallsBackward:
        @hookimpl
        def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            trainer.backward(loss)
            return loss

    model = tiny_model()
    with pytest.raises(StepError, match=r"is for manual optimization: set manual_optimization=True"):
        make_trainer(plugins=[CallsBackward()]).fit(
            model, tiny_loader(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
        )


def test_an_unknown_optimizer_name_lists_the_names() -> None:
    class WrongName:
        @hookimpl
        def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            trainer.backward(loss)
            trainer.optimizer_step("generator")
            return loss

    model = tiny_model()
    with pytest.raises(StepError, match=r"no optimizer named 'generator'.*\['body', 'head'\]"):
        make_trainer(manual_optimization=True, plugins=[WrongName()]).fit(
            model, tiny_loader(), optimizer=two_optimizers(model)
        )


def test_backward_outside_a_step_is_refused() -> None:
    with pytest.raises(StepError, match=r"works inside training_step, during fit"):
        make_trainer().backward(torch.zeros((), requires_grad=True))


# -- what it computes ------------------------------------------------------------------------------


def test_a_manual_step_with_two_optimizers_equals_its_hand_written_loop() -> None:
    data = tiny_loader(samples=64, batch_size=16)
    model, reference = tiny_model(seed=3), tiny_model(seed=3)
    history = make_trainer(max_epochs=2, manual_optimization=True, plugins=[TwoLosses()]).fit(
        model, data, optimizer=two_optimizers(model)
    )
    plain_two_losses(reference, data, 2, two_optimizers(reference))
    assert same_weights(model, reference)
    # Each named loss is a metric of its own, per epoch.
    assert len(history["train_loss_head"]) == len(history["train_loss_body"]) == 2
    assert "train_loss" not in history


def test_automatic_optimization_steps_every_optimizer_after_each_backward() -> None:
    model, reference = tiny_model(seed=4), tiny_model(seed=4)
    data = tiny_loader(samples=64, batch_size=16)
    make_trainer(max_epochs=2).fit(
        model, data, optimizer=two_optimizers(model, adam=False), loss_fn=nn.CrossEntropyLoss()
    )
    make_trainer(max_epochs=2).fit(
        reference, data, optimizer=torch.optim.SGD(
            [{"params": reference[0].parameters(), "momentum": 0.9}, {"params": reference[2].parameters(), "lr": 0.05}],
            lr=0.1,
        ), loss_fn=nn.CrossEntropyLoss(),
    )  # fmt: skip
    assert same_weights(model, reference)


def test_accumulation_applies_to_manual_steps_as_to_automatic_ones() -> None:
    class Manual:
        @hookimpl
        def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            trainer.backward(loss)
            stepped.append(trainer.optimizer_step())
            return loss

    stepped: list[bool] = []
    data = tiny_loader(samples=80, batch_size=16)  # 5 micro-batches: groups of 2, 2 and a partial 1
    manual, automatic = tiny_model(seed=5), tiny_model(seed=5)
    make_trainer(max_epochs=2, accumulate_grad_batches=2, manual_optimization=True, plugins=[Manual()]).fit(
        manual, data, optimizer=torch.optim.SGD(manual.parameters(), lr=0.1, momentum=0.9)
    )
    make_trainer(max_epochs=2, accumulate_grad_batches=2).fit(
        automatic, data, optimizer=torch.optim.SGD(automatic.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
    )  # fmt: skip
    assert stepped == [False, True, False, True, True] * 2
    assert same_weights(manual, automatic)


def test_a_custom_update_rule_needs_no_optimizer() -> None:
    class SignSGD:
        """Updates the weights itself: w -= lr * sign(grad)."""

        @hookimpl
        def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            trainer.backward(loss)
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.01 * p.grad.sign())
                    p.grad = None
            return loss

    model = tiny_model()
    history = make_trainer(max_epochs=8, manual_optimization=True, plugins=[SignSGD()]).fit(
        model, tiny_loader(), optimizer=None
    )
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]


def test_hooks_are_told_which_optimizer() -> None:
    recorder = HookRecorder()
    model = tiny_model()
    make_trainer(max_steps=1, manual_optimization=True, plugins=[TwoLosses(), recorder]).fit(
        model, tiny_loader(), optimizer=two_optimizers(model)
    )
    named = [(h, kw["optimizer_name"]) for h, _, kw in recorder.events if "optimizer_name" in kw]
    assert named == [
        ("on_before_backward", "head"),
        ("on_after_backward", "head"),
        ("on_before_optimizer_step", "head"),
        ("on_before_backward", "body"),
        ("on_after_backward", "body"),
        ("on_before_optimizer_step", "body"),
    ]


def test_named_losses_and_each_learning_rate_reach_the_step_metrics() -> None:
    seen: list[dict[str, float]] = []

    class Logger:
        @hookimpl
        def on_step_metrics(self, metrics: Mapping[str, float]) -> None:
            seen.append(dict(metrics))

    model = tiny_model()
    make_trainer(
        max_steps=4, log_every_n_steps=2, manual_optimization=True, plugins=[TwoLosses(), Logger()]
    ).fit(model, tiny_loader(), optimizer=two_optimizers(model))
    assert len(seen) == 2
    assert set(seen[0]) == {"train_loss_head", "train_loss_body", "lr_body", "lr_head"}
    assert seen[0]["lr_body"] == 0.1 and seen[0]["lr_head"] == 0.05


def test_clipping_in_a_manual_step_clips_only_the_optimizer_that_steps() -> None:
    norms: dict[str, float] = {}

    class Probe:
        @hookimpl
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer, optimizer_name: str) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms[optimizer_name] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    model = tiny_model()
    make_trainer(
        max_steps=1, gradient_clip_val=0.01, manual_optimization=True, plugins=[TwoLosses(), Probe()]
    ).fit(model, tiny_loader(), optimizer=two_optimizers(model))
    assert norms["head"] == pytest.approx(0.01, rel=1e-4) and norms["body"] == pytest.approx(0.01, rel=1e-4)


def test_skip_in_a_manual_step_skips_the_update_after_a_nan_loss() -> None:
    class NanOnce(TwoLosses):
        @hookimpl
        def training_step(
            self, trainer: dltrain.Trainer, model: nn.Sequential, batch: Any
        ) -> dict[str, torch.Tensor]:
            if trainer.state is not None and trainer.state.global_step == 1:
                loss = model(batch[0]).sum() * float("nan")
                trainer.backward(loss, "head")
                stepped.append(trainer.optimizer_step("head"))
                return {"loss_head": loss}
            return super().training_step(trainer, model, batch)

    stepped: list[bool] = []
    model = tiny_model()
    trainer = make_trainer(max_steps=3, on_nonfinite="skip", manual_optimization=True, plugins=[NanOnce()])
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        trainer.fit(model, tiny_loader(), optimizer=two_optimizers(model))
    assert stepped == [False]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_manual_program_stopped_mid_epoch_resumes_bit_exactly(tmp_path: Path) -> None:
    def fit(max_steps: int | None, resume: str | None = None) -> nn.Module:
        torch.manual_seed(1)
        model = tiny_model(seed=6)
        trainer = make_trainer(
            max_epochs=3, max_steps=max_steps, manual_optimization=True, plugins=[TwoLosses()],
            checkpoint={"dir": str(tmp_path / "ckpt")}, log_every_n_steps=2,
        )  # fmt: skip
        trainer.fit(
            model, tiny_loader(samples=64, shuffle=True), optimizer=two_optimizers(model), resume=resume
        )
        return model

    straight = fit(None)
    (tmp_path / "ckpt").rename(tmp_path / "straight")
    fit(6)  # stops inside epoch 2 (4 batches an epoch), saving its checkpoint
    resumed = fit(None, resume="last")
    assert same_weights(resumed, straight)
