"""The step runner: turns training batches into updates.

It owns everything between a loss and new weights: backward (with the
precision scaler, the 1/accumulate_grad_batches scaling, and DDP's
``no_sync`` for micro-batches that do not step), and each optimizer step
(unscaling, the rescale of a last partial group, clipping, the non-finite
policy, the scaler's step and update, zeroing the gradients, a per-step
scheduler). The loop calls it for every batch; with manual optimization the
user's ``training_step`` calls the same :meth:`StepRunner.backward` and
:meth:`StepRunner.optimizer_step` through the Trainer, so automatic and
manual programs share one implementation of all of that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dltrain._nonfinite import NonFiniteGuard, Problem, RollbackNeeded
from dltrain.errors import StepError
from dltrain.state import State, StepOutput

if TYPE_CHECKING:
    from dltrain._optimizers import OptimizerSet
    from dltrain._precision import Precision
    from dltrain.trainer import Trainer

__all__ = ["StepRunner", "grad_sync_switch"]


def _position(where: tuple[int, int]) -> int:
    """``(epoch, batch_idx)`` as one integer that orders like the pair."""
    return where[0] * 2**31 + where[1]


def reads_losses_as_they_come(device: torch.device) -> bool:
    """Whether the non-finite policy reads each loss when it is computed: on the CPU only, where
    reading a value makes nothing wait (on an accelerator it would stall the pipeline)."""
    return device.type == "cpu"


def _dense_groups(optimizer: torch.optim.Optimizer, device: torch.device) -> list[list[torch.nn.Parameter]]:
    """The optimizer's floating-point parameters on ``device``, by dtype, that hold plain tensors
    (sharded ones, such as FSDP's, are left to the check of the weights)."""
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            plain = getattr(p, "full_tensor", None) is None and not p.is_sparse
            if plain and p.is_floating_point() and p.device == device:
                groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def grad_sync_switch(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """DistributedDataParallel's ``no_sync`` of ``model`` (``torch.compile`` wrappers looked through),
    or None for a model whose backward synchronises nothing.

    A model sharded with FSDP keeps reducing each micro-batch: skipping that
    would hold unsharded gradients, the memory sharding is there to save.
    """
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync
    return None


class StepRunner:
    """Backward and optimizer steps of one fit (see the module docs).

    Per batch the loop calls :meth:`start_batch`, runs the step, then
    :meth:`automatic` (automatic optimization only) and :meth:`end_batch`.

    Args:
        trainer: The Trainer (its hooks, its model, ``request_stop``).
        state: The run's state; the runner advances ``micro_step``,
            ``global_step`` and ``skipped_steps``.
        optimizers: The fit's optimizers and schedulers.
        precision: The run's autocast and grad scaler.
    """

    def __init__(
        self, trainer: Trainer, state: State, optimizers: OptimizerSet, precision: Precision
    ) -> None:
        config = trainer.config
        self.trainer, self.state, self.optimizers = trainer, state, optimizers
        self.manual = config.manual_optimization
        self.autocast, self.scaler = precision.autocast, precision.scaler
        self.accum = config.accumulate_grad_batches
        self.clip_val, self.clip_algorithm = config.gradient_clip_val, config.gradient_clip_algorithm
        self.log_every = config.log_every_n_steps
        self.guard = NonFiniteGuard(config.on_nonfinite)
        self.names = list(optimizers)
        self._opts = dict(optimizers.items())  # a plain dict: the hot path looks names up here
        self.step_schedulers = {
            n: s.scheduler for n, s in optimizers.schedules.items() if s.interval == "step"
        }
        # The usual update needs no gradient preparation: no scaler, no clipping, no skip policy.
        self.plain = self.scaler is None and not self.guard.skips and self.clip_val is None
        self.boundary = True  # this micro-batch completes its accumulation group
        self.in_step = False  # inside a training step (manual calls are allowed)
        self._no_sync: contextlib.ExitStack | None = None
        self._sync_switch: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
        self._scaled_steps = False  # an optimizer stepped through the scaler in this batch
        self._skipping = False  # "skip": this batch backpropagated a non-finite loss
        self._skip_counted = False
        self._before_bw: Any = None
        self._after_bw: Any = None
        self._before_step: Any = None
        # Each optimizer's parameters by dtype, for the non-finite policy's per-step gradient flag
        # on an accelerator (see NonFiniteGuard; set each epoch).
        self._watched: dict[str, list[list[torch.nn.Parameter]]] = {}
        self._watch_grads = False

    def start_epoch(self) -> None:
        """Fetch the hook callers and the model's gradient-sync switch (once per epoch, not per step)."""
        hooks = self.trainer._hooks
        self._before_bw, self._after_bw = hooks.get("on_before_backward"), hooks.get("on_after_backward")
        self._before_step = hooks.get("on_before_optimizer_step")
        self._sync_switch = grad_sync_switch(self.trainer.model) if self.accum > 1 else None
        self._watch_epoch_grads()

    def _watch_epoch_grads(self) -> None:
        """How the non-finite policy watches gradients this epoch: not with "skip" (it checks them
        with a sync) nor with a GradScaler (it skips inf steps); else by flags on an accelerator,
        by reading each loss on the CPU (see NonFiniteGuard)."""
        guard, device = self.guard, self.state.device
        if guard.skips or self.scaler is not None:
            guard.grad_mode = None
        elif reads_losses_as_they_come(device):
            params = [p for p in self.trainer.model.parameters() if p.is_floating_point() and p.numel()]
            # Sharded weights (FSDP) are checked by a collective, which one process cannot start alone
            # when its loss went bad: there the blame stays with the losses.
            sharded = any(getattr(p, "full_tensor", None) is not None for p in params)
            guard.grad_mode = None if sharded else "read"
            guard.params = [] if sharded else [p.detach() for p in params]
        else:
            guard.grad_mode = "flags"
            self._watched = {name: _dense_groups(opt, device) for name, opt in self._opts.items()}
        self._watch_grads = guard.grad_mode == "flags"

    # -- per batch ----------------------------------------------------------------

    def start_batch(self, boundary: bool) -> None:
        """A training batch begins; ``boundary``: it completes its accumulation group (so it steps).

        Micro-batches that only accumulate run forward and backward without
        DDP's gradient all-reduce (``no_sync``): the group's gradients are
        reduced once, in the backward of its last micro-batch.
        """
        self.boundary = boundary
        self.in_step = True
        self.state.micro_step += 1
        if not boundary and self._sync_switch is not None:
            self._no_sync = contextlib.ExitStack()
            self._no_sync.enter_context(self._sync_switch())

    def automatic(self, output: StepOutput) -> None:
        """Automatic optimization of one batch: backward of ``output.loss``, then at the end of an
        accumulation group a step of every optimizer. ``output.loss`` is replaced by its detached value."""
        loss = output.loss
        assert loss is not None
        output.loss = self.backward(loss)
        if self._skipping:
            output.loss = None  # "skip": a skipped batch is left out of the epoch's loss
        if self.boundary:
            for name in self.names:
                self.optimizer_step(name)

    def end_batch(self) -> None:
        """The batch's step is done: leave ``no_sync``; at a group's end, update the scaler and counters."""
        state = self.state
        self.in_step = False
        if self._no_sync is not None:
            self._no_sync.close()
            self._no_sync = None
        if not self.boundary:
            return
        if self._scaled_steps:  # once per update, after every optimizer stepped (GradScaler's rule)
            self.scaler.update()
            self._scaled_steps = False
        if self._skipping:  # "skip": no gradient of this batch outlives it, stepped or not
            for optimizer in self._opts.values():
                optimizer.zero_grad(set_to_none=True)
        self._skipping = self._skip_counted = False
        self.guard.step_done(state)
        state.micro_step = 0
        state.global_step += 1
        if state.global_step % self.log_every == 0:
            self.check_nonfinite()

    # -- what manual optimization calls -----------------------------------------------

    def backward(self, loss: torch.Tensor, optimizer_name: str | None = None) -> torch.Tensor:
        """Back-propagate ``loss``: divided by ``accumulate_grad_batches``, through the scaler,
        outside autocast, with the backward hooks around it; the loss is watched by the non-finite
        policy. Returns the loss, detached."""
        if not self.in_step:
            raise StepError(
                "trainer.backward() was called outside a training step; call it from training_step"
            )
        state, trainer = self.state, self.trainer
        scaled = loss / self.accum if self.accum > 1 else loss
        if self._before_bw is not None:
            self._before_bw(trainer=trainer, state=state, loss=scaled, optimizer_name=optimizer_name)
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        if self.autocast is None:
            scaled.backward()  # type: ignore[no-untyped-call]
        else:  # torch advises against backward under autocast (a manual step calls this inside it)
            with torch.autocast(device_type=state.device.type, enabled=False):
                scaled.backward()  # type: ignore[no-untyped-call]
        if self._after_bw is not None:
            self._after_bw(trainer=trainer, state=state, optimizer_name=optimizer_name)
        detached = loss.detach()  # once: the guard and the step's output share it
        if self.guard.skips:  # "skip" decides before the step: one sync per loss
            if not self.guard.loss_finite(detached):
                self._skipping = True
        else:  # "raise" and "stop" read the window every few steps (no sync here)
            self.guard.watch(detached, state)
        return detached

    def optimizer_step(self, name: str) -> bool:
        """Step optimizer ``name`` at the end of an accumulation group; returns whether it stepped.

        Before a micro-batch that only accumulates, it does nothing (returns
        False). Else: prepare the gradients (unscale, rescale a partial group,
        clip; skip on non-finite values under ``"skip"``), call
        ``on_before_optimizer_step``, step, zero the gradients, step a
        per-step scheduler.
        """
        if not self.in_step and self.manual:
            raise StepError(
                "trainer.optimizer_step() was called outside a training step; call it from training_step"
            )
        if not self.boundary:
            return False
        optimizer = self._opts.get(name)
        if optimizer is None:
            raise StepError(f"no optimizer named {name!r}; this fit's optimizers are {self.names}")
        partial = self.state.micro_step != self.accum
        # The usual update skips the preparation: a full group, no scaler, clipping or skip policy.
        skip = False if self.plain and not partial else self._prepare(optimizer, partial)
        if skip:
            if not self._skip_counted:
                self.state.skipped_steps += 1
                self._skip_counted = True
        else:
            if self._watch_grads:
                self.guard.watch_grads(self._watched.get(name, ()), self.state.device)
            if self._before_step is not None:
                self._before_step(
                    trainer=self.trainer, state=self.state, optimizer=optimizer, optimizer_name=name
                )
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
                self._scaled_steps = True
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.step_schedulers.get(name)
        if scheduler is not None and not skip:
            scheduler.step()
        return not skip

    def _prepare(self, optimizer: torch.optim.Optimizer, partial: bool) -> bool:
        """Unscale, undo the 1/accum scaling of a partial group, clip; whether to skip the step."""
        scaler = self.scaler
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if scaler is not None:  # clip and rescale true gradients, not scaled ones
            scaler.unscale_(optimizer)
        if partial and params:  # a last, partial group: undo the 1/accum scaling
            torch._foreach_mul_([p.grad for p in params], self.accum / self.state.micro_step)
        if self.clip_val is not None and params:
            if self.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, self.clip_val)
        skip = self._skipping
        if scaler is None and self.guard.skips:
            # A finite loss can have NaN gradients. Checked even after a local NaN loss: with
            # sharded (FSDP) gradients the check is a collective every process must join.
            skip = not self.guard.grads_finite(params) or skip
        return skip

    # -- the non-finite policy ------------------------------------------------------------

    def check_nonfinite(self) -> None:
        """Apply the non-finite policy to the losses since the last check (one host sync).

        Raises:
            RollbackNeeded: policy "rollback" and some process found a non-finite value (all
                processes raise it at the same check, agreeing on the batch that came first).
        """
        from dltrain._loop import unwrap_model

        trainer = self.trainer
        problem = self.guard.check(self.state, unwrap_model(trainer.model), trainer.request_stop)
        if self.guard.policy == "rollback":
            problem = self._agree_on_problem(problem)
            if problem is not None:
                raise RollbackNeeded(problem)

    def _agree_on_problem(self, problem: Problem | None) -> Problem | None:
        """The problem any process found, the same in all: the earliest culprit batch, the earliest window."""
        never = -(2**62)
        mine = [
            int(problem is not None),
            -_position(problem.culprit) if problem is not None and problem.culprit is not None else never,
            -problem.since if problem is not None else never,
        ]
        agreed = self.trainer._hooks.call_first(
            "agree_on_max", trainer=self.trainer, state=self.state, values=mine
        )
        found, culprit, since = mine if agreed is None else agreed
        if not found:
            return None
        where = None if culprit == never else divmod(-culprit, 2**31)
        text = problem.text if problem is not None else "a non-finite value in another process"
        return Problem(text, where, -since)

    def grads_are_state(self) -> bool:
        """Whether the parameters' gradients are part of the run's state now: mid accumulation
        group, or with manual optimization (a step may leave gradients for the next one)."""
        return self.state.micro_step > 0 or self.manual

    def unsynced_grads(self) -> bool:
        """Whether the gradients now are this process's alone (mid group, under ``no_sync``), so a
        checkpoint must average them across processes to hold what a synced backward would."""
        return self._sync_switch is not None and self.state.micro_step > 0

    def reset(self) -> None:
        """Forget the batch in progress (after a rollback restored an earlier state)."""
        self.close()
        self._scaled_steps = self._skipping = self._skip_counted = False
        self.guard.clear()

    def close(self) -> None:
        """Leave ``no_sync`` if a batch ended with an exception inside it."""
        self.in_step = False
        if self._no_sync is not None:
            self._no_sync.close()
            self._no_sync = None
