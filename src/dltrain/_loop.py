"""The driver of a run: epochs and batches, in the order of :mod:`dltrain.hookspecs`.

The :class:`Driver` iterates, fires the hooks and keeps the run's position in
:class:`~dltrain.State` (epoch, step, batch, stage: what a checkpoint saves);
the :class:`~dltrain._step_runner.StepRunner` it owns turns each training
batch into an update. A Driver is made by the Trainer for each run, after the
device is chosen and the model prepared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from dltrain._epoch_data import EpochData
from dltrain._nonfinite import RollbackNeeded
from dltrain._precision import Precision
from dltrain._rollback import roll_back
from dltrain._running import RunningMean
from dltrain._step_runner import StepRunner
from dltrain.default_plugins.step import batch_size_of
from dltrain.errors import DataError, DltrainError, PluginError, StepError
from dltrain.state import Phase, Stage, State, StepOutput

if TYPE_CHECKING:
    from dltrain._optimizers import OptimizerSet
    from dltrain.trainer import Trainer

__all__ = ["Driver", "unwrap_model"]


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


class Driver:
    """One run's loop. The Trainer calls :meth:`fit` or :meth:`eval_epoch`.

    Args:
        trainer: The Trainer whose hooks it calls.
        state: The run's state, which the driver advances.
        optimizers: The fit's optimizers (None for validate, test, predict).
    """

    def __init__(self, trainer: Trainer, state: State, optimizers: OptimizerSet | None = None) -> None:
        self.trainer, self.state, self.config = trainer, state, trainer.config
        self.hooks = trainer._hooks
        self.optimizers = optimizers
        precision = Precision(self.config.precision, state.device)
        self.autocast = precision.autocast
        self.runner = StepRunner(trainer, state, optimizers, precision) if optimizers is not None else None
        self.data = EpochData(self.config.limit_train_batches)
        self.resumed = False
        self.step_losses: dict[str, RunningMean] = {}  # the losses since the last on_step_metrics
        self.skip_batches: set[tuple[int, int]] = set()  # (epoch, batch_idx) a rollback skips
        self.last_restored_step = -1  # the global step of the checkpoint the last rollback restored
        self._train_callers: tuple[Any, Any, Any] = (None, None, None)  # set at each epoch's start

    # -- resume ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run's position (counters, stage, metrics), what replays its data order, and the
        batches a rollback skips."""
        skip = [list(b) for b in sorted(self.skip_batches)]
        return {
            **self.state.position(),
            **self.data.state_dict(self.trainer._train_data),
            "skip_batches": skip,
        }

    def load_state_dict(self, saved: dict[str, Any], rng: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (``rng`` is the random state at the save)."""
        state = self.state
        state.epoch, state.global_step = int(saved["epoch"]), int(saved["global_step"])
        state.batch_idx, state.micro_step = int(saved["batch_idx"]), int(saved["micro_step"])
        state.skipped_steps = int(saved.get("skipped_steps", 0))
        state.stage = Stage(saved["stage"])
        state.metrics = {str(k): float(v) for k, v in (saved.get("metrics") or {}).items()}
        self.skip_batches |= {(int(e), int(b)) for e, b in saved.get("skip_batches") or ()}
        self.data.load_state_dict(saved, rng)
        self.resumed = True

    # -- fit ------------------------------------------------------------------------

    def fit(self, train_data: Iterable[Any], val_data: Iterable[Any] | None) -> None:
        """Run epochs until a limit or an agreed stop; the order is in :mod:`dltrain.hookspecs`.

        Under ``on_nonfinite="rollback"`` a non-finite value restores the newest
        checkpoint (see :mod:`dltrain._rollback`) and the epochs go on from there.
        """
        while True:
            try:
                return self._fit(train_data, val_data)
            except RollbackNeeded as needed:
                roll_back(self, needed.problem)

    def after_rollback(self) -> None:
        """A rollback restored the run's state (``load_state_dict``): start over from its position."""
        if self.runner is not None:
            self.runner.reset()
        self.step_losses.clear()

    def _fit(self, train_data: Iterable[Any], val_data: Iterable[Any] | None) -> None:
        state = self.state
        resuming, self.resumed = (state.stage if self.resumed else None), False
        if resuming is Stage.DONE:
            self._next_epoch()
        if resuming is not None and resuming is not Stage.TRAIN:
            self.data.resume_between_epochs(train_data)
        self._agree_on_stop(blocking=True)  # a stop requested in on_fit_start
        while not self._fit_over():
            if state.stage is not Stage.VALIDATE:
                ran_to_end = self.train_epoch(train_data, resuming=resuming is Stage.TRAIN)
                stop = self._agree_on_stop(blocking=True)  # e.g. requested in on_train_epoch_end
                if not ran_to_end:  # cut short by a stop or max_steps: the epoch stays in progress
                    self._end_epoch()
                    break
                state.stage = Stage.VALIDATE
                if stop and self._validates(val_data):  # its validation waits for a resumed run
                    self._end_epoch()
                    break
            resuming = None
            if self._validates(val_data):
                assert val_data is not None
                self.eval_epoch(Phase.VALIDATE, val_data)
            self._step_epoch_schedulers()
            state.stage = Stage.DONE
            self._end_epoch()
            if self._agree_on_stop(blocking=True) or self._step_limit_reached():
                break
            self._next_epoch()
        if state.stage is Stage.DONE:  # ended after a complete epoch: state.epoch counts it
            self._next_epoch()
        if state.stop_reason is None:
            state.stop_reason = "max_steps reached" if self._step_limit_reached() else "max_epochs reached"

    def _next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_idx = 0
        self.state.stage = Stage.START

    def _end_epoch(self) -> None:
        """Add the epoch's row to the history (replacing a row kept from a stop inside it); on_epoch_end."""
        state, history = self.state, self.trainer.history
        row = {"epoch": state.epoch + 1, **state.metrics}
        if history.epochs and history.epochs[-1]["epoch"] == row["epoch"]:
            history.epochs[-1] = row
        else:
            history.append(row)
        self.hooks.call("on_epoch_end", trainer=self.trainer, state=state, metrics=dict(state.metrics))

    def _validates(self, val_data: Iterable[Any] | None) -> bool:
        """Whether this epoch validates: with val_data, after every ``val_every_n_epochs`` epochs and
        after the last one."""
        if val_data is None:
            return False
        epoch, cfg = self.state.epoch, self.config
        last = cfg.max_epochs is not None and epoch + 1 >= cfg.max_epochs
        return (epoch + 1) % cfg.val_every_n_epochs == 0 or last

    def _step_limit_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def _fit_over(self) -> bool:
        cfg, state = self.config, self.state
        if cfg.max_epochs is not None and state.epoch >= cfg.max_epochs:
            return True
        return self._step_limit_reached() or state.stop_requested

    def _agree_on_stop(self, blocking: bool) -> bool:
        """Whether the fit stops here: agreed by every process (the ``agree_on_stop`` hook), else local."""
        agreed = self.hooks.call_first(
            "agree_on_stop", trainer=self.trainer, state=self.state, blocking=blocking
        )
        return self.state.stop_requested if agreed is None else bool(agreed)

    # -- training ---------------------------------------------------------------------

    def train_epoch(self, data: Iterable[Any], *, resuming: bool) -> bool:
        """One training epoch (the rest of one, when resuming), then its metrics.

        Returns:
            True when the epoch ran to the end of its data, False when a step
            limit or an agreed stop ended it early.
        """
        state, trainer, h, runner = self.state, self.trainer, self.hooks, self.runner
        assert runner is not None and self.optimizers is not None
        state.phase = Phase.TRAIN
        if not resuming:
            state.metrics, state.micro_step = {}, 0
            if not runner.manual:  # a manual step owns its gradients, also between epochs
                for optimizer in self.optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
        trainer.model.train()
        first = state.batch_idx + 1 if resuming else 0
        batches = self.data.begin(data, state.epoch, state.batch_idx if resuming else None)
        state.batch_idx = first
        h.call("on_train_epoch_start", trainer=trainer, state=state)
        state.stage = Stage.TRAIN
        runner.start_epoch()
        self._train_callers = self._batch_callers("training_step", "on_train_batch_start")
        last_idx = self.data.last_index(data)
        on_end, on_log = h.get("on_train_batch_end"), h.get("on_step_metrics")
        log_every = self.config.log_every_n_steps
        agree = h.get("agree_on_stop")  # None in one process: a local stop request stands
        seen, completed, skip = False, True, self.skip_batches
        for batch_idx, batch in enumerate(batches, first):
            seen = True
            if skip and (state.epoch, batch_idx) in skip:  # a rollback's culprit (an empty set costs nothing)
                continue
            batch, output = self._train_batch(batch_idx, batch, last_idx)
            if on_end is not None:
                on_end(trainer=trainer, state=state, batch=batch, output=output)
            if on_log is not None:  # nobody logs: the interval's losses are not even kept
                self._keep_step_losses(output)
            if state.micro_step:  # inside an accumulation group: no step, no stop
                continue
            if on_log is not None and state.global_step % log_every == 0:
                on_log(trainer=trainer, state=state, metrics=self._step_metrics())
            stop = None if agree is None else agree(trainer=trainer, state=state, blocking=False)
            if (state.stop_requested if stop is None else stop) or self._step_limit_reached():
                completed = batch_idx == last_idx
                break
        if not seen and not resuming:
            raise DataError("train_data produced no batches this epoch; check that the dataset is not empty")
        if state.micro_step and completed:  # a last, partial group of data of unknown length
            self._finish_partial_group()
        runner.check_nonfinite()
        self._epoch_metrics()
        h.call("on_train_epoch_end", trainer=trainer, state=state, metrics=dict(state.metrics))
        return completed

    def _train_batch(self, batch_idx: int, batch: Any, last_idx: int | None) -> tuple[Any, StepOutput]:
        """One training batch: transfer, its start hook, the step (and the update, unless manual).
        Returns the batch on the device and the step's output."""
        state, runner = self.state, self.runner
        assert runner is not None
        state.batch_idx = batch_idx
        # A micro-batch steps when it completes its group, or is the epoch's last.
        runner.start_batch(state.micro_step + 1 == runner.accum or batch_idx == last_idx)
        try:
            batch, raw = self._run_batch(batch, self._train_callers)
            output = _as_step_output(raw, batch, manual=runner.manual)
            if not runner.manual:
                runner.automatic(output)
            runner.end_batch()  # leaves the step as close() would
        except BaseException:
            runner.close()
            raise
        return batch, output

    def _finish_partial_group(self) -> None:
        """Step on the gradients of the last micro-batches of data whose length was unknown."""
        runner = self.runner
        assert runner is not None
        runner.start_batch(True)
        self.state.micro_step -= 1  # start_batch counted a micro-batch that is not there
        try:
            for name in runner.names:
                runner.optimizer_step(name)
            runner.end_batch()
        finally:
            runner.close()

    def _keep_step_losses(self, output: StepOutput) -> None:
        """Add the batch's losses to the interval's sums, on the device (no sync)."""
        windows = self.step_losses
        if output.loss is not None:
            window = windows.get("train_loss")
            if window is None:
                window = windows["train_loss"] = RunningMean()
            window.add_total(output.loss, 1)
        if output.losses:
            for name, value in output.losses.items():
                windows.setdefault(f"train_{name}", RunningMean()).add(value)

    def _step_metrics(self) -> dict[str, float]:
        """The metrics of ``on_step_metrics``: each loss's mean over the interval, the learning rate
        of the first parameter group of every optimizer, and every plugin's ``compute_step_metrics``
        (one host sync for each loss, one for all plugin tensors)."""
        metrics: dict[str, Any] = {}
        for name, window in self.step_losses.items():
            mean = window.read()
            if mean is not None:
                metrics[name] = mean
        for name, optimizer in (self.optimizers or {}).items():
            lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
            if isinstance(lr, torch.Tensor) and lr.numel() == 1:
                lr = float(lr)
            if isinstance(lr, (int, float)) and not isinstance(lr, bool):
                metrics["lr" if len(self.optimizers or ()) == 1 else f"lr_{name}"] = float(lr)
        return self._merge("compute_step_metrics", metrics, prefix=None)

    def _step_epoch_schedulers(self) -> None:
        """Step every per-epoch scheduler; ReduceLROnPlateau gets its monitored metric."""
        state = self.state
        for spec in (self.optimizers.schedules if self.optimizers is not None else {}).values():
            if spec.interval != "epoch":
                continue
            if not spec.plateau:
                spec.scheduler.step()
            elif spec.monitor in state.metrics:
                spec.scheduler.step(state.metrics[spec.monitor])
            else:
                raise DltrainError(
                    f"ReduceLROnPlateau monitors {spec.monitor!r}, but this epoch's metrics are "
                    f"{sorted(state.metrics)}; set scheduler_monitor (or the scheduler's 'monitor') to one "
                    f"of them (or pass val_data for 'val_loss')"
                )

    # -- evaluation -------------------------------------------------------------------

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
        on_end = h.get("on_eval_batch_end")
        callers = self._batch_callers("eval_step", "on_eval_batch_start")
        with torch.inference_mode():
            for batch_idx, batch in enumerate(data):
                if limit is not None and batch_idx >= limit:
                    break
                state.batch_idx = batch_idx
                batch, output = self._run_batch(batch, callers)
                if not isinstance(output, StepOutput):
                    raise StepError(
                        f"eval_step returned {type(output).__name__}; it must return a StepOutput"
                    )
                if collect is not None:
                    collect.append(output.outputs)
                if on_end is not None:
                    on_end(trainer=trainer, state=state, batch=batch, output=output)
        metrics = self._epoch_metrics() if phase is not Phase.PREDICT else {}
        model.train(was_training)
        if previous_phase is Phase.TRAIN:
            state.batch_idx = previous_batch
        h.call("on_eval_epoch_end", trainer=trainer, state=state, metrics=metrics)
        return metrics

    def _batch_callers(self, step_hook: str, start_hook: str) -> tuple[Any, Any, Any]:
        """The callers of a batch's hooks (transfer, batch start, step), fetched once per epoch."""
        h = self.hooks
        transfer, on_start, step = h.get("transfer_batch"), h.get(start_hook), h.get(step_hook)
        if step is None:
            raise PluginError(
                f"no plugin implements {step_hook}, so there is nothing to run on a batch: the built-in "
                f"'step' plugin is disabled (disable_plugins). Keep it, or register a plugin with a "
                f"{step_hook} hook"
            )
        return transfer, on_start, step

    def _run_batch(self, batch: Any, callers: tuple[Any, Any, Any]) -> tuple[Any, Any]:
        """Move a batch to the device, call its batch-start hook, run its step (under autocast
        when mixed precision is on); the same for training and evaluation batches."""
        trainer, state = self.trainer, self.state
        transfer, on_start, step = callers
        if transfer is not None:
            batch = transfer(trainer=trainer, state=state, batch=batch, device=state.device)
        if on_start is not None:
            on_start(trainer=trainer, state=state, batch=batch)
        autocast = self.autocast
        if autocast is None:
            return batch, step(trainer=trainer, state=state, model=trainer.model, batch=batch)
        with autocast():
            return batch, step(trainer=trainer, state=state, model=trainer.model, batch=batch)

    def _epoch_metrics(self) -> dict[str, float]:
        """Merge every plugin's ``compute_metrics``, prefixed by phase, as floats (one sync); into state.metrics."""
        state = self.state
        prefix = state.phase.metric_prefix
        metrics = self._merge("compute_metrics", {}, prefix=prefix)
        for name, (epoch_metric, phases) in self.trainer._epoch_metrics.items():  # from the exact values
            if state.phase in phases:
                metrics[f"{prefix}_{name}"] = epoch_metric.compute(name, prefix, metrics)
        if state.phase is Phase.TRAIN and self.runner is not None and self.runner.guard.skips:
            metrics["train_skipped_steps"] = float(state.skipped_steps)  # shown, so skips are seen
        state.metrics.update(metrics)
        return metrics

    def _merge(self, hook: str, merged: dict[str, Any], prefix: str | None) -> dict[str, float]:
        """Every plugin's result of ``hook`` (a mapping of names to values), each name prefixed with
        ``prefix``, merged into ``merged``: a name reported twice is an error naming both reporters;
        tensors are read with one device sync for all."""
        owner: dict[str, str] = dict.fromkeys(merged, "the Trainer")
        for plugin, result in self.trainer.plugin_manager.call_each(
            hook, trainer=self.trainer, state=self.state
        ):
            for key, value in (result or {}).items():
                name = f"{prefix}_{key}" if prefix else str(key)
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


def _as_step_output(output: Any, batch: Any, *, manual: bool) -> StepOutput:
    """Check what ``training_step`` returned; wrap a bare loss tensor or a dict of named losses."""
    # The usual cases first (the default step's StepOutput with one loss, or a bare scalar loss):
    # the checks below, fewer steps.
    if not manual:
        if type(output) is StepOutput and output.losses is None:
            loss = output.loss
            if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.numel() == 1:
                return output
        elif isinstance(output, torch.Tensor) and output.requires_grad and output.numel() == 1:
            return StepOutput(output, None, None, batch_size_of(batch))
    if isinstance(output, StepOutput):
        result = output
    elif isinstance(output, torch.Tensor):
        result = StepOutput(output, None, None, batch_size_of(batch))
    elif (
        manual
        and isinstance(output, dict)
        and output
        and all(isinstance(v, torch.Tensor) for v in output.values())
    ):
        result = StepOutput(None, None, None, batch_size_of(batch), losses=dict(output))
    else:
        shapes = (
            "a StepOutput, a scalar loss tensor or a dict of named scalar losses"
            if manual
            else ("a StepOutput with a loss or a scalar loss tensor")
        )
        raise StepError(f"training_step returned {type(output).__name__}; it must return {shapes}")
    for name, value in [("loss", result.loss), *(result.losses or {}).items()]:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise StepError(
                f"the {'loss' if name == 'loss' else f'loss {name!r}'} must be a scalar tensor, got shape "
                f"{shape}; reduce it (loss_fn(..., reduction='mean') or .mean())"
            )
    if manual:  # the step did backward itself: its losses are only reported
        result.loss = None if result.loss is None else result.loss.detach()
        if result.losses:
            result.losses = {k: v.detach() for k, v in result.losses.items()}
        return result
    if result.loss is None:
        raise StepError(
            "training_step returned no loss; with automatic optimization it must return the loss to "
            "back-propagate (set manual_optimization=True for a step that does its own backward)"
        )
    if not result.loss.requires_grad:
        raise StepError(
            "the loss does not require grad, so backward cannot run: is the model's output detached, "
            "or were all its parameters frozen? (A step that calls backward itself needs "
            "manual_optimization=True.)"
        )
    return result
