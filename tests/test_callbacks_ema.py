"""EMA on real runs: the average it keeps, evaluation with it, checkpoints and resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import ConfigError
from dltrain.callbacks import EMA
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.testing import tiny_loader, tiny_model


class WeightsAfterEachStep:
    """Records the model's floating-point state after every optimizer step (the reference's input)."""

    name = "weights_after_each_step"

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []
        self._step = 0

    @dltrain.hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.micro_step == 0 and state.global_step != self._step:
            self._step = state.global_step
            self.seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def fit(
    *plugins: object,
    model: nn.Module | None = None,
    epochs: int = 2,
    resume: str | None = None,
    **config: Any,
) -> tuple[dltrain.Trainer, nn.Module]:
    model = model if model is not None else tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=epochs, device="cpu", progress="off", run_dir=None, plugins=list(plugins), **config
    )
    trainer.fit(
        model,
        tiny_loader(),  # 4 batches an epoch
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
        resume=resume,
    )
    return trainer, model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_average_moves_towards_the_weights_once_per_optimizer_step(accumulate: int) -> None:
    initial = weights(tiny_model())
    ema, recorder = EMA(decay=0.8), WeightsAfterEachStep()
    trainer, _ = fit(ema, recorder, accumulate_grad_batches=accumulate)
    assert trainer.state is not None and ema.updates == trainer.state.global_step == 8 // accumulate
    expected = dict(initial)
    for after_step in recorder.seen:
        expected = {k: 0.8 * expected[k] + 0.2 * after_step[k] for k in expected}
    torch.testing.assert_close(ema.averaged_state(), expected)


def test_training_is_unchanged_and_validation_sees_the_average() -> None:
    plain_trainer, plain = fit()
    ema = EMA(decay=0.5)
    trainer, model = fit(ema)
    # The live weights train exactly as without EMA ...
    torch.testing.assert_close(weights(model), weights(plain), rtol=0, atol=0)
    assert trainer.history["train_loss"] == plain_trainer.history["train_loss"]
    # ... and each validation is that of the average (the last one: the final average).
    assert trainer.history["val_loss"] != plain_trainer.history["val_loss"]
    averaged = tiny_model()
    averaged.load_state_dict(ema.averaged_state())
    check = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    expected = check.validate(averaged, tiny_loader(samples=32, seed=1), loss_fn=nn.CrossEntropyLoss())
    assert trainer.history["val_loss"][-1] == pytest.approx(expected["val_loss"], rel=1e-6)
    # A later test of the same model by the same Trainer uses the average too; the live weights stay.
    tested = trainer.test(model, tiny_loader(samples=32, seed=1))
    assert tested["test_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    torch.testing.assert_close(weights(model), weights(plain), rtol=0, atol=0)


def test_without_use_for_eval_validation_sees_the_live_weights() -> None:
    plain_trainer, _ = fit()
    trainer, _ = fit(EMA(decay=0.5, use_for_eval=False))
    assert trainer.history["val_loss"] == plain_trainer.history["val_loss"]


def test_floating_point_buffers_are_averaged_and_integer_ones_left_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    ema = EMA(decay=0.9)
    fit(ema, model=model, epochs=1)
    average = ema.averaged_state()
    assert "1.running_mean" in average and "1.running_var" in average
    assert "1.num_batches_tracked" not in average
    assert not torch.equal(average["1.running_mean"], model.state_dict()["1.running_mean"])


def test_checkpoints_hold_the_average_and_a_resumed_run_continues_it_exactly() -> None:
    whole = EMA(decay=0.7)
    fit(whole, epochs=4)
    first = EMA(decay=0.7)
    fit(first, epochs=2, checkpoint={"dir": "ckpt"})
    payload = load_checkpoint(list_checkpoints("ckpt")[-1].payload_path)
    saved = payload["plugins"]["ema"]
    assert saved["updates"] == 8 and saved["average"].keys() == first.averaged_state().keys()
    resumed = EMA(decay=0.7)
    fit(resumed, epochs=4, checkpoint={"dir": "ckpt"}, resume="last")
    assert resumed.updates == whole.updates == 16
    torch.testing.assert_close(resumed.averaged_state(), whole.averaged_state(), rtol=0, atol=0)


def test_copy_to_model_at_end_copies_after_the_final_checkpoint() -> None:
    ema = EMA(decay=0.7, copy_to_model_at_end=True)
    _, model = fit(ema, checkpoint={"dir": "ckpt"})
    torch.testing.assert_close(weights(model), ema.averaged_state(), rtol=0, atol=0)
    payload = load_checkpoint(list_checkpoints("ckpt")[-1].payload_path)
    # The final checkpoint keeps the live weights as the model, so a resume continues the training.
    assert not torch.equal(payload["model"]["0.weight"], model.state_dict()["0.weight"])
    torch.testing.assert_close(payload["plugins"]["ema"]["average"], ema.averaged_state(), rtol=0, atol=0)


class FailsInValidation:
    name = "fails_in_validation"

    @dltrain.hookimpl
    def on_eval_batch_end(self, state: dltrain.State) -> None:
        if state.epoch == 1:
            raise RuntimeError("validation broke")


def test_an_error_during_validation_swaps_the_weights_back() -> None:
    model = tiny_model()
    recorder = WeightsAfterEachStep()
    with pytest.raises(Exception, match="validation broke"):
        fit(EMA(decay=0.5), recorder, FailsInValidation(), model=model)
    torch.testing.assert_close(weights(model), recorder.seen[-1], rtol=0, atol=0)


def test_decay_must_be_between_0_and_1() -> None:
    for decay in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=f"decay must be a number between 0 and 1.*got {decay}"):
            EMA(decay=decay)
