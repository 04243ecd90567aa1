"""The Trainer: a thin loop that calls hooks.

Everything optional (devices, metrics, progress, logging, checkpoints) is a
plugin; the loop below only orders the work. The order of hooks is given
in :mod:`dltrain.hookspecs` and pinned by a test.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from dltrain import _checks
from dltrain._compile import Compiler, check_backend
from dltrain._hooks import Hooks
from dltrain._loop import Loop, unwrap_model
from dltrain._markers import DISTRIBUTION
from dltrain._plugin_manager import PluginManager
from dltrain._rng import get_rng_state, seed_everything
from dltrain.config import TrainerConfig
from dltrain.errors import CheckpointError, DltrainError, PluginError, StepError
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
        metrics: Extra metrics by name, reported for every phase: callables
            ``(outputs, targets) -> tensor`` or torchmetrics-style objects.
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
        optimizer: The optimizer passed to ``fit``.
        scheduler: The LR scheduler passed to ``fit``, or None.
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
        if metrics:
            from dltrain.default_plugins.metrics import MetricsPlugin

            user_plugins.append(
                MetricsPlugin(accuracy="never", metrics=metrics, report_loss=False, name="custom_metrics")
            )
        self.plugin_manager = PluginManager(config, user_plugins)
        self.history = History()
        self.state: State | None = None
        self.model: torch.nn.Module = torch.nn.Module()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.loss_fn: Any = None
        self._hooks = Hooks(self.plugin_manager)
        self._loop: Loop | None = None  # the current run's mechanics
        self._train_data: Any = None
        self._compiler = Compiler()  # keeps the last run's compiled wrapper for the next run

    # ------------------------------------------------------------------ API

    def fit(
        self,
        model: torch.nn.Module,
        train_data: Iterable[Any],
        *,
        optimizer: torch.optim.Optimizer,
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
            optimizer: An optimizer over ``model``'s parameters.
            loss_fn: ``loss_fn(outputs, targets) -> scalar``; needed by the
                default training step (a plugin's ``training_step`` may not need it).
            val_data: Batches to validate on every ``val_every_n_epochs``.
            scheduler: An LR scheduler, stepped every epoch or every optimizer
                step (``scheduler_interval``); ReduceLROnPlateau gets ``scheduler_monitor``.
            resume: ``"last"``, ``"best"`` or a checkpoint path to continue from.
            resume_strict: When False, config differences that change what the
                run computes are a warning instead of an error.

        Returns:
            The :class:`~dltrain.History` of per-epoch metrics (also ``trainer.history``).
        """
        model = _checks.check_model(model)
        optimizer = _checks.check_optimizer(optimizer, model)
        _checks.check_data(train_data, "train_data")
        if val_data is not None:
            _checks.check_data(val_data, "val_data")
        if loss_fn is None and self.plugin_manager.implementers("training_step") == ["step"]:
            raise StepError(
                "fit needs loss_fn (e.g. loss_fn=torch.nn.CrossEntropyLoss()) for the default training "
                "step, or a plugin implementing training_step that computes the loss"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise StepError(
                f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}"
            )
        self.model, self.optimizer, self.scheduler, self.loss_fn = (
            model,
            optimizer,
            scheduler,
            loss_fn,
        )
        self._train_data = train_data
        self.history = History()
        state = self.state = State(run=RunKind.FIT)
        with self._run(state):
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
        """
        state = self._require_state()
        run = self._require_loop()
        parts = self._hooks.call_first("gather_model_state", trainer=self, state=state)
        if parts is None:
            model = unwrap_model(self.model)
            parts = {
                "model": model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            }
            if state.micro_step:  # mid accumulation group: the partial gradients are state too
                parts["grads"] = {
                    name: p.grad.detach().clone()
                    for name, p in model.named_parameters()
                    if p.grad is not None
                }
        loop = {**run.state_dict(), "batch_size": getattr(self._train_data, "batch_size", None)}
        data_state = getattr(self._train_data, "state_dict", None)
        payload: dict[str, Any] = {
            "format": 1,
            "model": parts["model"],
            "optimizer": parts.get("optimizer"),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
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
        if state.micro_step and parts.get("grads") is not None:
            payload["grads"] = parts["grads"]
        return payload

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        """Restore a payload made by :meth:`state_dict` into the current run.

        The model, optimizer and gradients go through the ``restore_model_state``
        hook when a plugin answers it (the ``distributed`` plugin does for a
        model sharded with FSDP), else through their own ``load_state_dict``.
        """
        run = self._require_loop()
        state = self._require_state()
        restored = self._hooks.call_first("restore_model_state", trainer=self, state=state, payload=payload)
        if not restored:
            model = unwrap_model(self.model)
            model.load_state_dict(payload["model"])
            if self.optimizer is not None and payload.get("optimizer") is not None:
                self.optimizer.load_state_dict(payload["optimizer"])
            grads = payload.get("grads") or {}
            for name, p in model.named_parameters():
                p.grad = grads[name].to(p.device) if name in grads else None
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if run.scaler is not None and payload.get("scaler") is not None:
            run.scaler.load_state_dict(payload["scaler"])
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

    def _require_loop(self) -> Loop:
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
        payload, path = load_for_resume(resume, directory)
        current = {
            "config": self.config.to_json_dict(),
            "world_size": self._require_state().world_size,
            "batch_size": getattr(self._train_data, "batch_size", None),
            # Full shapes, also for a model sharded with FSDP: a DTensor's shape is the whole tensor's.
            "model": {k: tuple(v.shape) for k, v in unwrap_model(self.model).state_dict().items()},
        }
        differences = compare_for_resume(payload, current)
        if differences:
            message = (
                f"checkpoint {str(path)!r} was made by a run that computes differently:\n  - "
                + "\n  - ".join(differences)
            )
            if strict:
                raise CheckpointError(message + "\nPass resume_strict=False to resume anyway.")
            import warnings

            warnings.warn(message, stacklevel=3)
        self.load_state_dict(payload)

    @contextlib.contextmanager
    def _run(self, state: State) -> Iterator[None]:
        """Setup, exception reporting and teardown shared by every entry point."""
        self._hooks.refresh()
        self._loop = None
        compiled, uncompiled = None, self.model
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
            self._loop = Loop(self, state)
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
            if compiled is not None and self.model is compiled:
                # The user's module again, as DDP unwrapping (in on_teardown) gives it back.
                self.model = uncompiled
            self._hooks.call("on_teardown", trainer=self, state=state)

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
            self._hooks.call("on_eval_epoch_end", trainer=self, state=state, metrics=metrics)
            self._hooks.call(f"on_{name}_end", trainer=self, state=state)
        return metrics


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
