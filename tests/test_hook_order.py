"""The golden hook order of a small fit with validation: what the docs show."""

from __future__ import annotations

import torch

import dltrain
from dltrain.testing import HookRecorder, tiny_loader, tiny_model

TRAIN_STEP = [
    "transfer_batch",
    "on_train_batch_start",
    "training_step",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "agree_on_stop",  # after each optimizer step (not blocking)
]
EVAL_STEP = ["transfer_batch", "on_eval_batch_start", "eval_step", "on_eval_batch_end"]


def epoch(train_batches: int, val_batches: int) -> list[str]:
    return [
        "on_train_epoch_start",
        *TRAIN_STEP * train_batches,
        "compute_metrics",
        "on_train_epoch_end",
        "agree_on_stop",
        "on_eval_epoch_start",
        *EVAL_STEP * val_batches,
        "compute_metrics",
        "on_eval_epoch_end",
        "on_epoch_end",
        "agree_on_stop",
    ]


def fit_with(recorder: HookRecorder, **config: object) -> None:
    model = tiny_model()
    trainer = dltrain.Trainer(plugins=[recorder], progress="off", run_dir=None, device="cpu", **config)
    trainer.fit(
        model,
        tiny_loader(samples=32, batch_size=16),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16, batch_size=16),
    )


def test_fit_with_validation_calls_hooks_in_the_documented_order() -> None:
    recorder = HookRecorder()
    fit_with(recorder, max_epochs=2)
    assert recorder.calls == [
        "select_device",
        "on_setup",
        "prepare_data",
        "prepare_data",
        "on_fit_start",
        "agree_on_stop",
        *epoch(2, 1),
        *epoch(2, 1),
        "on_fit_end",
        "on_teardown",
    ]


def test_accumulation_calls_the_optimizer_hook_once_per_group() -> None:
    recorder = HookRecorder()
    fit_with(recorder, max_epochs=1, accumulate_grad_batches=2)
    assert recorder.calls.count("on_before_optimizer_step") == 1
    assert recorder.calls.count("on_before_backward") == 2


def test_eval_hooks_see_their_phase() -> None:
    recorder = HookRecorder()
    fit_with(recorder, max_epochs=1)
    phases = {hook: phase for hook, phase, _ in recorder.events}
    assert phases["on_train_batch_end"] == "train"
    assert phases["on_eval_batch_end"] == "validate"


def test_standalone_test_and_predict_order() -> None:
    recorder = HookRecorder()
    trainer = dltrain.Trainer(plugins=[recorder], progress="off", run_dir=None, device="cpu")
    model = tiny_model()
    trainer.test(model, tiny_loader(samples=16, batch_size=16), loss_fn=torch.nn.CrossEntropyLoss())
    assert recorder.calls == [
        "select_device",
        "on_setup",
        "prepare_data",
        "on_test_start",
        "on_eval_epoch_start",
        *EVAL_STEP,
        "compute_metrics",
        "on_eval_epoch_end",
        "on_test_end",
        "on_teardown",
    ]
    recorder.calls.clear()
    trainer.predict(model, [torch.randn(4, 8)])
    assert recorder.calls[3] == "on_predict_start"
    assert "compute_metrics" not in recorder.calls
