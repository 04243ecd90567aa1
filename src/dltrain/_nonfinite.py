"""The non-finite loss policy (``on_nonfinite``): raise, skip or stop.

"raise" and "stop" cost no host sync per step: losses are summed on the
device (a NaN or inf anywhere makes the sum non-finite) and the sum is read
every ``log_every_n_steps`` optimizer steps and at each epoch's end. "skip"
must decide before each optimizer step, so it reads every loss (one sync per
step on an accelerator, as a float16 GradScaler does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dltrain.errors import NonFiniteError
from dltrain.state import State

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Watches the losses of one run and applies the policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._sum: torch.Tensor | None = None
        self._since = (0, 0)  # (global step, epoch) where the current window began

    def observe(self, state: State, loss: torch.Tensor) -> bool:
        """Record one micro-batch's loss; True when policy "skip" must skip its step."""
        if self.policy == "skip":
            return not bool(torch.isfinite(loss.detach()))
        total = self._sum
        if total is None or total.device != loss.device:
            total = self._sum = torch.zeros((), dtype=torch.float32, device=loss.device)
            self._since = (state.global_step, state.epoch)
        total.add_(loss.detach().float())
        return False

    def check(self, state: State, model: torch.nn.Module, request_stop: Callable[[str], None]) -> None:
        """Read the window's loss sum (one sync); raise or request a stop if it is not finite."""
        total = self._sum
        if total is None or self.policy == "skip":
            return
        value = float(total)
        since, epoch = self._since
        total.zero_()
        self._since = (state.global_step, state.epoch)
        if math.isfinite(value):
            return
        where = (
            f"between optimizer steps {since} and {state.global_step} "
            f"(epoch {epoch + 1}, batch {state.batch_idx}, phase {state.phase.value})"
        )
        if self.policy == "stop":
            request_stop(f"non-finite loss {where}")
            return
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        raise NonFiniteError(
            f"the loss became {value} {where}"
            + (f"; non-finite weights now in: {bad[:5]}" if bad else "")
            + ". Lower the learning rate, clip gradients (gradient_clip_val), check the data for NaN, "
            "or set on_nonfinite='skip' or 'stop'. Set log_every_n_steps=1 to stop at the exact step."
        )
