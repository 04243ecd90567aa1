"""Bad input wherever a user can pass it gets a DltrainError that names the value and the fix.

Each case is raised before any optimizer step is taken: at ``fit``'s start,
or at the first batch, where shapes and dtypes are first known.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dltrain
from dltrain import CheckpointError, ConfigError, DataError, DeviceError, DltrainError, StepError
from dltrain.default_plugins.device import available_devices
from dltrain.testing import tiny_loader, tiny_model


def make_trainer(**settings: Any) -> dltrain.Trainer:
    defaults: dict[str, Any] = {
        "device": "cpu",
        "progress": "off",
        "run_dir": None,
        "autoload_plugins": False,
    }
    return dltrain.Trainer(**{**defaults, **settings})


def fit(model: Any = None, data: Any = None, *, trainer: dltrain.Trainer | None = None, **kw: Any) -> Any:
    """``fit`` with working defaults for everything not given."""
    model = tiny_model() if model is None else model
    if "optimizer" not in kw:
        kw["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("loss_fn", nn.CrossEntropyLoss())
    return (trainer or make_trainer()).fit(model, tiny_loader() if data is None else data, **kw)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


X = torch.randn(16, 8)
Y = torch.randint(0, 3, (16,))


class Untouched:
    """A plugin that fails the test if an optimizer step happens."""

    @dltrain.hookimpl
    def on_before_optimizer_step(self) -> None:
        raise AssertionError("an optimizer step ran before the bad input was reported")


# -- the model and the optimizer ---------------------------------------------------------


def test_a_model_that_is_not_a_module_is_named_with_the_fix() -> None:
    with pytest.raises(StepError, match=r"model must be a torch.nn.Module, got function; wrap your function"):
        fit(lambda x: x, optimizer=torch.optim.SGD(tiny_model().parameters(), lr=0.1))


def test_a_model_class_instead_of_an_instance_says_instantiate_it() -> None:
    with pytest.raises(StepError, match=r"model is the class Linear, not an instance: create it first"):
        fit(nn.Linear, optimizer=torch.optim.SGD(tiny_model().parameters(), lr=0.1))


@pytest.mark.parametrize("run", ["validate", "test", "predict"])
def test_evaluation_checks_the_model_too(run: str) -> None:
    with pytest.raises(StepError, match=r"model must be a torch.nn.Module, got str"):
        getattr(make_trainer(), run)("model.pt", tiny_loader())


def test_an_optimizer_over_another_models_parameters_is_refused() -> None:
    other = tiny_model()
    with pytest.raises(StepError) as info:
        fit(tiny_model(), optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    message = str(info.value)
    assert "the optimizer holds 4 parameter(s) that are not the model's" in message
    assert "(16, 8)" in message and "optimizer = SGD(model.parameters(), ...)" in message


def test_an_optimizer_class_or_a_parameter_list_is_not_an_optimizer() -> None:
    model = tiny_model()
    with pytest.raises(
        StepError, match=r"got type \(a class: did you mean SGD\(model.parameters\(\), lr=...\)\?\)"
    ):
        fit(model, optimizer=torch.optim.SGD)
    with pytest.raises(StepError, match=r"optimizer must be a torch.optim.Optimizer, got list"):
        fit(model, optimizer=list(model.parameters()))


# -- the loss function -----------------------------------------------------------------------


def test_a_loss_that_is_not_a_scalar_says_reduce_it() -> None:
    with pytest.raises(StepError) as info:
        fit(loss_fn=nn.CrossEntropyLoss(reduction="none"), trainer=make_trainer(plugins=[Untouched()]))
    assert str(info.value) == (
        "the loss must be a scalar tensor, got shape (16,); reduce it (loss_fn(..., reduction='mean') or .mean())"
    )


def test_a_missing_or_uncallable_loss_function() -> None:
    with pytest.raises(StepError, match=r"fit needs loss_fn \(e.g. loss_fn=torch.nn.CrossEntropyLoss\(\)\)"):
        fit(loss_fn=None)
    with pytest.raises(StepError, match=r"loss_fn must be callable .* got str"):
        fit(loss_fn="cross_entropy")


def test_a_loss_that_does_not_require_grad_names_the_likely_causes() -> None:
    model = tiny_model().requires_grad_(False)
    with pytest.raises(StepError, match=r"the loss does not require grad.*all its parameters frozen"):
        fit(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


class BareLossStep:
    """A training step that returns a bare tensor, made from the batch's loss by ``make``."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.sizes: list[int] = []

    @dltrain.hookimpl
    def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        loss: torch.Tensor = trainer.loss_fn(model(inputs), targets)
        return self.make(loss)  # type: ignore[no-any-return]

    @dltrain.hookimpl
    def on_train_batch_end(self, output: dltrain.StepOutput) -> None:
        self.sizes.append(output.batch_size)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda loss: loss.detach(), r"the loss does not require grad"),
        (lambda loss: loss.repeat(3), r"the loss must be a scalar tensor, got shape \(3,\)"),
        (lambda loss: loss.reshape(1, 1), None),  # one value in any shape is a scalar loss
        (lambda loss: loss, None),
    ],
)
def test_a_bare_loss_tensor_from_a_training_step_is_checked_like_a_step_output(
    make: Any, message: Any
) -> None:
    step = BareLossStep(make)
    trainer = make_trainer(disable_plugins=["step"], plugins=[step, *([Untouched()] if message else [])])
    if message is not None:
        with pytest.raises(StepError, match=message):
            fit(trainer=trainer)
    else:
        history = fit(trainer=trainer)
        assert step.sizes and all(size == 16 for size in step.sizes)  # the batch's size, for the metrics
        assert history["train_loss"]


# -- the targets do not fit the loss (found at the first batch) ---------------------------------


def test_float_class_targets_for_cross_entropy_say_targets_long() -> None:
    data = batches(X, Y.float())
    with pytest.raises(StepError) as info:
        fit(data=data, trainer=make_trainer(plugins=[Untouched()]))
    message = str(info.value)
    assert message.startswith(
        "loss_fn CrossEntropyLoss failed on the model's outputs (float32 of shape (8, 3)) and the targets "
        "(float32 of shape (8,)) at epoch 1, batch 0 (train): RuntimeError: "  # then torch's own words
    )
    assert message.endswith(
        "Fix: class-index targets must be int64: convert them with targets.long() (in the dataset)"
    )
    assert isinstance(info.value.__cause__, RuntimeError)  # chained: torch's own error and traceback


def test_int32_class_targets_also_need_long() -> None:
    with pytest.raises(StepError, match=r"targets \(int32 of shape \(8,\)\).*targets.long\(\)"):
        fit(data=batches(X, Y.int()))


def test_class_targets_with_an_extra_dimension_say_squeeze() -> None:
    with pytest.raises(StepError, match=r"targets \(int64 of shape \(8, 1\)\).*Fix: .*targets.squeeze\(-1\)"):
        fit(data=batches(X, Y[:, None]))


def test_class_indices_out_of_range_name_the_range_and_the_model_outputs() -> None:
    labels = torch.arange(16) % 5  # five classes, a three-class model
    with pytest.raises(StepError) as info:
        fit(data=batches(X, labels))
    assert "IndexError: Target 3 is out of bounds" in str(info.value)
    assert str(info.value).endswith(
        "Fix: class indices must be in [0, 3) for a model with 3 outputs, but the targets range from 0 to 4: "
        "give the model more outputs, or remap the labels"
    )


def test_a_batch_size_mismatch_points_at_the_models_reshapes() -> None:
    class Flatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x).reshape(-1, 6)  # a bug: merges rows
            return out

    with pytest.raises(
        StepError, match=r"the model returned 4 rows for a batch of 8 targets; check the reshapes"
    ):
        fit(Flatten(), batches(X, Y))


def test_an_elementwise_loss_refuses_shapes_it_would_silently_broadcast() -> None:
    model = nn.Linear(8, 1)
    data = batches(X, torch.randn(16))  # (N,) targets for (N, 1) outputs: an (N, N) loss
    with pytest.raises(StepError) as info:
        fit(model, data, loss_fn=nn.MSELoss(), trainer=make_trainer(plugins=[Untouched()]))
    assert str(info.value) == (
        "loss_fn MSELoss got the model's outputs (float32 of shape (8, 1)) and targets (float32 of shape (8,)) "
        "at epoch 1, batch 0 (train); it would broadcast them to a wrong loss. Fix: MSELoss needs targets of "
        "the outputs' shape (8, 1): reshape one of them (e.g. outputs.squeeze(-1), or targets.view_as(outputs))"
    )


def test_integer_targets_for_bce_say_convert_to_the_outputs_dtype() -> None:
    model = nn.Linear(8, 1)
    with pytest.raises(
        StepError, match=r"Fix: convert the targets to the outputs' dtype: targets.to\(torch.float32\)"
    ):
        fit(model, batches(X, torch.ones(16, 1, dtype=torch.long)), loss_fn=nn.BCEWithLogitsLoss())


def test_bad_validation_targets_are_caught_in_validation_too() -> None:
    with pytest.raises(StepError, match=r"at epoch 1, batch 0 \(validate\).*targets.long\(\)"):
        fit(val_data=batches(X, Y.float()))


def test_a_loss_function_that_is_a_plain_function_gets_the_same_help() -> None:
    with pytest.raises(StepError, match=r"loss_fn function failed .*targets.long\(\)"):
        fit(data=batches(X, Y.float()), loss_fn=nn.functional.cross_entropy)


# -- the data -------------------------------------------------------------------------------------


def test_empty_data_is_refused_before_training() -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match=r"train_data is empty \(len 0\); check the dataset path"):
        fit(data=torch.utils.data.DataLoader(empty, batch_size=4))
    with pytest.raises(DataError, match=r"val_data is empty \(len 0\)"):
        fit(val_data=[])


def test_data_without_a_length_that_yields_nothing_is_refused_at_the_first_epoch() -> None:
    class Nothing:
        def __iter__(self) -> Iterator[Any]:
            return iter(())

    with pytest.raises(DataError, match="train_data produced no batches this epoch"):
        fit(data=Nothing())


def test_data_that_is_not_batches() -> None:
    with pytest.raises(
        DataError, match=r"train_data is a Dataset, not batches; wrap it: DataLoader\(train_data"
    ):
        fit(data=torch.utils.data.TensorDataset(X, Y))
    with pytest.raises(DataError, match="train_data is an iterator, which is exhausted after one epoch"):
        fit(data=iter(batches(X, Y)))
    with pytest.raises(DataError, match=r"train_data must be iterable .* got int"):
        fit(data=5)


def test_data_none_says_what_to_pass() -> None:
    model = tiny_model()
    with pytest.raises(DataError, match="train_data is None; pass a DataLoader or any iterable of batches"):
        make_trainer().fit(model, None, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


def test_batches_the_default_step_cannot_unpack_say_how_to_support_them() -> None:
    triples = [(X[:8], Y[:8], torch.ones(8))]
    with pytest.raises(DataError) as info:
        fit(data=triples)
    assert "cannot unpack a batch of type tuple of length 3" in str(info.value)
    assert "(inputs, targets)" in str(info.value) and "training_step/eval_step" in str(info.value)

    dicts = [{"image": X[:8], "label": Y[:8]}]
    with pytest.raises(DataError, match=r"dict batch with keys \['image', 'label'\].*no input key.*rename"):
        fit(data=dicts)


# -- the device, the files ---------------------------------------------------------------------------


def test_a_device_that_is_not_there_lists_those_that_are() -> None:
    missing = f"cuda:{len(available_devices()) + 7}"
    with pytest.raises(DeviceError) as info:
        fit(trainer=make_trainer(device=missing))
    assert str(info.value) == (
        f"device {missing!r} is not available on this machine; available: {available_devices()}. "
        f"Use device='auto' or one of those."
    )


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_it() -> None:
    with pytest.raises(DeviceError, match="device 'mps' is not available on this machine"):
        fit(trainer=make_trainer(device="mps"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_float16_mixed_precision_without_cuda_is_a_device_error() -> None:
    with pytest.raises(
        DeviceError, match=r"precision='16-mixed' needs a CUDA device, but the run uses cpu.*bf16-mixed"
    ):
        fit(trainer=make_trainer(precision="16-mixed"))


def test_resuming_from_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    trainer = make_trainer(checkpoint={"dir": missing})
    with pytest.raises(CheckpointError) as info:
        fit(trainer=trainer, resume="last")
    assert f"checkpoint directory {str(missing)!r} does not exist" in str(info.value)
    assert "point checkpoint.dir at the directory of the run to continue" in str(info.value)
    assert not missing.exists()  # looking did not create it


def test_resuming_from_a_checkpoint_file_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; pass a checkpoint's .ckpt file"):
        fit(resume=str(tmp_path / "step-000000001.ckpt"))


def test_resume_last_without_checkpointing_says_how_to_turn_it_on() -> None:
    with pytest.raises(CheckpointError, match=r"checkpointing is off; set checkpoint=\{'dir': ...\}"):
        fit(resume="last")


def test_a_config_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "train.toml"
    with pytest.raises(ConfigError, match=r"config file .*train.toml' does not exist; pass the path"):
        dltrain.TrainerConfig.from_file(missing)


def test_every_error_above_is_a_dltrain_error() -> None:
    for error in (StepError, DataError, DeviceError, CheckpointError, ConfigError):
        assert issubclass(error, DltrainError)


def test_disabling_the_step_plugin_without_a_replacement_says_what_is_missing() -> None:
    model = tiny_model()
    trainer = dltrain.Trainer(disable_plugins=["step"], progress="off", run_dir=None, device="cpu")
    with pytest.raises(dltrain.PluginError, match=r"no plugin implements training_step.*'step'"):
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )
    with pytest.raises(dltrain.PluginError, match="no plugin implements eval_step"):
        trainer.validate(model, tiny_loader(), loss_fn=nn.CrossEntropyLoss())
