"""The mechanics of one run: epochs, steps, accumulation, precision, the non-finite policy.

A :class:`Loop` is made by the Trainer for each run, after the device is
chosen and the model prepared, and holds the run's private mechanics; the
public :class:`~dltrain.State` holds what plugins may read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from dltrain._nonfinite import NonFiniteGuard
from dltrain._precision import Precision
from dltrain._rng import get_rng_state, set_rng_state
from dltrain._running import RunningMean
from dltrain.default_plugins.step import batch_size_of
from dltrain.errors import DataError, DltrainError, PluginError, StepError
from dltrain.state import Phase, State, StepOutput

if TYPE_CHECKING:
    from dltrain.trainer import Trainer

__all__ = ["Loop", "unwrap_model"]

# Where a fit stands, saved in checkpoints: inside a training epoch, between an epoch's
# training and its validation, with epoch `state.epoch` complete, or before it starts.
STAGE_TRAIN, STAGE_VALIDATE, STAGE_DONE, STAGE_START = "train", "validate", "done", "start"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside ``torch.compile`` and DistributedDataParallel wrappers.

    During a run ``trainer.model`` may be wrapped (DDP by the ``distributed``
    plugin, then ``torch.compile``); plugins that save or inspect the model use
    this to reach the module the user passed. Any other module is returned as it is.
    """
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    return inner if isinstance(inner, torch.nn.Module) else model


def _length(data: Any) -> int | None:
    """``len(data)`` when the data knows it, else None."""
    try:
        return len(data)
    except TypeError:
        return None


def _data_generators(data: Any) -> list[torch.Generator]:
    """The torch Generators a DataLoader shuffles or seeds its workers with (its own RNG)."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    owners = (data, sampler, batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _set_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch`` on the data, its sampler or batch sampler (the first that has it)."""
    for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


class Loop:
    """One run's loop. The Trainer calls :meth:`fit` or :meth:`eval_epoch`."""

    def __init__(self, trainer: Trainer, state: State) -> None:
        self.trainer = trainer
        self.state = state
        self.config = trainer.config
        self.hooks = trainer._hooks
        precision = Precision(self.config.precision, state.device)
        self.autocast, self.scaler = precision.autocast, precision.scaler
        self.nonfinite = NonFiniteGuard(self.config.on_nonfinite, self.config.accumulate_grad_batches)
        self.stage = STAGE_START
        self.epoch_rng: dict[str, Any] | None = None  # RNG before iter(data): replays the data order
        self.resume_rng: dict[str, Any] | None = None  # RNG to restore once the data is replayed
        self.skip_step = False
        self.step_window = RunningMean()  # losses since the last on_step_metrics call
        self.resume_generators: list[torch.Tensor] | None = None  # the loader's own RNG at the save
        self.on_before_optimizer_step: Any = None  # its caller, fetched at each training epoch's start
        self.tracks_steps = False  # a plugin implements on_step_metrics
        self.accum, self.log_every = self.config.accumulate_grad_batches, self.config.log_every_n_steps
        # An optimizer step with nothing to do first: no scaler, no clipping, no skip policy.
        self.plain_update = (
            self.scaler is None and not self.nonfinite.skips and self.config.gradient_clip_val is None
        )
        self.step_scheduler: Any = None  # the scheduler when it steps per optimizer step

    # -- resume ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loop's position: counters, stage, the RNG that replays this epoch's data, and the
        training data's own generators now (to continue from an epoch's end)."""
        generators = _data_generators(self.trainer._train_data)
        return {
            **self.state.counters(),
            "stage": self.stage,
            "epoch_rng": self.epoch_rng,
            "data_generators": [gen.get_state() for gen in generators],
        }

    def load_state_dict(self, loop: dict[str, Any], rng: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (``rng`` is the RNG at saving)."""
        state = self.state
        state.epoch, state.global_step = int(loop["epoch"]), int(loop["global_step"])
        state.batch_idx, state.micro_step = int(loop["batch_idx"]), int(loop["micro_step"])
        state.skipped_steps = int(loop.get("skipped_steps", 0))
        self.stage, self.epoch_rng, self.resume_rng = loop["stage"], loop["epoch_rng"], rng
        self.resume_generators = loop.get("data_generators")

    # -- fit ------------------------------------------------------------------

    def fit(self, train_data: Iterable[Any], val_data: Iterable[Any] | None) -> None:
        """Run epochs until a limit or a stop; see the order in :mod:`dltrain.hookspecs`."""
        state, trainer = self.state, self.trainer
        resuming = self.stage if self.resume_rng is not None else None
        if resuming == STAGE_DONE:
            state.epoch += 1
            state.batch_idx = 0
        if resuming != STAGE_TRAIN and self.resume_rng is not None:
            set_rng_state(self.resume_rng)  # mid-epoch, the data replay restores it instead
            self.resume_rng = None
            # Between epochs the loader's own generator continues from where it was saved.
            saved = self.resume_generators or []
            for gen, gen_state in zip(_data_generators(train_data), saved, strict=False):
                gen.set_state(gen_state)
        self.resume_generators = None
        while not self._should_stop():
            validate_now = val_data is not None and self._validates(state.epoch)
            if resuming != STAGE_VALIDATE:
                completed = self.train_epoch(train_data, resuming=resuming == STAGE_TRAIN)
                if not completed:
                    # Stopped inside the epoch (max_steps, a stop request): the epoch stays in
                    # progress, so a resume continues it; no validation, no epoch scheduler step.
                    self._record_epoch()
                    self.hooks.call(
                        "on_train_epoch_end", trainer=trainer, state=state, metrics=dict(state.metrics)
                    )
                    break
                if validate_now:
                    self.stage = STAGE_VALIDATE
                else:
                    self._step_scheduler_epoch()
                    self.stage = STAGE_DONE
                    self._record_epoch()
                self.hooks.call(
                    "on_train_epoch_end", trainer=trainer, state=state, metrics=dict(state.metrics)
                )
            resuming = None
            if validate_now and val_data is not None:
                metrics = self.eval_epoch(Phase.VALIDATE, val_data)
                self._step_scheduler_epoch()
                self.stage = STAGE_DONE
                self._record_epoch()
                self.hooks.call("on_eval_epoch_end", trainer=trainer, state=state, metrics=metrics)
            if self._step_limit_reached() or state.stop_requested:
                break
            state.epoch += 1
            state.batch_idx = 0
            self.stage = STAGE_START
        if self.stage == STAGE_DONE:  # ended after a complete epoch: state.epoch counts it
            state.epoch += 1
            state.batch_idx = 0
            self.stage = STAGE_START
        if state.stop_reason is None:
            state.stop_reason = "max_steps reached" if self._step_limit_reached() else "max_epochs reached"

    def _record_epoch(self) -> None:
        """Add this epoch's row to the history, replacing a row kept from a stop inside it."""
        history, row = self.trainer.history, {"epoch": self.state.epoch + 1, **self.state.metrics}
        if history.epochs and history.epochs[-1]["epoch"] == row["epoch"]:
            history.epochs[-1] = row
        else:
            history.append(row)

    def _validates(self, epoch: int) -> bool:
        cfg = self.config
        last = cfg.max_epochs is not None and epoch + 1 >= cfg.max_epochs
        return (epoch + 1) % cfg.val_every_n_epochs == 0 or last

    def _step_limit_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def _should_stop(self) -> bool:
        cfg, state = self.config, self.state
        if cfg.max_epochs is not None and state.epoch >= cfg.max_epochs:
            return True
        return self._step_limit_reached() or state.stop_requested

    def _start_batches(self, data: Iterable[Any], resuming: bool) -> tuple[Iterator[Any], int]:
        """An iterator over this epoch's batches, replayed past those done when resuming."""
        state = self.state
        skip = 0
        generators = _data_generators(data)
        if resuming and self.epoch_rng is not None:
            set_rng_state(self.epoch_rng)  # the same RNG gives the same shuffle
            for gen, gen_state in zip(generators, self.epoch_rng.get("data_generators", []), strict=False):
                gen.set_state(gen_state)
            skip = state.batch_idx + 1
        else:
            self.epoch_rng = get_rng_state()
            self.epoch_rng["data_generators"] = [gen.get_state() for gen in generators]
        _set_epoch(data, state.epoch)
        batches: Iterator[Any] = iter(data)
        # Batches are fetched one at a time, never ahead: then the RNG saved after batch k is
        # exactly the RNG that fetches batch k+1, and a resume can replay to there.
        for _ in range(skip):
            next(batches, None)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        limit = self.config.limit_train_batches
        if limit is not None:
            batches = (b for _, b in zip(range(skip, limit), batches, strict=False))
        return batches, skip

    def train_epoch(self, data: Iterable[Any], *, resuming: bool) -> bool:
        """One training epoch (the rest of one, when resuming), then its metrics.

        Returns:
            True when the epoch ran to its end, False when a step limit or a
            stop request ended it early.
        """
        cfg, h, state, trainer = self.config, self.hooks, self.state, self.trainer
        model, optimizer = trainer.model, trainer.optimizer
        assert optimizer is not None
        state.phase = Phase.TRAIN
        if not resuming:
            state.metrics = {}
            state.micro_step = 0
            optimizer.zero_grad(set_to_none=True)
        model.train()
        batches, start = self._start_batches(data, resuming)
        state.batch_idx = start
        h.call("on_train_epoch_start", trainer=trainer, state=state)
        self.stage = STAGE_TRAIN
        accum = cfg.accumulate_grad_batches
        on_start, on_end = h.get("on_train_batch_start"), h.get("on_train_batch_end")
        on_before_bw, on_after_bw = h.get("on_before_backward"), h.get("on_after_backward")
        step_hook, transfer = h.get("training_step"), h.get("transfer_batch")
        self.on_before_optimizer_step = h.get("on_before_optimizer_step")
        on_log, window, log_every = h.get("on_step_metrics"), self.step_window, cfg.log_every_n_steps
        self.tracks_steps = on_log is not None
        self.step_scheduler = trainer.scheduler if cfg.scheduler_interval == "step" else None
        _require_step(step_hook, "training_step")
        scaler, nonfinite, max_steps = self.scaler, self.nonfinite, cfg.max_steps
        watched = None if nonfinite.skips else nonfinite.window
        length, limit = _length(data), cfg.limit_train_batches
        last_idx = (min(length, limit) if limit is not None else length) if length is not None else limit
        last_idx = None if last_idx is None else last_idx - 1
        seen, completed = 0, True
        for batch_idx, batch in enumerate(batches, start):
            seen += 1
            state.batch_idx = batch_idx
            batch, raw = self._run_batch(batch, transfer, on_start, step_hook, model)
            output = _as_step_output(raw, batch)
            loss = output.loss
            assert loss is not None
            state.micro_step += 1
            scaled = loss / accum if accum > 1 else loss
            if on_before_bw is not None:
                on_before_bw(trainer=trainer, state=state, loss=scaled)
            if scaler is None:
                scaled.backward()  # type: ignore[no-untyped-call]
            else:
                scaler.scale(scaled).backward()
            if on_after_bw is not None:
                on_after_bw(trainer=trainer, state=state)
            # Backward consumed the graph: from here on the loss is passed on detached, once.
            loss = output.loss = loss.detach()
            if watched is not None:  # "raise" or "stop": read with the window, every few steps
                if not watched:
                    nonfinite.start(state)
                watched.append(loss)
            elif not nonfinite.loss_finite(loss):  # "skip" decides now
                self.skip_step = True
                output.loss = None  # a skipped batch is left out of the epoch's loss
            if state.micro_step == accum or batch_idx == last_idx:
                self._optimizer_step(optimizer, state.micro_step)
            if on_end is not None:
                on_end(trainer=trainer, state=state, batch=batch, output=output)
            if on_log is not None:  # nobody logs: the interval is not tracked at all
                if watched is None and output.loss is not None:  # else summed from the guard's window
                    window.add(loss)
                if state.micro_step == 0 and state.global_step % log_every == 0:
                    on_log(trainer=trainer, state=state, metrics=self._step_metrics(optimizer))
            if state.micro_step == 0 and (
                (max_steps is not None and state.global_step >= max_steps) or state.stop_requested
            ):
                completed = batch_idx == last_idx
                break
        if state.micro_step and completed:  # a last, partial group of data of unknown length
            self._optimizer_step(optimizer, state.micro_step)
        if seen == 0 and not resuming:
            raise DataError("train_data produced no batches this epoch; check that the dataset is not empty")
        self._check_nonfinite()
        state.metrics.update(self.compute_metrics())
        if self.nonfinite.skips:  # shown with the epoch's metrics, so skips are seen
            state.metrics["train_skipped_steps"] = float(state.skipped_steps)
        return completed and not state.stop_requested

    def _run_batch(self, batch: Any, transfer: Any, on_start: Any, step: Any, model: Any) -> tuple[Any, Any]:
        """Move a batch to the device, call its batch-start hook, run its step (under autocast
        when mixed precision is on); the same for training and evaluation batches."""
        trainer, state = self.trainer, self.state
        if transfer is not None:
            batch = transfer(trainer=trainer, state=state, batch=batch, device=state.device)
        if on_start is not None:
            on_start(trainer=trainer, state=state, batch=batch)
        if self.autocast is None:
            return batch, step(trainer=trainer, state=state, model=model, batch=batch)
        with self.autocast():
            return batch, step(trainer=trainer, state=state, model=model, batch=batch)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, micro_steps: int) -> None:
        """Step the optimizer on the gradients of ``micro_steps`` micro-batches, then zero them."""
        state, scaler = self.state, self.scaler
        if self.plain_update and micro_steps == self.accum:
            skip = False  # the usual update: a full group, no scaler, clipping or skip policy
        else:
            skip = self._prepare_grads(optimizer, micro_steps)
        if skip:
            state.skipped_steps += 1
        else:
            if self.on_before_optimizer_step is not None:
                self.on_before_optimizer_step(trainer=self.trainer, state=state, optimizer=optimizer)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.micro_step = 0
        state.global_step += 1
        if self.step_scheduler is not None and not skip:
            self.step_scheduler.step()
        if state.global_step % self.log_every == 0:
            self._check_nonfinite()

    def _prepare_grads(self, optimizer: torch.optim.Optimizer, micro_steps: int) -> bool:
        """Unscale, undo the 1/accum scaling of a partial group, clip; whether to skip the step."""
        cfg, scaler, accum = self.config, self.scaler, self.accum
        partial = micro_steps != accum
        skip_policy = self.nonfinite.skips
        params = (
            [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if partial or skip_policy or cfg.gradient_clip_val is not None
            else []
        )
        if scaler is not None:  # clip and rescale true gradients, not scaled ones
            scaler.unscale_(optimizer)
        if partial and params:  # a last, partial group: undo the 1/accum scaling
            torch._foreach_mul_([p.grad for p in params], accum / micro_steps)
        if cfg.gradient_clip_val is not None and params:
            if cfg.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, cfg.gradient_clip_val)
        skip, self.skip_step = self.skip_step, False
        if scaler is None and skip_policy:
            # A finite loss can have NaN gradients. Checked even after a local NaN loss: with
            # sharded (FSDP) gradients the check is a collective every process must join.
            skip = not self.nonfinite.grads_finite(params) or skip
        return skip

    def _check_nonfinite(self) -> None:
        """Apply the non-finite policy to the losses since the last check (one sync); when a
        plugin logs step metrics, their sum joins the interval's, so each loss is kept once."""
        trainer = self.trainer
        losses = self.nonfinite.check(self.state, unwrap_model(trainer.model), trainer.request_stop)
        if losses is not None and self.tracks_steps:
            self.step_window.add_total(losses.sum(dtype=torch.float64), losses.numel())

    def _step_metrics(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The metrics of ``on_step_metrics``: the interval's mean loss (one host sync) and the lr."""
        metrics: dict[str, float] = {}
        mean = self.step_window.read()
        if mean is not None:
            metrics["train_loss"] = mean
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = float(lr)
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            metrics["lr"] = float(lr)
        return metrics

    def _step_scheduler_epoch(self) -> None:
        sched, state = self.trainer.scheduler, self.state
        if sched is None or self.config.scheduler_interval != "epoch":
            return
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            key = self.config.scheduler_monitor
            if key not in state.metrics:
                raise DltrainError(
                    f"ReduceLROnPlateau monitors {key!r}, but this epoch's metrics are {sorted(state.metrics)}; "
                    f"set scheduler_monitor to one of them (or pass val_data for 'val_loss')"
                )
            sched.step(state.metrics[key])
        else:
            sched.step()

    # -- evaluation -----------------------------------------------------------

    def eval_epoch(
        self, phase: Phase, data: Iterable[Any], collect: list[Any] | None = None
    ) -> dict[str, float]:
        """One pass over ``data`` in eval mode under ``inference_mode``; returns its metrics."""
        h, state, trainer = self.hooks, self.state, self.trainer
        model, limit = trainer.model, self.config.limit_val_batches
        previous_phase, previous_batch = state.phase, state.batch_idx
        state.phase = phase
        was_training = model.training
        model.eval()
        state.batch_idx = 0
        h.call("on_eval_epoch_start", trainer=trainer, state=state)
        transfer, step = h.get("transfer_batch"), h.get("eval_step")
        _require_step(step, "eval_step")
        on_start, on_end = h.get("on_eval_batch_start"), h.get("on_eval_batch_end")
        with torch.inference_mode():
            for batch_idx, batch in enumerate(data):
                if limit is not None and batch_idx >= limit:
                    break
                state.batch_idx = batch_idx
                batch, output = self._run_batch(batch, transfer, on_start, step, model)
                if not isinstance(output, StepOutput):
                    raise StepError(
                        f"eval_step returned {type(output).__name__}; it must return a StepOutput"
                    )
                if collect is not None:
                    collect.append(output.outputs)
                if on_end is not None:
                    on_end(trainer=trainer, state=state, batch=batch, output=output)
        metrics = self.compute_metrics() if phase is not Phase.PREDICT else {}
        state.metrics.update(metrics)
        model.train(was_training)
        if previous_phase is Phase.TRAIN:
            state.batch_idx = previous_batch
        return metrics

    def compute_metrics(self) -> dict[str, float]:
        """Merge every plugin's ``compute_metrics``, prefixed by phase, as floats (one sync)."""
        state = self.state
        prefix = state.phase.metric_prefix
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        manager = self.trainer.plugin_manager
        for plugin, result in manager.call_each("compute_metrics", trainer=self.trainer, state=state):
            for key, value in (result or {}).items():
                name = f"{prefix}_{key}"
                if name in merged:
                    raise PluginError(
                        f"metric {name!r} is reported by two plugins, {owner[name]!r} and {plugin!r}; "
                        f"rename one of them or disable one plugin"
                    )
                merged[name], owner[name] = value, plugin
        tensors = {k: v for k, v in merged.items() if isinstance(v, torch.Tensor)}
        if tensors:  # one device sync for all of them
            values = torch.stack([t.detach().reshape(()).to(torch.float64).cpu() for t in tensors.values()])
            merged.update(zip(tensors, values.tolist(), strict=True))
        return {k: float(v) for k, v in merged.items()}


def _require_step(caller: Any, hook: str) -> None:
    """Raise a clear error when no plugin implements the step hook ``hook``."""
    if caller is None:
        raise PluginError(
            f"no plugin implements {hook}, so there is nothing to run on a batch: the built-in 'step' "
            f"plugin is disabled (disable_plugins). Keep it, or register a plugin with a {hook} hook"
        )


def _as_step_output(output: Any, batch: Any) -> StepOutput:
    """Check what ``training_step`` returned and wrap a bare loss tensor."""
    result: StepOutput
    if isinstance(output, StepOutput) and output.loss is not None:
        result = output
    elif isinstance(output, torch.Tensor):
        result = StepOutput(output, None, None, batch_size_of(batch))
    else:
        raise StepError(
            f"training_step returned {type(output).__name__}; it must return a StepOutput with a loss "
            f"or a scalar loss tensor"
        )
    loss = result.loss
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise StepError(
            f"the loss must be a scalar tensor, got shape {shape}; reduce it "
            f"(loss_fn(..., reduction='mean') or .mean())"
        )
    if not loss.requires_grad:
        raise StepError(
            "the loss does not require grad, so backward cannot run: is the model's output detached, "
            "or were all its parameters frozen?"
        )
    return result
