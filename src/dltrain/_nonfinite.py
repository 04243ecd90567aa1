"""The non-finite loss policy (``on_nonfinite``): raise, skip, stop or roll back.

"raise", "stop" and "rollback" cost no host sync per step: each
micro-batch's loss is kept on the device (a detached reference, no kernel);
on an accelerator each optimizer step's gradients leave one flag on the
device (one fused check, no sync), while on the CPU, where reading a value
makes nothing wait, each loss is read as it comes and the first non-finite
one has its weights checked (a full pass over the gradients every step would
cost more there than the whole loop); the losses and flags of the window,
with the weights' finiteness, are read with one sync every
``log_every_n_steps`` optimizer steps and at each epoch's end. The first non-finite value of a window is
then reported exactly, although training went on until the check: the batch
whose loss was first non-finite, or the step whose gradients were non-finite
though its loss was finite (an inf gradient), whichever came first. "skip"
must decide before each optimizer step, so it reads every loss, and the
gradients, with one sync per step (on an accelerator; a float16 GradScaler
does the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dltrain._running import stack_scalars
from dltrain.errors import NonFiniteError
from dltrain.state import State

__all__ = ["NonFiniteGuard", "Problem", "RollbackNeeded", "finite_flags"]

_ADVICE = (
    "Lower the learning rate, clip gradients (gradient_clip_val), check that batch for NaN or inf, "
    "or set on_nonfinite='skip' (skip such steps) or 'stop' (end the run cleanly)"
)


def finite_flags(
    tensors: Sequence[torch.Tensor], device: torch.device, *, exact: bool = False
) -> torch.Tensor:
    """One boolean per (non-empty) tensor, on ``device``: all its values finite. No sync.

    By default a tensor's float32 sum is checked: it is NaN or inf when one of
    its values is (NaN and inf propagate; inf - inf is NaN); finite weights
    would need values near 1e32 to overflow it. It is 15-20x cheaper on a CPU
    than the infinity norm or ``isfinite(t).all()``, and half-precision tensors
    are summed in float32. ``exact=True`` checks ``isfinite(t).all()`` instead
    (any dtype, complex included).

    For tensors sharded with FSDP (DTensors) the flags cover every process's
    shards, so all processes get the same answer (a collective: all must call).
    """
    if exact:
        flags = torch.stack([torch.isfinite(t).all().to(device) for t in tensors])
    else:
        sums = [t.sum(dtype=torch.float32) for t in tensors]
        flags = torch.isfinite(torch.stack([s.to(device) for s in sums]))
    full_tensor = getattr(flags, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else flags


@dataclass(frozen=True)
class Problem:
    """A non-finite value found by :meth:`NonFiniteGuard.check`.

    Attributes:
        text: What went wrong and where, for people.
        culprit: ``(epoch, batch_idx)`` of the first batch whose loss was not finite, if one was.
        since: The global step the problem arose at or after: the culprit's step, else the
            start of the checked window. The weights of a checkpoint from that step are finite.
    """

    text: str
    culprit: tuple[int, int] | None
    since: int


class RollbackNeeded(Exception):
    """Raised by the step runner under ``on_nonfinite="rollback"``; the driver catches it and rolls back."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.text)
        self.problem = problem


class NonFiniteGuard:
    """Watches the losses of one run and applies the policy.

    Under "raise" and "stop" the step runner hands every back-propagated loss
    to :meth:`watch` (a list append: no kernel, no sync), with where it came
    from; :meth:`check` reads them all, with the weights' finiteness, in one
    sync. Under "skip" the runner asks :meth:`loss_finite` for every loss and
    :meth:`grads_finite` before every step.

    Args:
        policy: ``"raise"``, ``"skip"``, ``"stop"`` or ``"rollback"`` (``TrainerConfig.on_nonfinite``).
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skips = policy == "skip"
        self.window: list[torch.Tensor] = []  # losses since the last check ("raise", "stop")
        self.where: list[tuple[int, int, int]] = []  # (epoch, batch_idx, global_step) of each
        # How gradients are watched (set by the step runner each epoch): "flags" on an accelerator,
        # "read" on the CPU, None when not ("skip" checks them itself, a GradScaler skips inf steps).
        self.grad_mode: str | None = None
        self.params: list[torch.Tensor] = []  # the weights, checked when a loss goes bad ("read")
        # "flags": one flag per optimizer step of the window, 1.0 where a gradient was not finite,
        # and where each step was taken; the buffer lives on the device and is zeroed at each check.
        self.grad_flags: torch.Tensor | None = None
        self.grad_where: list[tuple[int, int, int]] = []
        self._one: torch.Tensor | None = None
        # "read": where the last optimizer step was taken, and that step, once the first non-finite
        # loss of the window found the weights it was computed with already spoiled.
        self.last_step: tuple[int, int, int] | None = None
        self._read_culprit: tuple[int, int, int] | None = None
        self._bad_loss_seen = False

    def watch(self, loss: torch.Tensor, state: State) -> None:
        """Keep a detached loss (and where it came from) until the next :meth:`check`.

        On the CPU, where reading a value makes nothing wait, the loss is also
        read now; the first non-finite one has the weights it was computed
        with checked, so a gradient that spoiled them is blamed, not this batch.
        """
        self.window.append(loss)
        self.where.append((state.epoch, state.batch_idx, state.global_step))
        if self.grad_mode == "read" and not self._bad_loss_seen:
            finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all())
            if not finite:  # rare: the one closer look of a window
                self._bad_loss_seen = True
                if self.params and not bool(finite_flags(self.params, loss.device).all()):
                    self._read_culprit = self.last_step

    def watch_grads(self, groups: Sequence[Sequence[torch.nn.Parameter]], device: torch.device) -> None:
        """On an accelerator: flag this optimizer step if a gradient is NaN or inf, with one fused
        multi-tensor check per group of parameters of one dtype on ``device`` (no sync). Called
        for each optimizer that steps; :meth:`step_done` closes the step."""
        index = len(self.grad_where)
        flags = self.grad_flags
        if flags is None or index >= flags.numel():
            grown = torch.zeros(max(64, 2 * index + 2), device=device)
            if flags is not None:
                grown[: flags.numel()] = flags
            self.grad_flags = flags = grown
            self._one = torch.ones(1, device=device)
        slot, one = flags[index : index + 1], self._one
        assert one is not None
        for params in groups:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:  # multiplies by 1.0 (exact); sets the slot to 1.0 on a non-finite value
                torch._amp_foreach_non_finite_check_and_unscale_(grads, slot, one)

    def step_done(self, state: State) -> None:
        """An optimizer step is complete (before ``global_step`` counts it)."""
        self.last_step = where = (state.epoch, state.batch_idx, state.global_step)
        if self.grad_mode == "flags":
            self.grad_where.append(where)

    def clear(self) -> None:
        """Forget the window (after a check, or a rollback)."""
        self.window.clear()
        self.where.clear()
        self._read_culprit, self._bad_loss_seen = None, False
        if self.grad_where:
            self.grad_where.clear()
            if self.grad_flags is not None:
                self.grad_flags.zero_()

    @staticmethod
    def loss_finite(loss: torch.Tensor) -> bool:
        """For policy "skip": whether every value of the loss is finite (one sync)."""
        return bool(torch.isfinite(loss).all())

    def grads_finite(self, params: Sequence[torch.nn.Parameter]) -> bool:
        """For policy "skip": whether every gradient is finite (one sync).

        A finite loss can still give NaN or inf gradients (``sqrt`` at 0, an
        overflow in backward); one such step would make every weight NaN.
        """
        grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
        return not grads or bool(finite_flags(grads, grads[0].device).all())

    def check(
        self, state: State, model: torch.nn.Module, request_stop: Callable[[str], None]
    ) -> Problem | None:
        """Read the watched losses and the weights (one sync); raise or request a stop if not finite.

        Returns:
            For policy "rollback", what went wrong (the caller rolls back); else None.

        Raises:
            NonFiniteError: policy "raise" and a loss or weight is NaN or infinite.
        """
        window, where = self.window, self.where
        if self.skips or not window:
            return None
        losses = stack_scalars(window).float()
        since = where[0][2]
        positions, steps, read_culprit = list(where), list(self.grad_where), self._read_culprit
        grads_ok = (
            self.grad_flags[: len(steps)].to(losses.device) == 0
            if steps and self.grad_flags is not None
            else losses.new_ones(0, dtype=torch.bool)
        )
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.numel()]
        loss_ok = torch.isfinite(losses)
        parts = [loss_ok, grads_ok]
        if named:
            parts.append(finite_flags([p.detach() for _, p in named], loss_ok.device))
        flags = torch.cat(parts)
        self.clear()
        if bool(flags.all()):  # the one sync of a good window
            return None
        n_losses, n_steps = loss_ok.numel(), grads_ok.numel()
        bad_weights = [
            n for (n, _), ok in zip(named, flags[n_losses + n_steps :].tolist(), strict=True) if not ok
        ]
        bad_losses = (~loss_ok).nonzero().flatten().tolist()
        bad_steps = [i for i, ok in enumerate(flags[n_losses : n_losses + n_steps].tolist()) if not ok]
        weights = f"; non-finite weights now in: {bad_weights[:5]}" if bad_weights else ""
        culprit: tuple[int, int] | None = None
        first_grad = steps[bad_steps[0]] if bad_steps else read_culprit
        one_step = self.last_step is not None and positions[0][2] == positions[-1][2] == self.last_step[2]
        if first_grad is None and not bad_losses and bad_weights and one_step:
            first_grad = self.last_step  # a window of one step: its gradients spoiled the weights
        if first_grad is not None and (not bad_losses or first_grad[2] < positions[bad_losses[0]][2]):
            # The gradients of a step were not finite though every loss up to it was: blame its batch,
            # not the next one, whose loss the already damaged weights made non-finite.
            epoch, batch, step = first_grad
            culprit, since = (epoch, batch), step  # the weights were finite before this step
            head = "non-finite gradient" if self.policy == "stop" else "a gradient became NaN or inf"
            shared = " (gradients are averaged across processes)" if state.world_size > 1 else ""
            problem = (
                f"{head} at epoch {epoch + 1}, global step {step}, batch {batch}, "
                f"though its loss was finite{shared}"
                + (
                    f" (the loss became non-finite later, at global step {positions[bad_losses[0]][2]})"
                    if bad_losses
                    else ""
                )
                + weights
            )
        elif bad_losses:
            first = bad_losses[0]
            epoch, batch, step = positions[first]
            culprit, since = (epoch, batch), step  # no gradient before it was non-finite
            value = float(losses[first])
            others = len(bad_losses) - 1
            head = f"non-finite loss ({value})" if self.policy == "stop" else f"the loss became {value}"
            problem = (
                f"{head} at epoch {epoch + 1}, global step {step}, batch {batch}"
                + (
                    f" (and {others} more non-finite loss(es) until global step {state.global_step})"
                    if others
                    else ""
                )
                + weights
            )
        else:
            problem = (
                f"non-finite weights in {bad_weights[:5]} after global step {state.global_step}, though "
                f"every loss since global step {since} was finite: a gradient was NaN or inf"
            )
        if self.policy == "rollback":
            return Problem(problem, culprit, since)
        if self.policy == "stop":
            request_stop(problem)
            return None
        raise NonFiniteError(
            f"{problem}. {_ADVICE}. Losses and gradients are checked every log_every_n_steps optimizer steps "
            f"and at each epoch's end (this check at global step {state.global_step}); log_every_n_steps=1 "
            f"stops at once."
        )
