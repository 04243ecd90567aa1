"""The resume self-test, as a user runs it on their own program before a long job."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain.testing import tiny_loader, tiny_model

REPO = Path(__file__).resolve().parents[1]


def make_trainer(**kw: Any) -> dltrain.Trainer:
    kw.setdefault("progress", "off")
    kw.setdefault("run_dir", None)
    kw.setdefault("device", "cpu")
    return dltrain.Trainer(**kw)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_a_plain_program_resumes_exactly() -> None:
    trainer = make_trainer(seed=0)
    report = trainer.verify_resume(
        tiny_model, tiny_loader(samples=64, batch_size=16, shuffle=True), optimizer_factory=sgd,
        loss_fn=nn.CrossEntropyLoss(), val_data=tiny_loader(samples=32, seed=1), steps=10, interrupt_at=5,
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )  # fmt: skip
    assert report.ok, str(report)
    assert report.compared > 20 and "exact" in str(report)


class ForgetfulWarmup:
    """Scales the learning rate up over its first steps, counting them in an attribute: no state_dict."""

    name = "warmup"

    def __init__(self) -> None:
        self.steps_seen = 0

    @dltrain.hookimpl
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps_seen += 1
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, self.steps_seen / 8)


def test_a_plugin_that_keeps_state_without_state_dict_is_named() -> None:
    trainer = make_trainer(plugins=[ForgetfulWarmup()])
    report = trainer.verify_resume(
        tiny_model,
        tiny_loader(),
        optimizer_factory=sgd,
        loss_fn=nn.CrossEntropyLoss(),
        steps=8,
        interrupt_at=3,
    )
    assert not report.ok
    assert report.differences[0].startswith(
        "plugin 'warmup' attribute 'steps_seen' is 8 after the straight run and 5 after the resume"
    )
    assert any(d.startswith("model entry '0.weight' differs by") for d in report.differences)
    assert any("optimizer 'default' param group 0 'lr'" in d for d in report.differences)
    with pytest.raises(dltrain.DltrainError, match="keeps state that its state_dict does not return"):
        report.raise_for_differences()


class UnseededShuffle:
    """Batches in an order drawn from an RNG of its own that no checkpoint holds."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        self.rng = random.Random(1234)

    def __iter__(self) -> Any:
        order = list(range(64))
        self.rng.shuffle(order)
        for i in range(0, 64, 16):
            index = torch.tensor(order[i : i + 16])
            yield self.x[index], self.y[index]

    def __len__(self) -> int:
        return 4


def test_a_data_order_that_is_not_reproducible_is_named() -> None:
    report = make_trainer().verify_resume(
        tiny_model,
        UnseededShuffle(),
        optimizer_factory=sgd,
        loss_fn=nn.CrossEntropyLoss(),
        steps=8,
        interrupt_at=6,
    )
    assert not report.ok
    assert report.differences[0].startswith("the training batch of optimizer step 7 differs after resume")


def test_the_mnist_example_resumes_exactly_in_a_fresh_process(mnist_fake_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "examples" / "mnist"))
    try:
        import mnist_data
        import mnist_model
    finally:
        sys.path.pop(0)
    loaders = mnist_data.make_loaders(mnist_fake_dir, loader="memory", batch_size=100, seed=0)
    report = make_trainer(seed=0).verify_resume(
        _mnist_net, loaders.train, optimizer_factory=_mnist_sgd, loss_fn=nn.CrossEntropyLoss(),
        val_data=loaders.test, steps=9, interrupt_at=4, fresh_process=True,
    )  # fmt: skip
    assert report.ok, str(report)
    assert mnist_model.Net  # the example's network is what _mnist_net builds


def _mnist_net() -> nn.Module:
    sys.path.insert(0, str(REPO / "examples" / "mnist"))
    try:
        from mnist_model import Net
    finally:
        sys.path.pop(0)
    return Net()


def _mnist_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def test_the_gan_example_resumes_exactly(mnist_fake_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "examples" / "gan"))
    try:
        import gan_data
        import gan_model
        from train import DCGANStep  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
        sys.modules.pop("train", None)
    loader = gan_data.make_loader(gan_data.mnist_images(mnist_fake_dir, 256), batch_size=32)
    trainer = make_trainer(manual_optimization=True, plugins=[DCGANStep()])
    report = trainer.verify_resume(
        lambda: gan_model.DCGAN(width=4), loader, optimizer_factory=gan_model.make_optimizers, steps=12,
        interrupt_at=5,
    )  # fmt: skip
    assert report.ok, str(report)
