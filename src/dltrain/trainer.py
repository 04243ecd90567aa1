"""The Trainer: a thin loop that calls hooks.

Everything optional (devices, metrics, progress, logging, checkpoints) is a
plugin; the loop below only orders the work. The order of hooks is given
in :mod:`dltrain.hookspecs` and pinned by a test.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from dltrain import _checks
from dltrain._hooks import Hooks
from dltrain._nonfinite import NonFiniteGuard
from dltrain._plugin_manager import PluginManager
from dltrain._precision import Precision
from dltrain._rng import get_rng_state, seed_everything, set_rng_state
from dltrain.config import TrainerConfig
from dltrain.errors import DltrainError, PluginError, StepError
from dltrain.state import History, Phase, RunKind, State, StepOutput

__all__ = ["Trainer"]

_STAGE_TRAIN, _STAGE_VALIDATE, _STAGE_DONE = "train", "validate", "done"


def _with_last(iterable: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``, looking one item ahead."""
    it = iter(iterable)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _set_epoch(data: Any, epoch: int) -> None:
    for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _versions() -> dict[str, str]:
    try:
        version = importlib.metadata.version("dltrain")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "unknown"
    return {"dltrain": version, "torch": torch.__version__}


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
        self._stage = _STAGE_DONE
        self._epoch_rng: dict[str, Any] | None = None
        self._train_data: Any = None
        self._nonfinite = NonFiniteGuard(self.config.on_nonfinite)
        self._skip_step = False
        self._resume_rng: dict[str, Any] | None = None
        self._autocast: Any = None
        self._scaler: Any = None  # set per run from Precision

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
            self._fit_loop(state, train_data, val_data)
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

    def explain_hooks(self) -> str:
        """For each hook, the plugins implementing it in call order (a printable table)."""
        return self.plugin_manager.explain()

    # ------------------------------------------------------- state (resume)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: a checkpoint's payload.

        Holds only tensors and plain Python data, so it loads with
        ``torch.load(weights_only=True)``.
        """
        state = self._require_state()
        loop: dict[str, Any] = {
            **state.counters(),
            "stage": self._stage,
            "epoch_rng": self._epoch_rng,
            "batch_size": getattr(self._train_data, "batch_size", None),
        }
        data_state = getattr(self._train_data, "state_dict", None)
        payload: dict[str, Any] = {
            "format": 1,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
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
        if state.micro_step:  # mid accumulation group: the partial gradients are state too
            payload["grads"] = {
                name: p.grad.detach().clone()
                for name, p in _unwrap(self.model).named_parameters()
                if p.grad is not None
            }
        return payload

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        """Restore a payload made by :meth:`state_dict` into the current run."""
        state = self._require_state()
        model = _unwrap(self.model)
        model.load_state_dict(payload["model"])
        if self.optimizer is not None and payload.get("optimizer") is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self._scaler is not None and payload.get("scaler") is not None:
            self._scaler.load_state_dict(payload["scaler"])
        loop = payload["loop"]
        state.epoch, state.global_step = int(loop["epoch"]), int(loop["global_step"])
        state.batch_idx, state.micro_step = int(loop["batch_idx"]), int(loop["micro_step"])
        state.skipped_steps = int(loop.get("skipped_steps", 0))
        self._stage = loop["stage"]
        self._epoch_rng = loop["epoch_rng"]
        data_load = getattr(self._train_data, "load_state_dict", None)
        if payload.get("data") is not None and callable(data_load):
            data_load(payload["data"])
        grads = payload.get("grads") or {}
        for name, p in model.named_parameters():
            p.grad = grads[name].to(p.device) if name in grads else None
        self.history.load_state_dict(payload["history"])
        saved_plugins = payload.get("plugins", {})
        for name, impl in self._state_loaders():
            if name in saved_plugins:
                impl(trainer=self, state_dict=saved_plugins[name])
        self._resume_rng = payload["rng"]

    # -------------------------------------------------------------- internals

    def _prepare(self, state: State, data: Any, phase: Phase) -> Any:
        replaced = self._hooks.call_first("prepare_data", trainer=self, state=state, data=data, phase=phase)
        return data if replaced is None else replaced

    def _require_state(self) -> State:
        if self.state is None:
            raise DltrainError("no run in progress: state_dict/load_state_dict work during fit (from hooks)")
        return self.state

    def _state_loaders(self) -> Iterator[tuple[str, Any]]:
        caller = self.plugin_manager.hook.load_state_dict
        for impl in reversed(caller.get_hookimpls()):

            def call(_impl: Any = impl, **kw: Any) -> Any:
                return _impl.function(*[kw[a] for a in _impl.argnames])

            yield impl.plugin_name, call

    def _resume(self, resume: str, *, strict: bool) -> None:
        from dltrain.checkpoint import compare_for_resume, load_for_resume

        directory = self.config.checkpoint.dir if self.config.checkpoint is not None else None
        payload, path = load_for_resume(resume, directory)
        current = {
            "config": self.config.to_json_dict(),
            "world_size": self._require_state().world_size,
            "batch_size": getattr(self._train_data, "batch_size", None),
            "model": {k: tuple(v.shape) for k, v in _unwrap(self.model).state_dict().items()},
        }
        differences = compare_for_resume(payload, current)
        if differences:
            message = (
                f"checkpoint {str(path)!r} was made by a run that computes differently:\n  - "
                + "\n  - ".join(differences)
            )
            if strict:
                raise DltrainError(message + "\nPass resume_strict=False to resume anyway.")
            import warnings

            warnings.warn(message, stacklevel=3)
        self.load_state_dict(payload)

    @contextlib.contextmanager
    def _run(self, state: State) -> Iterator[None]:
        """Setup, exception reporting and teardown shared by every entry point."""
        self._hooks.refresh()
        self._resume_rng = None
        try:
            if self.config.seed is not None:
                seed_everything(self.config.seed)
            device = self._hooks.call_first("select_device", trainer=self, config=self.config)
            state.device = torch.device(device) if device is not None else torch.device("cpu")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                state.world_size = torch.distributed.get_world_size()
                state.rank = torch.distributed.get_rank()
            self._hooks.call("on_setup", trainer=self, state=state)
            precision = Precision(self.config.precision, state.device)
            self._autocast, self._scaler = precision.autocast, precision.scaler
            self._nonfinite = NonFiniteGuard(self.config.on_nonfinite)
            if self.config.compile and not hasattr(self.model, "_orig_mod"):
                self.model = torch.compile(self.model)  # type: ignore[assignment]
            yield
        except BaseException as exc:
            error = self._explain(exc, state)
            for name, impl in self._each_exception_impl():
                try:
                    impl(trainer=self, state=state, exception=error)
                except Exception as inner:  # keep going: every plugin gets to clean up
                    _add_note(error, f"dltrain: plugin {name!r} also raised in on_exception: {inner!r}")
            if error is exc:
                raise
            raise error from exc
        finally:
            self._hooks.call("on_teardown", trainer=self, state=state)

    def _each_exception_impl(self) -> Iterator[tuple[str, Any]]:
        caller = self.plugin_manager.hook.on_exception
        for impl in reversed(caller.get_hookimpls()):

            def call(_impl: Any = impl, **kw: Any) -> Any:
                return _impl.function(*[kw[a] for a in _impl.argnames])

            yield impl.plugin_name, call

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
        origin = f"in hook {culprit[1]!r} (model forward or loss_fn)" if culprit else "in user code"
        _add_note(exc, f"dltrain: raised {origin} at {where}")
        return exc

    # ------------------------------------------------------------ the loops

    def _fit_loop(self, state: State, train_data: Iterable[Any], val_data: Iterable[Any] | None) -> None:
        cfg = self.config
        resuming_stage = self._stage if self._resume_rng is not None else None
        if resuming_stage == _STAGE_DONE:
            state.epoch += 1
            state.batch_idx = 0
        while not self._should_stop(state):
            validate_now = val_data is not None and self._validates(state.epoch)
            if resuming_stage != _STAGE_VALIDATE:
                self._train_epoch(state, train_data, resuming=resuming_stage == _STAGE_TRAIN)
                # A stop requested mid-epoch (interrupt, preemption) ends now, without validation.
                validate_now = validate_now and not state.stop_requested
                if not validate_now:
                    self._step_scheduler_epoch(state)
                    self._stage = _STAGE_DONE
                else:
                    self._stage = _STAGE_VALIDATE
                self._hooks.call("on_train_epoch_end", trainer=self, state=state, metrics=dict(state.metrics))
            elif self._resume_rng is not None:
                set_rng_state(self._resume_rng)
                self._resume_rng = None
            resuming_stage = None
            if validate_now and val_data is not None:
                metrics = self._eval_epoch(state, Phase.VALIDATE, val_data, cfg.limit_val_batches)
                self._step_scheduler_epoch(state)
                self._stage = _STAGE_DONE
                self._hooks.call("on_eval_epoch_end", trainer=self, state=state, metrics=metrics)
            self.history.append({"epoch": state.epoch + 1, **state.metrics})
            if self._step_limit_reached(state) or state.stop_requested:
                break
            state.epoch += 1
            state.batch_idx = 0
        if state.stop_reason is None:
            state.stop_reason = (
                "max_steps reached" if self._step_limit_reached(state) else "max_epochs reached"
            )

    def _validates(self, epoch: int) -> bool:
        cfg = self.config
        last = cfg.max_epochs is not None and epoch + 1 >= cfg.max_epochs
        return (epoch + 1) % cfg.val_every_n_epochs == 0 or last

    def _step_limit_reached(self, state: State) -> bool:
        return self.config.max_steps is not None and state.global_step >= self.config.max_steps

    def _should_stop(self, state: State) -> bool:
        cfg = self.config
        if cfg.max_epochs is not None and state.epoch >= cfg.max_epochs:
            return True
        return self._step_limit_reached(state) or state.stop_requested

    def _train_epoch(self, state: State, data: Iterable[Any], *, resuming: bool) -> None:
        cfg, h = self.config, self._hooks
        model, optimizer = self.model, self.optimizer
        assert optimizer is not None
        state.phase = Phase.TRAIN
        if not resuming:
            state.metrics = {}
        model.train()
        skip = 0
        if resuming and self._epoch_rng is not None:
            set_rng_state(self._epoch_rng)  # replay the epoch's data order
            skip = state.batch_idx + 1
        else:
            state.micro_step = 0
            optimizer.zero_grad(set_to_none=True)
            self._epoch_rng = get_rng_state()
        _set_epoch(data, state.epoch)
        batches = iter(data)
        for _ in range(skip):
            next(batches, None)
        if resuming and self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        start = skip
        state.batch_idx = start
        h.call("on_train_epoch_start", trainer=self, state=state)
        self._stage = _STAGE_TRAIN
        accum, limit = cfg.accumulate_grad_batches, cfg.limit_train_batches
        if limit is not None:
            batches = (b for i, b in zip(range(start, limit), batches, strict=False))
        on_start, on_end = h.get("on_train_batch_start"), h.get("on_train_batch_end")
        on_before_bw, on_after_bw = h.get("on_before_backward"), h.get("on_after_backward")
        step_hook, transfer = h.get("training_step"), h.get("transfer_batch")
        device, autocast, scaler = state.device, self._autocast, self._scaler
        seen = 0
        for batch_idx, (batch, is_last) in enumerate(_with_last(batches), start):
            seen += 1
            state.batch_idx = batch_idx
            if transfer is not None:
                batch = transfer(trainer=self, state=state, batch=batch, device=device)
            if on_start is not None:
                on_start(trainer=self, state=state, batch=batch)
            if autocast is None:
                output = step_hook(trainer=self, state=state, model=model, batch=batch)
            else:
                with autocast():
                    output = step_hook(trainer=self, state=state, model=model, batch=batch)
            output = self._as_step_output(output, batch)
            loss = output.loss
            assert loss is not None
            state.micro_step += 1
            scaled = loss / accum if accum > 1 else loss
            if on_before_bw is not None:
                on_before_bw(trainer=self, state=state, loss=scaled)
            if scaler is None:
                scaled.backward()  # type: ignore[no-untyped-call]
            else:
                scaler.scale(scaled).backward()
            if on_after_bw is not None:
                on_after_bw(trainer=self, state=state)
            if self._nonfinite.observe(state, loss):
                self._skip_step = True
                output.loss = None  # a skipped batch is left out of the epoch's loss
            if state.micro_step == accum or is_last:
                self._optimizer_step(state, optimizer, state.micro_step)
            if on_end is not None:
                on_end(trainer=self, state=state, batch=batch, output=output)
            if state.micro_step == 0 and (self._step_limit_reached(state) or state.stop_requested):
                break
        if seen == 0 and not resuming:
            from dltrain.errors import DataError

            raise DataError("train_data produced no batches this epoch; check that the dataset is not empty")
        self._nonfinite.check(state, _unwrap(model), self.request_stop)
        state.metrics.update(self._compute_metrics(state))

    def _as_step_output(self, output: Any, batch: Any) -> StepOutput:
        result: StepOutput
        if isinstance(output, StepOutput) and output.loss is not None:
            result = output
        elif isinstance(output, torch.Tensor):
            from dltrain.default_plugins.step import batch_size_of

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
                f"the loss must be a scalar tensor, got shape {shape}; reduce it (loss_fn(..., reduction='mean') "
                f"or .mean())"
            )
        if not loss.requires_grad:
            raise StepError(
                "the loss does not require grad, so backward cannot run: is the model's output detached, "
                "or were all its parameters frozen?"
            )
        return result

    def _optimizer_step(self, state: State, optimizer: torch.optim.Optimizer, micro_steps: int) -> None:
        cfg, h = self.config, self._hooks
        accum = cfg.accumulate_grad_batches
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaler = self._scaler
        if scaler is not None:  # clip and rescale true gradients, not scaled ones
            scaler.unscale_(optimizer)
        if micro_steps != accum and params:  # a last, partial group: undo the 1/accum scaling
            torch._foreach_mul_([p.grad for p in params], accum / micro_steps)
        if cfg.gradient_clip_val is not None and params:
            if cfg.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, cfg.gradient_clip_val)
        skip, self._skip_step = self._skip_step, False
        if not skip:
            h.call("on_before_optimizer_step", trainer=self, state=state, optimizer=optimizer)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        else:
            state.skipped_steps += 1
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.micro_step = 0
        state.global_step += 1
        if self.scheduler is not None and cfg.scheduler_interval == "step" and not skip:
            self.scheduler.step()
        if state.global_step % cfg.log_every_n_steps == 0:
            self._nonfinite.check(state, _unwrap(self.model), self.request_stop)

    def _step_scheduler_epoch(self, state: State) -> None:
        sched = self.scheduler
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

    def _compute_metrics(self, state: State) -> dict[str, float]:
        prefix = state.phase.metric_prefix
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for plugin, result in self.plugin_manager.call_each("compute_metrics", trainer=self, state=state):
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

    def _eval_epoch(
        self,
        state: State,
        phase: Phase,
        data: Iterable[Any],
        limit: int | None,
        collect: list[Any] | None = None,
    ) -> dict[str, float]:
        h, model = self._hooks, self.model
        previous_phase, previous_batch = state.phase, state.batch_idx
        state.phase = phase
        was_training = model.training
        model.eval()
        state.batch_idx = 0
        h.call("on_eval_epoch_start", trainer=self, state=state)
        transfer, step = h.get("transfer_batch"), h.get("eval_step")
        on_start, on_end = h.get("on_eval_batch_start"), h.get("on_eval_batch_end")
        with torch.inference_mode():
            for batch_idx, batch in enumerate(data):
                if limit is not None and batch_idx >= limit:
                    break
                state.batch_idx = batch_idx
                if transfer is not None:
                    batch = transfer(trainer=self, state=state, batch=batch, device=state.device)
                if on_start is not None:
                    on_start(trainer=self, state=state, batch=batch)
                if self._autocast is None:
                    output = step(trainer=self, state=state, model=model, batch=batch)
                else:
                    with self._autocast():
                        output = step(trainer=self, state=state, model=model, batch=batch)
                if not isinstance(output, StepOutput):
                    raise StepError(
                        f"eval_step returned {type(output).__name__}; it must return a StepOutput"
                    )
                if collect is not None:
                    collect.append(output.outputs)
                if on_end is not None:
                    on_end(trainer=self, state=state, batch=batch, output=output)
        metrics = self._compute_metrics(state) if phase is not Phase.PREDICT else {}
        state.metrics.update(metrics)
        model.train(was_training)
        state.batch_idx = previous_batch if previous_phase is Phase.TRAIN else state.batch_idx
        return metrics

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
            metrics = self._eval_epoch(state, phase, data, self.config.limit_val_batches, collect)
            self._hooks.call("on_eval_epoch_end", trainer=self, state=state, metrics=metrics)
            self._hooks.call(f"on_{name}_end", trainer=self, state=state)
        return metrics


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / compile wrappers."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner) if type(inner).__name__ in ("DistributedDataParallel",) else inner
    return inner if isinstance(inner, torch.nn.Module) else model


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
