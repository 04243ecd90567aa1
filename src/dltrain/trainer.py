"""The Trainer: a thin loop that calls hooks.

Everything optional (devices, metrics, progress, logging, checkpoints) is a
plugin; the loop below only orders the work. The order of hooks is given
in :mod:`dltrain.hookspecs` and pinned by a test.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dltrain import _checks
from dltrain._compile import Compiler, check_backend
from dltrain._hooks import Hooks
from dltrain._loop import Driver, unwrap_model
from dltrain._markers import DISTRIBUTION
from dltrain._optimizers import (
    DEFAULT_NAME,
    OptimizerSet,
    check_resumable,
    compare_optimizers,
    structure_of_states,
)
from dltrain._plugin_manager import PluginManager
from dltrain._rng import get_rng_state, seed_everything
from dltrain.config import TrainerConfig
from dltrain.errors import CheckpointError, DltrainError, PluginError, StepError
from dltrain.metrics import EpochMetric, phases_of
from dltrain.state import History, Phase, RunKind, State

__all__ = ["Trainer"]


def _versions() -> dict[str, str]:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "unknown"
    return {"dltrain": version, "torch": str(torch.__version__)}


class Trainer:
    """Trains, evaluates and runs any ``torch.nn.Module`` on any iterable of batches.

    Args:
        config: A :class:`~dltrain.TrainerConfig`, or a mapping of its fields.
            Omit it to use the defaults.
        plugins: Plugin instances (or modules) to register after the
            built-ins and the installed entry-point plugins.
        metrics: Extra metrics by name: callables ``(outputs, targets) ->
            tensor`` (batch means) or torchmetrics-style objects, reported for
            every phase, or wrapped in :class:`dltrain.metrics.Metric` to choose
            the phases; and :class:`dltrain.metrics.EpochMetric` for a metric
            computed from the epoch's exact values (a ratio such as perplexity).
        **config_fields: Config fields, overriding those of ``config``.

    Raises:
        pydantic.ValidationError: a config value is invalid (nothing was done yet).
        PluginError: a plugin cannot be registered.

    Attributes:
        config: The validated :class:`~dltrain.TrainerConfig`.
        plugin_manager: This Trainer's plugins (see :meth:`get_plugin`, :meth:`explain_hooks`).
        history: Per-epoch metrics of the latest ``fit``.
        state: The :class:`~dltrain.State` of the latest or current run (None before any).
        model: During a run, the model it trains or evaluates, possibly wrapped: in
            DistributedDataParallel by ``on_setup``, then by ``torch.compile``
            (``compile``). After the run, the module that was passed in.
        optimizers: The optimizers of the latest ``fit`` by name (a mapping;
            ``"default"`` for a single optimizer; empty before any fit).
        loss_fn: The loss function of ``fit`` (or of ``validate``/``test``).

    Example:
        ```python
        trainer = Trainer(max_epochs=3, device="cpu")
        history = trainer.fit(model, loader, optimizer=opt, loss_fn=nn.CrossEntropyLoss())
        ```
    """

    def __init__(
        self,
        config: TrainerConfig | Mapping[str, Any] | None = None,
        *,
        plugins: Iterable[object] = (),
        metrics: Mapping[str, Any] | None = None,
        **config_fields: Any,
    ) -> None:
        if isinstance(config, TrainerConfig):
            if config_fields:
                config = TrainerConfig.model_validate({**config.model_dump(), **config_fields})
        else:
            if config is not None and not isinstance(config, Mapping):
                TrainerConfig.model_validate(config)  # a ValidationError that names the type given
            config = TrainerConfig.model_validate({**dict(config or {}), **config_fields})
        self.config: TrainerConfig = config
        user_plugins = list(plugins)
        batch_metrics = {k: v for k, v in (metrics or {}).items() if not isinstance(v, EpochMetric)}
        self._epoch_metrics = {
            name: (metric, phases_of(metric.phases, f"metric {name!r}"))
            for name, metric in (metrics or {}).items()
            if isinstance(metric, EpochMetric)
        }
        if batch_metrics:
            from dltrain.default_plugins.metrics import MetricsPlugin

            user_plugins.append(
                MetricsPlugin(
                    accuracy="never", metrics=batch_metrics, report_loss=False, name="custom_metrics"
                )
            )
        self.plugin_manager = PluginManager(config, user_plugins)
        self.history = History()
        self.state: State | None = None
        self.model: torch.nn.Module = torch.nn.Module()
        self.optimizers: OptimizerSet = OptimizerSet(None, None, self.model, interval="epoch", monitor="")
        self.loss_fn: Any = None
        self._hooks = Hooks(self.plugin_manager)
        self._loop: Driver | None = None  # the current run's driver
        self._train_data: Any = None
        self._compiler = Compiler()  # keeps the last run's compiled wrapper for the next run

    # ------------------------------------------------------------------ API

    def fit(
        self,
        model: torch.nn.Module,
        train_data: Iterable[Any],
        *,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None,
        loss_fn: Any = None,
        val_data: Iterable[Any] | None = None,
        scheduler: Any = None,
        resume: str | None = None,
        resume_strict: bool = True,
    ) -> History:
        """Train ``model`` on ``train_data``, validating on ``val_data`` if given.

        Args:
            model: Any ``nn.Module``.
            train_data: A DataLoader or any re-iterable of batches.
            optimizer: An optimizer over ``model``'s parameters; or several by
                name, ``{"generator": opt_g, "discriminator": opt_d}``, each over
                its own parameters (automatic optimization steps them all after
                each backward; a manual step steps each by name); or None with
                ``manual_optimization=True`` for a step that updates the weights
                itself.
            loss_fn: ``loss_fn(outputs, targets) -> scalar``; needed by the
                default training step (a plugin's ``training_step`` may not need it).
            val_data: Batches to validate on every ``val_every_n_epochs``.
            scheduler: An LR scheduler of the optimizer, stepped every epoch or
                every optimizer step (``scheduler_interval``; ReduceLROnPlateau
                gets ``scheduler_monitor``); with several optimizers, a dict of
                optimizer names to schedulers. Any scheduler may be given as
                ``{"scheduler": s, "interval": "step", "monitor": "val_loss"}``
                to choose its own interval and monitored metric.
            resume: ``"last"``, ``"best"`` or a checkpoint path to continue from;
                ``"auto"``: the newest intact checkpoint in ``checkpoint.dir`` when
                there is one, else a fresh start, saying which on standard error
                (rank 0), so a requeued job runs the same command every time.
            resume_strict: When False, config differences that change what the
                run computes are a warning instead of an error.

        Returns:
            The :class:`~dltrain.History` of per-epoch metrics (also ``trainer.history``).
        """
        config = self.config
        model = _checks.check_model(model)
        if optimizer is None and not config.manual_optimization:
            raise StepError(
                "fit needs an optimizer (e.g. optimizer=torch.optim.SGD(model.parameters(), lr=0.01)); "
                "optimizer=None is only for manual_optimization=True, where the step updates the weights"
            )
        optimizers = OptimizerSet(
            optimizer, scheduler, model, interval=config.scheduler_interval, monitor=config.scheduler_monitor
        )
        _checks.check_data(train_data, "train_data")
        if val_data is not None:
            _checks.check_data(val_data, "val_data")
        own_step = self.plugin_manager.implementers("training_step") != ["step"]
        if config.manual_optimization and not own_step:
            raise PluginError(
                "manual_optimization=True needs a training_step of yours that calls trainer.backward(loss) "
                "and trainer.optimizer_step(name): register a plugin implementing training_step (the "
                "built-in step plugin only computes a loss)"
            )
        if loss_fn is None and not own_step:
            raise StepError(
                "fit needs loss_fn (e.g. loss_fn=torch.nn.CrossEntropyLoss()) for the default training "
                "step, or a plugin implementing training_step that computes the loss"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise StepError(
                f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}"
            )
        self.model, self.optimizers, self.loss_fn = model, optimizers, loss_fn
        self._train_data = train_data
        self.history = History()
        state = self.state = State(run=RunKind.FIT)
        with self._run(state, optimizers):
            train_data = self._prepare(state, train_data, Phase.TRAIN)
            self._train_data = train_data
            if val_data is not None:
                val_data = self._prepare(state, val_data, Phase.VALIDATE)
            if resume is not None:
                self._resume(resume, strict=resume_strict)
            self._hooks.call("on_fit_start", trainer=self, state=state)
            self._require_loop().fit(train_data, val_data)
            if state.skipped_steps:
                warnings.warn(
                    f"on_nonfinite='skip' skipped {state.skipped_steps} of {state.global_step} optimizer steps "
                    f"because a loss or gradient was NaN or infinite (history['train_skipped_steps'] has the "
                    f"running count at each epoch's end); if this recurs, lower the learning rate or check "
                    f"the data",
                    stacklevel=2,
                )
            self._hooks.call("on_fit_end", trainer=self, state=state)
        return self.history

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the latest fit when it had one; None when it had none or several
        (see :attr:`optimizers`)."""
        return next(iter(self.optimizers.values())) if len(self.optimizers) == 1 else None

    @property
    def scheduler(self) -> Any:
        """The LR scheduler of the latest fit's single optimizer, or None (see :attr:`schedulers`)."""
        return self.optimizers.scheduler(next(iter(self.optimizers))) if len(self.optimizers) == 1 else None

    @property
    def schedulers(self) -> dict[str, Any]:
        """The LR schedulers of the latest fit, by the name of their optimizer."""
        return {name: spec.scheduler for name, spec in self.optimizers.schedules.items()}

    def verify_resume(
        self,
        model_factory: Any,
        train_data: Iterable[Any],
        *,
        optimizer_factory: Any,
        loss_fn: Any = None,
        scheduler_factory: Any = None,
        val_data: Iterable[Any] | None = None,
        steps: int = 20,
        interrupt_at: int | None = None,
        fresh_process: bool = False,
    ) -> Any:
        """Check that this Trainer's program resumes bit for bit: see :func:`dltrain.verify.verify_resume`.

        Trains ``steps`` steps straight; then ``interrupt_at`` steps, a
        checkpoint and a resume in a fresh Trainer (``fresh_process=True``: a
        fresh process) to ``steps``; and compares every tensor of the model,
        the optimizers, the schedulers, every plugin's state, the random states
        and the data of each step. Returns a
        :class:`~dltrain.verify.ResumeReport` naming the first difference.
        """
        from dltrain.verify import verify_resume

        return verify_resume(
            self, model_factory, train_data, optimizer_factory=optimizer_factory, loss_fn=loss_fn,
            scheduler_factory=scheduler_factory, val_data=val_data, steps=steps, interrupt_at=interrupt_at,
            fresh_process=fresh_process,
        )  # fmt: skip

    # -------------------------------------------------- manual optimization

    def backward(self, loss: torch.Tensor, optimizer_name: str | None = None) -> None:
        """Back-propagate ``loss`` from a manual ``training_step``, as the loop does automatically.

        Applies the precision scaler (``precision="16-mixed"``), divides by
        ``accumulate_grad_batches``, runs outside autocast, skips DDP's
        gradient all-reduce on micro-batches that only accumulate, calls
        ``on_before_backward``/``on_after_backward``, and hands the loss to the
        non-finite policy. Call it instead of ``loss.backward()``.

        Args:
            loss: A scalar loss with its graph.
            optimizer_name: The optimizer this loss is for, passed to the hooks.

        Raises:
            StepError: outside a training step, or without ``manual_optimization=True``.
        """
        self._require_manual("backward").backward(loss, optimizer_name)

    def optimizer_step(self, name: str = DEFAULT_NAME) -> bool:
        """Step optimizer ``name`` from a manual ``training_step``, as the loop does automatically.

        At the end of an accumulation group: unscales the gradients (float16),
        rescales a last partial group, clips (``gradient_clip_val``), applies
        ``on_nonfinite="skip"``, calls ``on_before_optimizer_step``, steps (through
        the scaler), zeroes the optimizer's gradients and steps its per-step
        scheduler. On a micro-batch that only accumulates it does nothing.

        Args:
            name: The optimizer's name in ``fit(optimizer={...})`` (``"default"``
                for a single optimizer).

        Returns:
            Whether the optimizer stepped.

        Raises:
            StepError: outside a training step, without ``manual_optimization=True``,
                or no optimizer of that name.
        """
        stepped: bool = self._require_manual("optimizer_step").optimizer_step(name)
        return stepped

    def _require_manual(self, what: str) -> Any:
        runner = self._loop.runner if self._loop is not None else None
        if runner is None or not runner.in_step:
            raise StepError(f"trainer.{what}() works inside training_step, during fit")
        if not runner.manual:
            raise StepError(
                f"trainer.{what}() is for manual optimization: set manual_optimization=True (the step "
                f"then drives the update), or return the loss and let the Trainer do backward and step"
            )
        return runner

    def validate(
        self, model: torch.nn.Module, data: Iterable[Any], *, loss_fn: Any = None
    ) -> dict[str, float]:
        """Evaluate ``model`` on ``data`` and return ``val_*`` metrics."""
        return self._evaluate(RunKind.VALIDATE, Phase.VALIDATE, model, data, loss_fn)

    def test(self, model: torch.nn.Module, data: Iterable[Any], *, loss_fn: Any = None) -> dict[str, float]:
        """Evaluate ``model`` on held-out ``data`` and return ``test_*`` metrics.

        Uses the ``loss_fn`` given here, or else the one of the last ``fit``.
        """
        return self._evaluate(RunKind.TEST, Phase.TEST, model, data, loss_fn)

    def predict(self, model: torch.nn.Module, data: Iterable[Any]) -> list[Any]:
        """Run ``model`` on every batch of ``data``; return the outputs, one entry per batch.

        A batch may be inputs alone (a tensor) or ``(inputs, targets)``.
        """
        outputs: list[Any] = []
        self._evaluate(RunKind.PREDICT, Phase.PREDICT, model, data, None, collect=outputs)
        return outputs

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary, for ``reason``.

        Plugins call this (early stopping, preemption). The first reason is kept.
        """
        if self.state is None:
            raise DltrainError("request_stop() called outside a run; call it from a hook during fit")
        if not self.state.stop_requested:
            self.state.stop_requested = True
            self.state.stop_reason = reason

    def get_plugin(self, name: str) -> Any:
        """The registered plugin named ``name`` (built-in, installed or yours), or None.

        Example: ``trainer.get_plugin("metric_log").run_path``.
        """
        return self.plugin_manager.get_plugin(name)

    def explain_hooks(self) -> str:
        """For each hook, the plugins implementing it in call order (a printable table)."""
        return self.plugin_manager.explain()

    # ------------------------------------------------------- state (resume)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: a checkpoint's payload.

        Holds only tensors and plain Python data, so it loads with
        ``torch.load(weights_only=True)``. The model and optimizer entries come
        from the ``gather_model_state`` hook when a plugin answers it (the
        ``distributed`` plugin does under FSDP, gathering the full tensors on
        rank 0), else from their own ``state_dict()``.

        Under torchrun this is a collective: a plugin's ``state_dict`` may
        all-reduce (the metrics plugin does), so every process must call it,
        as the checkpoint plugin does; calling it on rank 0 alone hangs.
        """
        state = self._require_state()
        run = self._require_loop()
        parts = self._hooks.call_first("gather_model_state", trainer=self, state=state)
        if parts is None:
            model = unwrap_model(self.model)
            parts = {
                "model": model.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            }
            if run.runner is not None and run.runner.grads_are_state():  # mid group, or a manual step's
                parts["grads"] = {
                    name: p.grad.detach().clone()
                    for name, p in model.named_parameters()
                    if p.grad is not None
                }
                if run.runner is not None and run.runner.unsynced_grads():
                    _average_across_processes(parts["grads"])
        loop = {**run.state_dict(), "batch_size": getattr(self._train_data, "batch_size", None)}
        data_state = getattr(self._train_data, "state_dict", None)
        scaler = run.runner.scaler if run.runner is not None else None
        payload: dict[str, Any] = {
            "format": PAYLOAD_FORMAT,
            "model": parts["model"],
            "optimizers": parts.get("optimizers") or {},
            "schedulers": {name: s.scheduler.state_dict() for name, s in self.optimizers.schedules.items()},
            "optimizer_structure": self.optimizers.structure(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loop": loop,
            "data": data_state() if callable(data_state) else None,
            "rng": get_rng_state(),
            "plugins": {
                name: value
                for name, value in self.plugin_manager.call_each("state_dict", trainer=self)
                if value is not None
            },
            "history": self.history.state_dict(),
            "config": self.config.to_json_dict(),
            "world_size": state.world_size,
            "versions": _versions(),
        }
        if parts.get("grads"):
            payload["grads"] = parts["grads"]
        return payload

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        """Restore a payload made by :meth:`state_dict` (of this or an earlier version) into the current run.

        The model, optimizers and gradients go through the ``restore_model_state``
        hook when a plugin answers it (the ``distributed`` plugin does for a
        model sharded with FSDP), else through their own ``load_state_dict``.
        """
        payload = upgrade_payload(payload, list(self.optimizers))
        run = self._require_loop()
        state = self._require_state()
        restored = self._hooks.call_first("restore_model_state", trainer=self, state=state, payload=payload)
        if not restored:
            model = unwrap_model(self.model)
            model.load_state_dict(payload["model"])
            for name, optimizer in self.optimizers.items():
                saved = payload["optimizers"].get(name)
                if saved is not None:
                    optimizer.load_state_dict(saved)
            grads = payload.get("grads") or {}
            for name, p in model.named_parameters():
                p.grad = grads[name].to(p.device) if name in grads else None
        for name, saved in payload["schedulers"].items():
            scheduler = self.optimizers.scheduler(name)
            if scheduler is not None and saved is not None:
                scheduler.load_state_dict(saved)
        scaler = run.runner.scaler if run.runner is not None else None
        if scaler is not None and payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
        run.load_state_dict(payload["loop"], payload["rng"])
        data_load = getattr(self._train_data, "load_state_dict", None)
        if payload.get("data") is not None and callable(data_load):
            data_load(payload["data"])
        self.history.load_state_dict(payload["history"])
        saved_plugins = payload.get("plugins", {})
        for name, impl in self.plugin_manager.each_impl("load_state_dict"):
            if name in saved_plugins:
                impl(trainer=self, state_dict=saved_plugins[name])

    # -------------------------------------------------------------- internals

    def _prepare(self, state: State, data: Any, phase: Phase) -> Any:
        replaced = self._hooks.call_first("prepare_data", trainer=self, state=state, data=data, phase=phase)
        return data if replaced is None else replaced

    def _require_loop(self) -> Driver:
        if self._loop is None:
            raise DltrainError("no run in progress: state_dict/load_state_dict work during fit (from hooks)")
        return self._loop

    def _require_state(self) -> State:
        if self.state is None:
            raise DltrainError("no run in progress: state_dict/load_state_dict work during fit (from hooks)")
        return self.state

    def _resume(self, resume: str, *, strict: bool) -> None:
        from dltrain.checkpoint import compare_for_resume, load_for_resume

        directory = self.config.checkpoint.dir if self.config.checkpoint is not None else None
        if resume == "auto":
            found = self._resume_auto(directory)
            if found is None:
                return
            payload, path = found
        else:
            payload, path = load_for_resume(resume, directory)
        payload = upgrade_payload(payload, list(self.optimizers))
        current = {
            "config": self.config.to_json_dict(),
            "world_size": self._require_state().world_size,
            "batch_size": getattr(self._train_data, "batch_size", None),
            # Full shapes, also for a model sharded with FSDP: a DTensor's shape is the whole tensor's.
            "model": {k: tuple(v.shape) for k, v in unwrap_model(self.model).state_dict().items()},
        }
        differences = compare_for_resume(payload, current)
        # Optimizers that differ cannot be loaded at all: an error whatever resume_strict says,
        # listing every difference, before anything is loaded.
        check_resumable(
            compare_optimizers(payload["optimizer_structure"], self.optimizers.structure()),
            str(path),
            also=differences,
        )
        if differences:
            message = (
                f"checkpoint {str(path)!r} was made by a run that computes differently:\n  - "
                + "\n  - ".join(differences)
            )
            if strict:
                raise CheckpointError(message + "\nPass resume_strict=False to resume anyway.")
            warnings.warn(message, stacklevel=3)
        self.load_state_dict(payload)

    def _resume_auto(self, directory: Path | None) -> tuple[dict[str, Any], Path] | None:
        """``resume="auto"``: the newest intact checkpoint in ``directory`` and its path, or None.

        Rank 0 chooses and tells the others (one broadcast), so every process
        resumes from the same file, or none does. Says which on stderr (rank 0).
        """
        from dltrain.checkpoint import list_checkpoints, load_for_resume

        if directory is None:
            raise CheckpointError(
                "resume='auto' needs a checkpoint directory to look in, but checkpointing is off; set "
                "checkpoint={'dir': ...} in the Trainer config"
            )
        state = self._require_state()
        found: tuple[dict[str, Any], Path] | None = None
        if state.is_global_zero and list_checkpoints(directory):
            found = load_for_resume("last", directory)
        choice = [None if found is None else str(found[1])]
        dist = torch.distributed
        if state.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
            if not state.is_global_zero and choice[0] is not None:
                found = load_for_resume(choice[0], directory)
        if state.is_global_zero:
            if found is None:
                message = f"dltrain: no checkpoint in {str(directory)!r}: starting fresh"
            else:
                step = found[0].get("loop", {}).get("global_step")
                message = f"dltrain: resuming from {str(found[1])!r} (step {step})"
            print(message, file=sys.stderr, flush=True)
        return found

    @contextlib.contextmanager
    def _run(self, state: State, optimizers: OptimizerSet | None = None) -> Iterator[None]:
        """Setup, exception reporting and teardown shared by every entry point."""
        self._hooks.refresh()
        self._loop = None
        given = self.model
        compiled, uncompiled = None, given
        error: BaseException | None = None
        try:
            options = self.config.compile_options()
            if options is not None:
                check_backend(options.backend)
            if self.config.seed is not None:
                seed_everything(self.config.seed)
            device = self._hooks.call_first("select_device", trainer=self, config=self.config)
            state.device = torch.device(device) if device is not None else torch.device("cpu")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                state.world_size = torch.distributed.get_world_size()
                state.rank = torch.distributed.get_rank()
            self._hooks.call("on_setup", trainer=self, state=state)
            self._loop = Driver(self, state, optimizers)
            if options is not None:
                # After on_setup, keep this order: the model is on its device, and under DDP what
                # is compiled is the DistributedDataParallel module, as torch recommends (dynamo
                # splits the graph at DDP's buckets, so the all-reduces overlap the backward).
                uncompiled = self.model
                compiled = self.model = self._compiler.wrap(self.model, options)
            yield
        except BaseException as exc:
            error = self._explain(exc, state)
            for name, impl in self.plugin_manager.each_impl("on_exception"):
                try:
                    impl(trainer=self, state=state, exception=error)
                except Exception as inner:  # keep going: every plugin gets to clean up
                    _add_note(error, f"dltrain: plugin {name!r} also raised in on_exception: {inner!r}")
            if error is exc:
                raise
            raise error from exc
        finally:
            if compiled is not None:
                if self.model is compiled:
                    # The user's module again, as DDP unwrapping (in on_teardown) gives it back.
                    self.model = uncompiled
                if uncompiled is not given:
                    # Compiled around a plugin's wrapper (DDP): no later run can reuse it, and kept, it
                    # would keep that wrapper and its process group alive until the interpreter exits.
                    self._compiler.forget()
                del compiled, uncompiled  # nothing of this run's wrappers is kept by this frame
            self._teardown(state, error)

    def _teardown(self, state: State, error: BaseException | None) -> None:
        """Call every plugin's ``on_teardown``, each even when another raised.

        After an error, a teardown failure is attached to it as a note (the
        run's own error is never masked); after a run that succeeded, the
        first failure is raised as a :class:`~dltrain.PluginError` naming the
        plugin (``trainer.history`` keeps the completed fit).
        """
        failures: list[tuple[str, BaseException]] = []
        for name, impl in self.plugin_manager.each_impl("on_teardown"):
            try:
                impl(trainer=self, state=state)
            except Exception as exc:
                failures.append((name, exc))
        if not failures:
            return
        if error is not None:
            for name, failure in failures:
                _add_note(error, f"dltrain: plugin {name!r} also raised in on_teardown: {failure!r}")
            return
        name, first = failures[0]
        others = "".join(f"; plugin {n!r} raised too: {e!r}" for n, e in failures[1:])
        raise PluginError(
            f"plugin {name!r} raised {type(first).__name__} in hook 'on_teardown' after the run completed: "
            f"{first}{others} (trainer.history holds the completed run)"
        ) from first

    def _explain(self, exc: BaseException, state: State) -> BaseException:
        """Say where ``exc`` came from: a third-party plugin's hook, or user code at a step."""
        if not isinstance(exc, Exception) or isinstance(exc, DltrainError):
            return exc
        where = f"epoch {state.epoch + 1}, global step {state.global_step}, batch {state.batch_idx} ({state.phase.value})"
        culprit = self.plugin_manager.culprit(exc)
        if culprit is not None and culprit[2] != "builtin":
            plugin, hook, _ = culprit
            return PluginError(
                f"plugin {plugin!r} raised {type(exc).__name__} in hook {hook!r} at {where}: {exc}"
            )
        if culprit is None:
            origin = "in user code"
        elif culprit[1] in ("training_step", "eval_step"):
            origin = f"in hook {culprit[1]!r} (model forward or loss_fn)"
        else:
            origin = f"in built-in plugin {culprit[0]!r}, hook {culprit[1]!r}"
        _add_note(exc, f"dltrain: raised {origin} at {where}")
        return exc

    def _evaluate(
        self,
        run: RunKind,
        phase: Phase,
        model: torch.nn.Module,
        data: Iterable[Any],
        loss_fn: Any,
        collect: list[Any] | None = None,
    ) -> dict[str, float]:
        self.model = _checks.check_model(model)
        _checks.check_data(data, "data")
        if loss_fn is not None:
            self.loss_fn = loss_fn
        state = self.state = State(run=run)
        name = run.value
        with self._run(state):
            data = self._prepare(state, data, phase)
            self._hooks.call(f"on_{name}_start", trainer=self, state=state)
            metrics = self._require_loop().eval_epoch(phase, data, collect)
            self._hooks.call(f"on_{name}_end", trainer=self, state=state)
        return metrics


#: The form of :meth:`Trainer.state_dict`'s payload: 2 has optimizers and schedulers by name.
PAYLOAD_FORMAT = 2


def upgrade_payload(payload: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """A checkpoint payload in today's form (:data:`PAYLOAD_FORMAT`), from any earlier form.

    Format 1 (dltrain 0.1) had one ``optimizer`` and one ``scheduler``: they
    become the entries of the single optimizer (``names[0]``, or ``"default"``).
    Its optimizer structure is read off the saved state (parameter groups; the
    class was not recorded).
    """
    data = dict(payload)
    if int(data.get("format", 1)) >= 2:
        return data
    name = names[0] if len(names) == 1 else DEFAULT_NAME
    optimizer, scheduler = data.pop("optimizer", None), data.pop("scheduler", None)
    data["optimizers"] = {name: optimizer} if optimizer is not None else {}
    data["schedulers"] = {name: scheduler} if scheduler is not None else {}
    data["optimizer_structure"] = structure_of_states(data["optimizers"], data["schedulers"])
    data["format"] = PAYLOAD_FORMAT
    return data


def _average_across_processes(grads: dict[str, torch.Tensor]) -> None:
    """In place: the mean over the processes of gradients accumulated under DDP's ``no_sync``, what
    DDP's own all-reduce at the group's last micro-batch would give (a collective)."""
    world = torch.distributed.get_world_size()
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad.div_(world)


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
