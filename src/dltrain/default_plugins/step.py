"""Built-in plugin ``step``: the default training and evaluation steps.

It understands these batches (see :func:`split_batch`), and never drops part
of one silently:

* ``(inputs, targets)`` tuples and lists: ``loss_fn(model(inputs), targets)``;
* dicts with an input key (``inputs``, ``input``, ``x``) and a target key
  (``targets``, ``target``, ``y``, ``labels``, ``label``): the same, and every
  other key is passed to the model as a keyword argument, so
  ``{"x": ..., "y": ..., "mask": ...}`` calls ``model(x, mask=mask)``;
* dicts of keyword arguments only, as Hugging Face tokenizers and collators
  make them (``input_ids``, ``attention_mask``, ``labels``): ``model(**batch)``;
  a loss in the model's output (``output.loss``, as a Hugging Face model
  returns when given ``labels``) is used, else ``loss_fn(output, labels)``;
* for predict, bare tensors.

A model whose ``forward`` does not take a batch's extra keys fails at the
first batch with a :class:`~dltrain.DataError` that names them and the fix.
Any other batch shape is supported by a plugin implementing
``training_step`` / ``eval_step``, which runs first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dltrain._markers import hookimpl
from dltrain.errors import DataError, StepError
from dltrain.state import Phase, StepOutput

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["SplitBatch", "StepPlugin", "batch_size_of", "compute_loss", "split_batch", "unpack_batch"]

_INPUT_KEYS = ("inputs", "input", "x")
_TARGET_KEYS = ("targets", "target", "y", "labels", "label")


def unpack_batch(batch: Any, *, allow_no_targets: bool = False) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)``.

    Accepts a 2-tuple or 2-list, a mapping with an input key (``inputs``,
    ``input``, ``x``) and a target key (``targets``, ``target``, ``y``,
    ``labels``, ``label``), and with ``allow_no_targets`` a bare tensor or a
    1-tuple (targets None).

    Raises:
        DataError: the batch has another shape; the message says what was
            seen and how to support it.
    """
    if type(batch) is tuple and len(batch) == 2:  # the usual batch, without the checks below
        return batch
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1 and allow_no_targets:
            return batch[0], None
    elif isinstance(batch, Mapping):
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        targets = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if inputs is not None and (targets is not None or allow_no_targets):
            return inputs, targets
        raise DataError(
            f"the default step cannot unpack a dict batch with keys {sorted(map(str, batch))}: "
            f"it looks for an input key {list(_INPUT_KEYS)} and a target key {list(_TARGET_KEYS)}. "
            f"Rename the keys, or pass a plugin implementing training_step/eval_step."
        )
    elif isinstance(batch, torch.Tensor) and allow_no_targets:
        return batch, None
    shape = (
        f"{type(batch).__name__} of length {len(batch)}"
        if isinstance(batch, (tuple, list))
        else type(batch).__name__
    )
    raise DataError(
        f"the default step cannot unpack a batch of type {shape}: it expects (inputs, targets) "
        f"or a dict with 'inputs' and 'targets'. Pass a plugin implementing training_step/eval_step "
        f"for other batch shapes (see 'Writing a plugin' in the docs)."
    )


class SplitBatch(NamedTuple):
    """A batch as the default step uses it: ``model(*args, **kwargs)``, then the loss against ``targets``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Any


def split_batch(batch: Any, *, allow_no_targets: bool = False) -> SplitBatch:
    """How the default step calls the model on ``batch``, and the targets it compares with.

    A dict with an input key passes its other keys (not the target key) to the
    model as keyword arguments; a dict with no input key is all keyword
    arguments (the targets, under a target key, are passed too: a Hugging
    Face model computes its loss from ``labels``). Other batches as
    :func:`unpack_batch` reads them.

    Raises:
        DataError: a batch the default step cannot read (see :func:`unpack_batch`).
    """
    if isinstance(batch, Mapping) and not isinstance(batch, torch.Tensor):
        input_key = next((k for k in _INPUT_KEYS if k in batch), None)
        target_key = next((k for k in _TARGET_KEYS if k in batch), None)
        targets = batch[target_key] if target_key is not None else None
        if input_key is None:
            if not batch or not all(isinstance(k, str) for k in batch):
                unpack_batch(batch, allow_no_targets=allow_no_targets)  # raises, saying what it saw
            return SplitBatch((), dict(batch), targets)
        if targets is None and not allow_no_targets:
            unpack_batch(batch)  # raises, saying what it saw
        extra = {k: v for k, v in batch.items() if k not in (input_key, target_key)}
        return SplitBatch((batch[input_key],), extra, targets)
    inputs, targets = unpack_batch(batch, allow_no_targets=allow_no_targets)
    return SplitBatch((inputs,), {}, targets)


def batch_size_of(x: Any) -> int:
    """Number of samples in ``x``: the first dimension of its first tensor (1 if none)."""
    while True:  # a loop, not recursion: one frame for the usual (inputs, targets) batch
        if isinstance(x, torch.Tensor):
            return x.shape[0] if x.dim() > 0 else 1
        if isinstance(x, (tuple, list)) and x:
            x = x[0]
        elif isinstance(x, Mapping) and x:
            x = next(iter(x.values()))
        else:
            return 1


def _call_model(model: torch.nn.Module, split: SplitBatch) -> Any:
    """``model(*args, **kwargs)``; a keyword the model's forward does not take is a DataError."""
    if not split.kwargs:
        (inputs,) = split.args
        if type(inputs) is torch.Tensor:  # the usual case, without the Mapping ABC check
            return model(inputs)
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    try:
        return model(*split.args, **split.kwargs)
    except TypeError as exc:
        if "keyword argument" not in str(exc) and "positional argument" not in str(exc):
            raise
        forward = type(_inner_module(model)).__name__ + ".forward"
        call = ", ".join(["inputs"] * len(split.args) + [f"{k}=..." for k in split.kwargs])
        rename = (
            ""
            if split.args
            else f" It found no input key {list(_INPUT_KEYS)}, so every key is a keyword argument: rename "
            f"the model's input to one of those to pass it positionally."
        )
        raise DataError(
            f"the default step calls the model as model({call}) for this dict batch with keys "
            f"{sorted(split.kwargs)}{' and an input key' if split.args else ''}, but {forward}() does not "
            f"take that: {exc}.{rename} Or accept these keyword arguments in forward, remove the keys from "
            f"the batch (in the dataset or collate_fn), or implement training_step/eval_step in a plugin"
        ) from exc


def _inner_module(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner) if type(inner).__name__ == "DistributedDataParallel" else inner


def _output_loss(output: Any) -> Any:
    """A loss the model computed itself (a Hugging Face model given ``labels``), or None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _logits(output: Any) -> Any:
    """What metrics compare with the targets: ``output.logits`` when the model returns a record of outputs."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return output if logits is None else logits


# Losses that take class indices: targets of shape (N, ...) as int64.
_CLASS_INDEX_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)
# Losses that compare element by element: they broadcast other shapes, with only a warning.
_ELEMENTWISE_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} of shape {tuple(x.shape)}"
    return type(x).__name__


def _loss_fix(loss_fn: Any, outputs: Any, targets: Any, exc: BaseException | None) -> str:
    """What to change so that ``loss_fn(outputs, targets)`` works (a best guess from shapes and dtypes)."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return (
            "the default step passes the model's output and the batch's targets to loss_fn as they are; "
            "make both tensors, or implement training_step/eval_step in a plugin"
        )
    name = type(loss_fn).__name__ + getattr(loss_fn, "__name__", "")
    if outputs.dim() and targets.dim() and outputs.shape[0] != targets.shape[0]:
        return (
            f"the model returned {outputs.shape[0]} rows for a batch of {targets.shape[0]} targets; "
            f"check the reshapes in forward (e.g. x.view(-1, n) with a wrong n)"
        )
    class_index = isinstance(loss_fn, _CLASS_INDEX_LOSSES) or "cross_entropy" in name or "nll" in name
    if class_index and targets.dim() == outputs.dim() - 1:
        if targets.dtype != torch.long:
            return "class-index targets must be int64: convert them with targets.long() (in the dataset)"
        if isinstance(exc, IndexError):
            classes = outputs.shape[1] if outputs.dim() > 1 else outputs.shape[0]
            low, high = int(targets.min()), int(targets.max())
            return (
                f"class indices must be in [0, {classes}) for a model with {classes} outputs, but the "
                f"targets range from {low} to {high}: give the model more outputs, or remap the labels"
            )
    if class_index and targets.dim() == outputs.dim() and targets.shape[-1] == 1:
        return "the targets have an extra dimension of size 1: use targets.squeeze(-1) for class indices"
    if targets.shape != outputs.shape:
        return (
            f"{type(loss_fn).__name__} needs targets of the outputs' shape {tuple(outputs.shape)}: reshape "
            f"one of them (e.g. outputs.squeeze(-1), or targets.view_as(outputs))"
        )
    if targets.dtype != outputs.dtype:
        return f"convert the targets to the outputs' dtype: targets.to({outputs.dtype})"
    return "check that loss_fn fits the model's outputs and the targets"


def _where(state: State) -> str:
    return f"at epoch {state.epoch + 1}, batch {state.batch_idx} ({state.phase.value})"


def compute_loss(trainer: Trainer, state: State, outputs: Any, targets: Any) -> Any:
    """``trainer.loss_fn(outputs, targets)``, with a :class:`~dltrain.StepError` when they do not fit.

    Raises:
        StepError: the loss function rejected the outputs or targets (wrong
            dtype, shape or class range; the original error is the cause), or
            an element-wise loss would silently broadcast different shapes.
    """
    loss_fn = trainer.loss_fn
    if (
        isinstance(loss_fn, _ELEMENTWISE_LOSSES)
        and isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.shape != targets.shape
    ):
        raise StepError(
            f"loss_fn {type(loss_fn).__name__} got the model's outputs ({_describe(outputs)}) and targets "
            f"({_describe(targets)}) {_where(state)}; it would broadcast them to a wrong loss. "
            f"Fix: {_loss_fix(loss_fn, outputs, targets, None)}"
        )
    try:
        return loss_fn(outputs, targets)
    except (RuntimeError, ValueError, IndexError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise StepError(
            f"loss_fn {type(loss_fn).__name__} failed on the model's outputs ({_describe(outputs)}) and the "
            f"targets ({_describe(targets)}) {_where(state)}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            f"Fix: {_loss_fix(loss_fn, outputs, targets, exc)}"
        ) from exc


class StepPlugin:
    """The default ``training_step`` and ``eval_step``: ``loss_fn(model(inputs), targets)``."""

    name = "step"

    @hookimpl(trylast=True)
    def training_step(self, trainer: Trainer, state: State, model: torch.nn.Module, batch: Any) -> StepOutput:
        """Forward the inputs and compute the loss against the targets (or take the model's own loss)."""
        if trainer.config.manual_optimization:
            raise StepError(
                "manual_optimization=True, but no training_step of yours answered this batch (it returned "
                "None): a manual step must do its update and return its losses (a StepOutput, a dict of "
                "named losses, or a scalar loss)"
            )
        if type(batch) in (tuple, list) and len(batch) == 2 and type(batch[0]) is torch.Tensor:
            # The usual batch, (inputs, targets), read without the general path below (faster per step).
            inputs, targets = batch
            output = model(inputs)
            size = inputs.shape[0] if inputs.dim() else 1
            return StepOutput(compute_loss(trainer, state, output, targets), output, targets, size)
        split = split_batch(batch)
        output = _call_model(model, split)
        if split.kwargs:  # a dict batch: the model may have computed the loss itself
            loss = _output_loss(output)
            outputs = _logits(output)
            if loss is None:
                loss = self._loss_against_targets(trainer, state, outputs, split.targets)
            return StepOutput(loss, outputs, split.targets, batch_size_of(batch))
        loss = compute_loss(trainer, state, output, split.targets)
        return StepOutput(loss, output, split.targets, batch_size_of(split.args[0]))

    @staticmethod
    def _loss_against_targets(trainer: Trainer, state: State, outputs: Any, targets: Any) -> Any:
        if targets is None or trainer.loss_fn is None:
            raise StepError(
                f"the model's output for this dict batch has no loss (no .loss or 'loss'), and there is "
                f"{'no target key ' + str(list(_TARGET_KEYS)) if targets is None else 'no loss_fn'} to compute "
                f"one {_where(state)}: pass loss_fn to fit and a target key in the batch, or have the model "
                f"return its loss (a Hugging Face model does when the batch has 'labels')"
            )
        return compute_loss(trainer, state, outputs, targets)

    @hookimpl(trylast=True)
    def eval_step(self, trainer: Trainer, state: State, model: torch.nn.Module, batch: Any) -> StepOutput:
        """Forward the inputs; compute the loss when there are targets and a loss function."""
        predicting = state.phase is Phase.PREDICT
        split = split_batch(batch, allow_no_targets=predicting)
        output = _call_model(model, split)
        outputs = _logits(output) if split.kwargs else output
        loss = _output_loss(output) if split.kwargs and not predicting else None
        if loss is None and split.targets is not None and trainer.loss_fn is not None and not predicting:
            loss = compute_loss(trainer, state, outputs, split.targets)
        size = batch_size_of(batch) if split.kwargs else batch_size_of(split.args[0])
        return StepOutput(loss, outputs, split.targets, size)


def make_plugin(config: TrainerConfig) -> StepPlugin:
    """The factory the plugin manager calls."""
    return StepPlugin()
