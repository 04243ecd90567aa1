"""The hook specifications: the contract between the Trainer and every plugin.

This module *is* the hook reference. Each hook says when it is called, with
what, and what its return value means. Hooks are called with keyword
arguments; an implementation may accept any subset of a hook's arguments, in
any order, and must not give them defaults (pluggy never passes those).

The order in which :meth:`dltrain.Trainer.fit` calls them (pinned by a golden
test, and drawn on the docs site)::

    select_device                       # first result wins
    on_setup                            # move / wrap the model
    prepare_data                        # first result wins; once per data argument
    restore_model_state                 # first result wins; only when resuming
    load_state_dict                     # each plugin, only when resuming
    on_fit_start
    agree_on_stop                       # blocking; and wherever the loop checks for a stop
    for each epoch:
        on_train_epoch_start
        for each batch:
            transfer_batch              # first result wins
            on_train_batch_start
            training_step               # first result wins -> StepOutput
            on_before_backward
            # loss.backward()
            on_after_backward
            if this micro-batch completes an accumulation group, for each optimizer:
                # unscale, clip (and the "skip" policy's check)
                on_before_optimizer_step
                # optimizer.step(), zero_grad, its scheduler (per step)
            on_train_batch_end
            compute_step_metrics        # every log_every_n_steps optimizer steps, all merged
            on_step_metrics             #   ... with the interval's metrics
            agree_on_stop               # after each optimizer step, not blocking
        compute_metrics                 # all results merged -> train_* metrics
        on_train_epoch_end              # reads the epoch's training metrics
        agree_on_stop                   # blocking
        if validating this epoch:
            on_eval_epoch_start
            for each batch: transfer_batch, on_eval_batch_start, eval_step, on_eval_batch_end
            compute_metrics             # -> val_* metrics
            on_eval_epoch_end
        # schedulers (per epoch), history row
        on_epoch_end                    # the epoch's whole row: train_* and val_* metrics
        agree_on_stop                   # blocking
    on_fit_end
    # on an exception anywhere above: on_exception
    on_teardown                         # always, last

With manual optimization (``manual_optimization=True``) the
``training_step`` itself calls :meth:`~dltrain.Trainer.backward` (the
backward hooks) and :meth:`~dltrain.Trainer.optimizer_step` (the optimizer
hooks), as many times as it needs, each naming its optimizer.

An epoch cut short (``max_steps``, :meth:`~dltrain.Trainer.request_stop`)
still gets ``compute_metrics``, ``on_train_epoch_end`` and ``on_epoch_end``,
but no validation and no per-epoch scheduler step. ``validate``, ``test`` and
``predict`` call ``select_device``, ``on_setup``, ``prepare_data``,
``on_<run>_start``, one evaluation epoch as above, ``on_<run>_end`` and
``on_teardown``.

Outside that order, :meth:`~dltrain.Trainer.state_dict` (every checkpoint
save) calls :func:`gather_model_state` and then each plugin's
:func:`state_dict`.

Producers return values in one phase and consumers read them in the next
(metrics are computed before ``on_*_epoch_end``, which checkpointing, early
stopping and loggers implement), so plugins rarely need ``tryfirst`` or
``trylast``. Within one hook, pluggy calls implementations last-registered
first: user plugins, then entry-point plugins, then built-ins, with
``tryfirst``/``trylast`` moving an implementation to the front or back.
Hook wrappers (``@hookimpl(wrapper=True)``) run around all others and may time,
guard or alter a call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dltrain._markers import hookspec

if TYPE_CHECKING:
    import torch

    from dltrain.config import TrainerConfig
    from dltrain.state import Phase, State, StepOutput
    from dltrain.trainer import Trainer


# ---------------------------------------------------------------------------
# Setup: once per run (fit, validate, test or predict)
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def select_device(trainer: Trainer, config: TrainerConfig) -> torch.device | None:
    """Choose the device the run uses. **First result wins.**

    Called once at the start of every run, before any other hook.

    Args:
        trainer: The Trainer.
        config: The validated configuration (``config.device`` is the request).

    Returns:
        A ``torch.device``, or None to let the next implementation decide.
        The built-in ``device`` plugin answers last, from ``config.device``.
    """


@hookspec
def on_setup(trainer: Trainer, state: State) -> None:
    """Prepare the model for the run: move it to ``state.device``, wrap it.

    Called once at the start of every run, after :func:`select_device` and
    before ``on_fit_start`` (or ``on_validate_start``, ...). An implementation
    may replace ``trainer.model`` (for example with a wrapped model); the
    built-in ``device`` plugin moves the model here with ``tryfirst``.

    Args:
        trainer: The Trainer; ``trainer.model`` is the model of this run.
        state: The run's state; ``state.device`` is the chosen device.
    """


@hookspec(firstresult=True)
def prepare_data(trainer: Trainer, state: State, data: Any, phase: Phase) -> Any:
    """Wrap or replace the batches of one phase before the run uses them. **First result wins.**

    Called once per run for each data argument (``train_data`` with phase
    TRAIN, ``val_data`` with VALIDATE, and the data of validate/test/predict),
    after :func:`on_setup`. The distributed plugin uses it to give each
    process its shard (a ``DistributedSampler``).

    Returns:
        The data to use instead, or None to keep it as it is.
    """


# ---------------------------------------------------------------------------
# Runs: start and end of each public entry point
# ---------------------------------------------------------------------------


@hookspec
def on_fit_start(trainer: Trainer, state: State) -> None:
    """Called when :meth:`~dltrain.Trainer.fit` starts, after :func:`on_setup`.

    On a resumed run, ``state`` already holds the restored counters.
    """


@hookspec
def on_fit_end(trainer: Trainer, state: State) -> None:
    """Called when fit finishes without an exception (all epochs done, or a stop).

    ``state.stop_reason`` says why it ended; ``trainer.history`` is complete.
    """


@hookspec
def on_validate_start(trainer: Trainer, state: State) -> None:
    """Called when a standalone :meth:`~dltrain.Trainer.validate` starts.

    Validation inside ``fit`` does not call it; it calls the eval epoch hooks.
    """


@hookspec
def on_validate_end(trainer: Trainer, state: State) -> None:
    """Called when a standalone :meth:`~dltrain.Trainer.validate` finishes."""


@hookspec
def on_test_start(trainer: Trainer, state: State) -> None:
    """Called when :meth:`~dltrain.Trainer.test` starts."""


@hookspec
def on_test_end(trainer: Trainer, state: State) -> None:
    """Called when :meth:`~dltrain.Trainer.test` finishes."""


@hookspec
def on_predict_start(trainer: Trainer, state: State) -> None:
    """Called when :meth:`~dltrain.Trainer.predict` starts."""


@hookspec
def on_predict_end(trainer: Trainer, state: State) -> None:
    """Called when :meth:`~dltrain.Trainer.predict` finishes."""


@hookspec
def on_exception(trainer: Trainer, state: State, exception: BaseException) -> None:
    """Called when a run is ending because of an exception (KeyboardInterrupt included).

    The exception is re-raised after all implementations ran. An
    implementation that raises itself does not stop the others; its error
    is attached to the original as a note.

    Args:
        exception: The exception that ends the run.
    """


@hookspec
def on_teardown(trainer: Trainer, state: State) -> None:
    """Called last in every run, whether it succeeded or raised. Close files here.

    Every implementation runs, even when an earlier one raised.
    """


@hookspec(firstresult=True)
def agree_on_stop(trainer: Trainer, state: State, blocking: bool) -> bool | None:
    """Decide, the same way in every process, whether the fit stops here. **First result wins.**

    Called where the loop checks for a stop: after ``on_fit_start``, after each
    optimizer step (``blocking=False``), after each epoch's training and after
    each epoch (``blocking=True``). Without an implementation (one process)
    the loop stops when ``state.stop_requested`` is set. The built-in
    ``distributed`` plugin implements it under torchrun, where one process
    may want to stop (a signal, early stopping, ``on_nonfinite="stop"``) and
    all must stop at the same step, or one would wait forever in a collective.

    Args:
        blocking: False after an optimizer step: the implementation must not
            wait for the other processes (no blocking collective per step); it
            may answer for the requests made up to an earlier step, as long as
            every process gets the same answer at the same step (it should
            then set ``state.stop_delay_steps`` to the most steps a request
            may wait). True: the answer covers every request made so far, in
            all processes.

    Returns:
        True: every process stops here (the implementation has called
        ``trainer.request_stop`` where no stop was requested yet, so
        ``state.stop_reason`` says why everywhere); False: none stops here, a
        local request waits for the next check; None: let the next
        implementation decide.
    """


@hookspec(firstresult=True)
def agree_on_max(trainer: Trainer, state: State, values: list[int]) -> list[int] | None:
    """The elementwise maximum of ``values`` over every process of the run. **First result wins.**

    A blocking collective, called by the loop in every process at the same
    point, for decisions all processes must take alike and that depend on
    what each saw: with ``on_nonfinite="rollback"``, at each non-finite check
    (every ``log_every_n_steps`` steps and at each epoch's end), whether any
    process found a non-finite value and which batch came first. The built-in
    ``distributed`` plugin answers under torchrun.

    Returns:
        The elementwise maxima, or None (one process: ``values`` stand).
    """


@hookspec
def on_rollback(trainer: Trainer, state: State, checkpoint: str, reason: str) -> None:
    """Called after ``on_nonfinite="rollback"`` restored a checkpoint, in every process.

    The run's state (model, optimizers, plugins' ``load_state_dict``, position,
    random state) is the checkpoint's again; training goes on from there,
    skipping the batch that caused the non-finite value. Loggers note it here.

    Args:
        checkpoint: The ``.ckpt`` file restored.
        reason: What was not finite, and where.
    """


# ---------------------------------------------------------------------------
# Epochs
# ---------------------------------------------------------------------------


@hookspec
def on_train_epoch_start(trainer: Trainer, state: State) -> None:
    """Called before the first batch of each training epoch (model in train mode).

    ``state.epoch`` is the number of epochs completed before this one.
    ``state.batch_idx`` is the first batch to run: 0, or more when a resumed
    run continues an epoch from a checkpoint.
    """


@hookspec
def on_train_epoch_end(trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
    """Called after the training part of each epoch, once its metrics are computed.

    Validation of this epoch has not run yet; :func:`on_epoch_end` comes
    when it has, with the whole row.

    Args:
        metrics: This epoch's training metrics (``train_loss``, ...) as floats,
            also in ``state.metrics``.
    """


@hookspec
def on_epoch_end(trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
    """Called once per epoch of a fit, when the epoch is finished: its training and, when it
    validated, its validation. The place to read an epoch's whole row.

    Called after the per-epoch schedulers stepped and the row was added to
    ``trainer.history``; also for an epoch cut short by a stop or
    ``max_steps`` (with its training metrics alone). Loggers, the progress
    line and checkpointing implement it, so none of them needs to work out
    whether validation will follow ``on_train_epoch_end``.

    Args:
        metrics: The epoch's row: ``train_*`` and ``val_*`` metrics as floats,
            what ``trainer.history.epochs[-1]`` holds (without ``"epoch"``).
    """


@hookspec
def on_eval_epoch_start(trainer: Trainer, state: State) -> None:
    """Called before the first batch of an evaluation (model in eval mode).

    ``state.phase`` is VALIDATE, TEST or PREDICT. Inside fit, this is each
    validation; standalone, the one evaluation of validate/test/predict.
    """


@hookspec
def on_eval_epoch_end(trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
    """Called after an evaluation, once its metrics are computed.

    Inside fit this is where checkpointing, early stopping and loggers see
    the validation metrics of the epoch.

    Args:
        metrics: This evaluation's metrics (``val_loss``, ``test_accuracy``, ...)
            as floats; empty for predict.
    """


# ---------------------------------------------------------------------------
# Batches (the hot path: keep implementations cheap and free of host syncs)
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def transfer_batch(trainer: Trainer, state: State, batch: Any, device: torch.device) -> Any:
    """Move one batch to ``device``. **First result wins.**

    Called for every batch of every phase, before its batch-start hook. The
    built-in ``device`` plugin answers last: it moves tensors inside nested
    tuples, lists, dicts, named tuples and dataclasses, and leaves other values alone.

    Returns:
        The batch on the device, or None to let the next implementation decide.
    """


@hookspec
def on_train_batch_start(trainer: Trainer, state: State, batch: Any) -> None:
    """Called for each training batch (already on the device), before its step."""


@hookspec(firstresult=True)
def training_step(trainer: Trainer, state: State, model: torch.nn.Module, batch: Any) -> Any:
    """Turn one training batch into a loss, or (manual optimization) into an update. **First result wins.**

    Called inside autocast (when mixed precision is on) with the model in
    train mode. The built-in ``step`` plugin answers last: for an
    ``(inputs, targets)`` tuple or list, or a dict of keyword arguments
    (see :func:`dltrain.default_plugins.step.unpack_batch`), it returns
    ``trainer.loss_fn(model(inputs), targets)``. Implement this hook to
    support any other batch shape or objective.

    With automatic optimization (the default), return the loss with its
    graph; the Trainer does backward and the optimizer steps: do not call
    ``backward`` here. With ``manual_optimization=True``, the step drives
    the update itself through :meth:`~dltrain.Trainer.backward` and
    :meth:`~dltrain.Trainer.optimizer_step`, and returns its losses (detached
    or not) for metrics and logging.

    Returns:
        A :class:`~dltrain.StepOutput`, a scalar loss tensor, a dict of named
        scalar losses (manual optimization: each becomes a metric,
        ``train_<name>``), or None to let the next implementation decide.
    """


@hookspec
def on_before_backward(
    trainer: Trainer, state: State, loss: torch.Tensor, optimizer_name: str | None
) -> None:
    """Called right before each ``backward``, with the loss about to be back-propagated.

    Once per micro-batch with automatic optimization; with manual optimization
    once per :meth:`~dltrain.Trainer.backward` call of the training step.

    Args:
        loss: The loss, already divided by ``accumulate_grad_batches``.
        optimizer_name: The optimizer the loss is for, as the manual step
            named it in ``trainer.backward(loss, optimizer_name=...)``; None
            with automatic optimization (the loss serves every optimizer) or
            when the step named none.
    """


@hookspec
def on_after_backward(trainer: Trainer, state: State, optimizer_name: str | None) -> None:
    """Called right after each ``backward``; gradients hold this loss's contribution.

    Args:
        optimizer_name: As for :func:`on_before_backward`.
    """


@hookspec
def on_before_optimizer_step(
    trainer: Trainer, state: State, optimizer: torch.optim.Optimizer, optimizer_name: str
) -> None:
    """Called before each optimizer step, after its gradients are unscaled and clipped.

    Not called for micro-batches that only accumulate gradients, nor for a
    step that ``on_nonfinite="skip"`` skips. With several optimizers, called
    once per optimizer (automatic optimization steps them in the order
    given to ``fit``). ``state.global_step`` is the number of steps taken
    before this one.

    Args:
        optimizer: The optimizer about to step.
        optimizer_name: Its name: the key it was given under in
            ``fit(optimizer={...})``, or ``"default"`` for a single optimizer.
    """


@hookspec
def on_train_batch_end(trainer: Trainer, state: State, batch: Any, output: StepOutput) -> None:
    """Called after each training batch (and its optimizer step, when it had one).

    Args:
        batch: The batch, on the device.
        output: The step's output; ``output.loss`` is the undivided loss,
            detached (backward has used its graph), or None for a batch that
            ``on_nonfinite="skip"`` left out. Accumulate it on the device:
            calling ``.item()`` here stalls CUDA every step.
    """


@hookspec
def compute_step_metrics(trainer: Trainer, state: State) -> Mapping[str, Any] | None:
    """Report metrics of the last ``log_every_n_steps`` optimizer steps. **All results are merged.**

    Called on each plugin separately every ``log_every_n_steps`` optimizer
    steps during fit, right before :func:`on_step_metrics`, and only when some
    plugin implements ``on_step_metrics`` (nobody logs: nobody is asked). The
    producer side of step metrics: a learning-rate monitor, a gradient-norm
    monitor. Keep values on the device between calls and return them here.

    Returns:
        A mapping of full metric names (``"lr_head"``, ``"grad_norm"``) to
        scalar tensors or numbers, or None. Tensors of all plugins are read
        with one device sync; the same name from two plugins is a
        :class:`~dltrain.PluginError` naming both.
    """


@hookspec
def on_step_metrics(trainer: Trainer, state: State, metrics: Mapping[str, float]) -> None:
    """Called every ``log_every_n_steps`` optimizer steps during fit, with that interval's metrics.

    Called after the ``on_train_batch_end`` of the batch that completed the
    step, in every process (log on rank 0: ``state.is_global_zero``). This is
    the hook for loggers: the Trainer sums the interval's losses on the device
    and reads them with one host sync per call, made once for all loggers, so
    a logger implementing this hook (and not ``on_train_batch_end``) costs
    nothing per step. When no plugin implements it, the Trainer does not
    track the interval at all.

    Args:
        metrics: ``train_loss``: the mean loss of the micro-batches since the
            previous call (batches skipped by ``on_nonfinite="skip"`` left out;
            absent when all were), and ``train_<name>`` for each named loss of
            a manual step; ``lr``: the first parameter group's learning rate
            (``lr_<name>`` for each of several optimizers; absent without a
            numeric one); and what :func:`compute_step_metrics` returned.
            Floats, in this process.
    """


@hookspec(firstresult=True)
def eval_step(trainer: Trainer, state: State, model: torch.nn.Module, batch: Any) -> Any:
    """Run the model on one evaluation batch. **First result wins.**

    Called under ``torch.inference_mode()`` with the model in eval mode, for
    validation, test and predict (``state.phase`` says which). The built-in
    ``step`` plugin answers last: it unpacks the batch like ``training_step``,
    and computes the loss when there are targets and ``trainer.loss_fn`` is set.
    In predict, a batch that is a bare tensor is the inputs.

    Returns:
        A :class:`~dltrain.StepOutput`, or None to let the next implementation decide.
    """


@hookspec
def on_eval_batch_start(trainer: Trainer, state: State, batch: Any) -> None:
    """Called for each evaluation batch (already on the device), before its step."""


@hookspec
def on_eval_batch_end(trainer: Trainer, state: State, batch: Any, output: StepOutput) -> None:
    """Called after each evaluation batch with its :class:`~dltrain.StepOutput`."""


# ---------------------------------------------------------------------------
# Values: metrics and checkpointable plugin state
# ---------------------------------------------------------------------------


@hookspec
def compute_metrics(trainer: Trainer, state: State) -> Mapping[str, Any] | None:
    """Report this epoch's metrics. **All results are merged.**

    Called once at the end of every training epoch and every evaluation,
    before ``on_train_epoch_end`` / ``on_eval_epoch_end``. ``state.phase``
    says which phase ended.

    Returns:
        A mapping of metric name (without phase prefix: ``"loss"``,
        ``"accuracy"``) to a scalar tensor or number, or None. The Trainer
        prefixes each name with the phase (``train_``, ``val_``, ``test_``)
        and converts all values to floats with one device sync. The same
        name from two plugins is a :class:`~dltrain.PluginError` naming both.
    """


@hookspec
def state_dict(trainer: Trainer) -> dict[str, Any] | None:
    """Return this plugin's state for a checkpoint, or None if it has none.

    Called on each plugin separately when a checkpoint is written; the
    result is stored under the plugin's name. It must hold only tensors and
    plain Python data (checkpoints are loaded with ``weights_only=True``).
    """


@hookspec
def load_state_dict(trainer: Trainer, state_dict: dict[str, Any]) -> None:
    """Restore this plugin's state from a checkpoint.

    Called on each plugin separately at resume, before ``on_fit_start``,
    with what its :func:`state_dict` returned; not called for plugins with
    nothing saved.
    """


@hookspec(firstresult=True)
def gather_model_state(trainer: Trainer, state: State) -> Mapping[str, Any] | None:
    """Return the full state of the model and the optimizer for a checkpoint. **First result wins.**

    Called by :meth:`~dltrain.Trainer.state_dict` (so at every checkpoint
    save), before the plugins' :func:`state_dict`, in every process of a
    distributed run: an implementation may use collectives. For a model whose
    parameters are split across processes, the built-in ``distributed``
    plugin answers (under ``strategy="fsdp"``): it gathers the full tensors
    into rank 0's CPU memory.

    Returns:
        None to let the next implementation decide; when none answers, the
        Trainer takes ``model.state_dict()``, each optimizer's
        ``state_dict()`` and, mid accumulation group, the gradients. Or a
        mapping with ``"model"`` (the plain model's state dict: its keys and
        full shapes), ``"optimizers"`` (optimizer name to the optimizer's state
        in the form of ``torch.optim.Optimizer.state_dict()``, keyed by
        parameter index) and, when ``state.micro_step`` is not 0 or with
        manual optimization, ``"grads"`` (parameter name to full gradient). Rank 0's result is the one written;
        others may be empty.
    """


@hookspec(firstresult=True)
def restore_model_state(trainer: Trainer, state: State, payload: Mapping[str, Any]) -> bool | None:
    """Load a checkpoint's model, optimizer and gradients into the current run. **First result wins.**

    Called by :meth:`~dltrain.Trainer.load_state_dict` (at resume, before
    :func:`load_state_dict` and ``on_fit_start``), in every process, each
    with the whole checkpoint. The built-in ``distributed`` plugin answers
    for a model sharded with FSDP: it gives each process its part.

    Args:
        payload: The checkpoint's payload, as :func:`gather_model_state` (or the
            Trainer's default) made it: ``payload["model"]``,
            ``payload["optimizers"]`` (name to state), and ``payload["grads"]``
            when it was saved mid accumulation group or by a manual step.

    Returns:
        True when this implementation restored the model, the optimizer and
        the gradients; None to let the next implementation (in the end the
        Trainer: ``load_state_dict`` on the model and optimizer) do it.
    """
