"""Built-in plugin ``step``: the default training and evaluation steps.

It understands ``(inputs, targets)`` tuples and lists, dicts with well-known
keys, and (for predict) bare tensors. Any other batch shape is supported by
a plugin implementing ``training_step`` / ``eval_step``, which runs first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dltrain._markers import hookimpl
from dltrain.errors import DataError
from dltrain.state import Phase, StepOutput

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["StepPlugin", "batch_size_of", "unpack_batch"]

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


def batch_size_of(x: Any) -> int:
    """Number of samples in ``x``: the first dimension of its first tensor (1 if none)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (tuple, list)) and x:
        return batch_size_of(x[0])
    if isinstance(x, Mapping) and x:
        return batch_size_of(next(iter(x.values())))
    return 1


def _call_model(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


class StepPlugin:
    """The default ``training_step`` and ``eval_step``: ``loss_fn(model(inputs), targets)``."""

    name = "step"

    @hookimpl(trylast=True)
    def training_step(self, trainer: Trainer, model: torch.nn.Module, batch: Any) -> StepOutput:
        """Forward the inputs and compute the loss against the targets."""
        inputs, targets = unpack_batch(batch)
        outputs = _call_model(model, inputs)
        loss = trainer.loss_fn(outputs, targets)
        return StepOutput(loss, outputs, targets, batch_size_of(inputs))

    @hookimpl(trylast=True)
    def eval_step(self, trainer: Trainer, state: State, model: torch.nn.Module, batch: Any) -> StepOutput:
        """Forward the inputs; compute the loss when there are targets and a loss function."""
        inputs, targets = unpack_batch(batch, allow_no_targets=state.phase is Phase.PREDICT)
        outputs = _call_model(model, inputs)
        loss = None
        if targets is not None and trainer.loss_fn is not None and state.phase is not Phase.PREDICT:
            loss = trainer.loss_fn(outputs, targets)
        return StepOutput(loss, outputs, targets, batch_size_of(inputs))


def make_plugin(config: TrainerConfig) -> StepPlugin:
    """The factory the plugin manager calls."""
    return StepPlugin()
