"""``EMA``: an exponential moving average of the weights, evaluated and checkpointed."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from dltrain._loop import unwrap_model
from dltrain._markers import hookimpl
from dltrain.errors import CheckpointError, ConfigError
from dltrain.state import Phase, RunKind

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["EMA"]


class EMA:
    """Keeps an exponential moving average of the model's weights during fit.

    After every optimizer step, each averaged tensor moves towards the
    model's: ``average += (1 - decay) * (weight - average)``, for all of them
    in one fused multi-tensor operation (``torch._foreach_lerp_``), on the
    model's device, in the weights' dtype, with no host sync. The average
    starts from the weights at fit start (a fresh fit starts a fresh average).

    What is averaged: every floating-point parameter (trainable or frozen) and
    every floating-point buffer, so BatchNorm's running statistics follow the
    averaged weights. Integer buffers (``num_batches_tracked``) are neither
    averaged nor swapped.

    Evaluation with the average (``use_for_eval``): for every validation of
    the fit, and for a later ``validate``/``test``/``predict`` of the same
    Trainer and model, the averaged tensors are swapped into the model at
    ``on_eval_epoch_start`` and back at ``on_eval_epoch_end`` (the tensors'
    storage is exchanged, nothing is copied), so ``val_*`` metrics, and a
    checkpoint's ``monitor`` score, are those of the averaged weights.

    Checkpoints hold the live weights as the model (a resume continues the
    training exactly) and the average under ``plugins["ema"]["average"]``,
    keyed like ``model.state_dict()``: a resumed run continues the average.
    With ``copy_to_model_at_end`` the average is copied into the model when
    fit ends, after the final checkpoint (which keeps the live weights).

    Args:
        decay: How much of the average each step keeps, in (0, 1): 0.999
            averages over about the last 1000 steps.
        use_for_eval: Evaluate with the averaged weights.
        copy_to_model_at_end: Copy the average into the model when fit ends.

    Raises:
        ConfigError: ``decay`` is not in (0, 1), or the run shards the model
            (``strategy="fsdp"``), which this average does not support.
    """

    name = "ema"

    def __init__(
        self, decay: float = 0.999, use_for_eval: bool = True, copy_to_model_at_end: bool = False
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA: decay must be a number between 0 and 1 (e.g. 0.999), got {decay!r}")
        self.decay = float(decay)
        self.use_for_eval = use_for_eval
        self.copy_to_model_at_end = copy_to_model_at_end
        self.updates = 0
        self._module: torch.nn.Module | None = None
        self._names: list[str] = []
        self._live: list[torch.Tensor] = []
        self._average: list[torch.Tensor] = []
        self._pending: Mapping[str, Any] | None = None  # a checkpoint's state, until fit starts
        self._seen_step = 0
        self._swapped = False
        self._copied = False

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, keyed like the model's ``state_dict()`` (empty before a fit).

        ``model.load_state_dict(ema.averaged_state(), strict=False)`` puts the
        average into a model of the same architecture.
        """
        return dict(zip(self._names, self._average, strict=True))

    # -- the average ------------------------------------------------------------------

    @hookimpl
    def on_setup(self, trainer: Trainer, state: State) -> None:
        """A new fit forgets the previous fit's average."""
        if state.run is RunKind.FIT:
            if trainer.config.strategy == "fsdp":
                raise ConfigError(
                    "EMA does not support strategy='fsdp' (each process holds a shard of the weights); "
                    "use strategy='ddp', or remove EMA from the plugins"
                )
            self._module, self._names, self._live, self._average = None, [], [], []
            self._pending, self.updates, self._copied = None, 0, False

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Start the average from the weights, or from the checkpoint being resumed."""
        module = unwrap_model(trainer.model)
        named: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in module.named_parameters() if p.is_floating_point()
        ]
        named += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        self._module = module
        self._names = [n for n, _ in named]
        self._live = [t for _, t in named]
        with torch.no_grad():
            self._average = [t.detach().clone() for t in self._live]
            if self._pending is not None:
                self._restore(self._pending)
        self._pending = None
        self._seen_step = state.global_step

    def _restore(self, saved: Mapping[str, Any]) -> None:
        average = saved.get("average") or {}
        missing = [n for n in self._names if n not in average]
        if missing:
            raise CheckpointError(
                f"the checkpoint's EMA has no average for {missing[:5]} of this model; resume with "
                f"the model the checkpoint was made with, or without the EMA plugin"
            )
        for name, tensor in zip(self._names, self._average, strict=True):
            tensor.copy_(average[name])
        self.updates = int(saved.get("updates", 0))

    @hookimpl
    def on_train_batch_end(self, state: State) -> None:
        """After each optimizer step: move the average towards the weights (one fused operation)."""
        if state.micro_step or state.global_step == self._seen_step or not self._average:
            return
        self._seen_step = state.global_step
        with torch.no_grad():
            torch._foreach_lerp_(self._average, self._live, 1.0 - self.decay)
        self.updates += 1

    # -- evaluation with the average ------------------------------------------------------

    def _swap(self) -> None:
        """Exchange the storage of the model's tensors and the averaged ones (no copy)."""
        for live, average in zip(self._live, self._average, strict=True):
            live.data, average.data = average.data, live.data
        self._swapped = not self._swapped

    @hookimpl
    def on_eval_epoch_start(self, trainer: Trainer, state: State) -> None:
        """Evaluate with the averaged weights (when asked, and when they are this model's)."""
        if (
            self.use_for_eval
            and self._average
            and not self._swapped
            and not self._copied
            and state.phase in (Phase.VALIDATE, Phase.TEST, Phase.PREDICT)
            and unwrap_model(trainer.model) is self._module
        ):
            self._swap()

    @hookimpl
    def on_eval_epoch_end(self) -> None:
        """Put the live weights back."""
        if self._swapped:
            self._swap()

    @hookimpl
    def on_exception(self) -> None:
        """An error inside an evaluation: put the live weights back."""
        if self._swapped:
            self._swap()

    @hookimpl(wrapper=True)
    def on_fit_end(self) -> Generator[None, None, None]:
        """After the final checkpoint (the live weights): copy the average into the model when asked."""
        result = yield
        if self.copy_to_model_at_end and self._average:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._average)
            self._copied = True
        return result

    # -- checkpoints ---------------------------------------------------------------------

    @hookimpl
    def state_dict(self) -> dict[str, Any] | None:
        """The average (tensors on the model's device, keyed like the model's state_dict) and its count."""
        if not self._average:
            return None
        return {"decay": self.decay, "updates": self.updates, "average": self.averaged_state()}

    @hookimpl
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep a checkpoint's average; it replaces the fresh one when fit starts."""
        self._pending = state_dict
