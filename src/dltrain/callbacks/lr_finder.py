"""The learning-rate range test: :func:`lr_find` sweeps the learning rate and suggests one.

The sweep is a real, short ``fit`` of a private Trainer made from the given
Trainer's config: ``num_steps`` optimizer steps whose learning rate grows
exponentially from ``min_lr`` to ``max_lr``, recording the loss of every
step, until the loss diverges. Afterwards the model, the optimizer, every
random number generator and the data's own generators are put back exactly
as they were, so the sweep leaves no trace: the real training that follows
is the one it would have been without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from dltrain._epoch_data import data_generators
from dltrain._markers import hookimpl
from dltrain._rng import get_rng_state, set_rng_state
from dltrain.errors import ConfigError, DltrainError, StepError

if TYPE_CHECKING:
    from dltrain.state import State, StepOutput
    from dltrain.trainer import Trainer

__all__ = ["LRFindResult", "lr_find"]

#: Config fields the sweep sets whatever the given Trainer's config says (see :func:`lr_find`).
SWEEP_OVERRIDES: Mapping[str, Any] = MappingProxyType(
    {
        "max_epochs": None,  # as many epochs as the steps need
        "run_dir": None,
        "checkpoint": None,
        "progress": "off",
        "compile": False,
        "on_nonfinite": "stop",
        "autoload_plugins": False,
    }
)


@dataclass(frozen=True)
class LRFindResult:
    """What :func:`lr_find` measured.

    Attributes:
        lrs: The learning rate of each optimizer step of the sweep.
        losses: The smoothed loss at each step: an exponential moving average
            of ``raw_losses`` with factor ``smooth``, bias-corrected (divided by
            ``1 - smooth**(i + 1)``) so the first values are not pulled to 0.
        raw_losses: Each step's loss (the mean over its micro-batches, and
            under torchrun over the processes). The curve ends before the
            first step whose loss was NaN or infinite.
        suggestion: The suggested learning rate (see ``suggestion_rule``), or
            None when fewer than two steps were recorded.
        suggestion_rule: ``"steepest"``: the learning rate where the smoothed
            loss falls fastest per decade of learning rate, searched from the
            first tenth of the curve up to the lowest loss; ``"minimum/10"``
            when that stretch is under three points (the loss fell from the
            start, or never), a tenth of :attr:`lr_at_min_loss`; ``"none"``.
        stop_reason: Why the sweep ended: ``"max_steps reached"`` (all
            ``num_steps`` ran), or the divergence or non-finite loss that stopped
            it (under torchrun: as this process saw it, on its own shard).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    raw_losses: tuple[float, ...]
    stop_reason: str
    suggestion: float | None = field(init=False)
    suggestion_rule: str = field(init=False)

    def __post_init__(self) -> None:
        suggestion, rule = _suggest(self.lrs, self.losses)
        object.__setattr__(self, "suggestion", suggestion)
        object.__setattr__(self, "suggestion_rule", rule)

    @property
    def lr_at_min_loss(self) -> float | None:
        """The learning rate of the lowest smoothed loss (None for an empty curve)."""
        if not self.losses:
            return None
        return self.lrs[min(range(len(self.losses)), key=self.losses.__getitem__)]

    def plot(self, path: str | Path | None = None, *, ax: Any = None) -> Any:
        """Draw the loss against the learning rate (log scale) and mark the suggestion.

        Needs matplotlib (``pip install 'torch-dltrain[plot]'``), imported here.

        Args:
            path: Save the figure there as a PNG.
            ax: A matplotlib ``Axes`` to draw on; default a new figure (drawn with
                the Agg canvas: no display needed, pyplot's state untouched).

        Returns:
            The matplotlib ``Figure``.

        Raises:
            DltrainError: matplotlib is not installed.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise DltrainError(
                "plotting needs matplotlib, which is not installed: pip install 'torch-dltrain[plot]'"
            ) from exc
        if ax is None:
            fig = Figure(figsize=(6.4, 4.2), layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
        fig = ax.figure
        ax.plot(self.lrs, self.raw_losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss per step")
        ax.plot(self.lrs, self.losses, color="tab:blue", linewidth=1.8, label="smoothed loss")
        if self.suggestion is not None:
            i = self.lrs.index(self.suggestion)
            ax.plot(
                [self.suggestion],
                [self.losses[i]],
                marker="o",
                color="tab:red",
                linestyle="none",
                label=f"suggestion {self.suggestion:.3g} ({self.suggestion_rule})",
            )
        if self.losses:  # the diverging tail would squash the interesting part: cut it off
            lowest = min(range(len(self.losses)), key=self.losses.__getitem__)
            top, bottom = max(self.losses[: lowest + 1]), self.losses[lowest]
            ax.set_ylim(bottom - 0.1 * (top - bottom), top + 0.25 * (top - bottom) + 1e-12)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="small")
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target, dpi=110)
        return fig


def _suggest(lrs: tuple[float, ...], losses: tuple[float, ...]) -> tuple[float | None, str]:
    """The steepest descent of the smoothed curve before its minimum, else a tenth of the minimum's lr."""
    n = len(losses)
    if n < 2:
        return None, "none"
    lowest = min(range(n), key=losses.__getitem__)
    first = max(n // 10, 1)  # the first points are noisy: the average has seen few losses
    if lowest - first < 2:
        return lrs[lowest] / 10, "minimum/10"
    x = [math.log10(lr) for lr in lrs]

    def slope(i: int) -> float:  # central difference: d loss / d log10(lr)
        return (losses[i + 1] - losses[i - 1]) / (x[i + 1] - x[i - 1])

    return lrs[min(range(first, lowest), key=slope)], "steepest"


class _ExponentialSweep:
    """A per-step LR scheduler: step ``i`` trains at ``min_lr * (max_lr / min_lr) ** (i / (n - 1))``.

    Not a ``torch.optim.lr_scheduler`` class: those add ``initial_lr`` to the
    param groups and wrap ``optimizer.step``, changes the sweep would leave behind.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, min_lr: float, max_lr: float, steps: int) -> None:
        self.optimizer = optimizer  # the Trainer checks that a scheduler belongs to its optimizer
        self.min_lr, self.max_lr, self.steps = min_lr, max_lr, steps
        self.done = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        fraction = min(step, self.steps - 1) / (self.steps - 1)
        return self.min_lr * math.pow(self.max_lr / self.min_lr, fraction)

    def _apply(self) -> None:
        lr = self.lr_at(self.done)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a tensor lr (capturable/fused): keep it one
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self) -> None:
        """Move to the next step's learning rate (the Trainer calls this after each optimizer step)."""
        self.done += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The number of steps done."""
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["done"]`` steps."""
        self.done = int(state["done"])
        self._apply()


class _SweepRecorder:
    """The sweep's plugin: records each optimizer step's loss and stops when it diverges."""

    name = "lr_find"

    def __init__(self, schedule: _ExponentialSweep, smooth: float, diverge: float | None) -> None:
        self.schedule, self.smooth, self.diverge = schedule, smooth, diverge
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self._sum, self._count = 0.0, 0
        self._average, self._best = 0.0, math.inf

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer, state: State, output: StepOutput) -> None:
        """Add the batch's loss to its step's; after a step, record it and check for divergence."""
        if output.loss is None:
            raise StepError(
                "lr_find needs each training step's loss, but training_step returned none; return the "
                "loss (a manual step may return it detached) so the sweep can follow it"
            )
        # One host sync per micro-batch: deciding when to stop needs every loss. A sweep is short.
        self._sum += float(output.loss)
        self._count += 1
        if state.micro_step:  # inside an accumulation group: no step yet
            return
        loss, self._sum, self._count = self._sum / self._count, 0.0, 0
        step = len(self.raw)
        lr = self.schedule.lr_at(step)
        self.raw.append(loss)
        self.lrs.append(lr)
        if not math.isfinite(loss):
            trainer.request_stop(f"lr_find: the loss became {loss} at lr {lr:.3g}")
            return
        self._average = self.smooth * self._average + (1 - self.smooth) * loss
        smoothed = self._average / (1 - self.smooth ** (step + 1))
        self._best = min(self._best, smoothed)
        if self.diverge is not None and step > 0 and smoothed > self.diverge * self._best:
            trainer.request_stop(
                f"lr_find: the smoothed loss {smoothed:.4g} exceeded diverge={self.diverge:g} times "
                f"its lowest {self._best:.4g} at lr {lr:.3g}"
            )

    @hookimpl
    def on_fit_end(self, state: State) -> None:
        """Under torchrun: average the curve over the processes, so every rank returns the same result."""
        dist = torch.distributed
        if state.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Every rank recorded the same number of steps: the distributed plugin stops all at one step.
            losses = torch.tensor(self.raw, dtype=torch.float64, device=state.device)
            dist.all_reduce(losses)
            self.raw = (losses / state.world_size).tolist()

    def result(self, stop_reason: str) -> LRFindResult:
        """The curve up to the first non-finite loss, smoothed."""
        end = next((i for i, loss in enumerate(self.raw) if not math.isfinite(loss)), len(self.raw))
        smoothed: list[float] = []
        average = 0.0
        for i, loss in enumerate(self.raw[:end]):
            average = self.smooth * average + (1 - self.smooth) * loss
            smoothed.append(average / (1 - self.smooth ** (i + 1)))
        return LRFindResult(tuple(self.lrs[:end]), tuple(smoothed), tuple(self.raw[:end]), stop_reason)


def _to_cpu(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor copied to CPU memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class _Snapshot:
    """Everything a sweep changes, copied to CPU memory so the sweep has the device's memory to itself."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Any, cuda: bool
    ) -> None:
        if cuda:  # the sweep would initialise CUDA: do it now, so its generators are saved too
            torch.cuda.init()  # type: ignore[no-untyped-call]
        # Each module's own tensors by name (a move may replace a buffer object), each tensor copied once.
        self.owners: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor, torch.device]] = {}
        for module in model.modules():
            for name, tensor in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]:
                self.owners.append((module, name, tensor))
                if id(tensor) not in self.copies:
                    self.copies[id(tensor)] = (tensor, _to_cpu(tensor), tensor.device)
        self.grads = [(p, None if p.grad is None else _to_cpu(p.grad)) for p in model.parameters()]
        self.modes = [(module, module.training) for module in model.modules()]
        self.optimizer, self.optimizer_state = optimizer, _to_cpu(optimizer.state_dict())
        self.rng = get_rng_state()
        self.mps_rng = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
        self.data = data
        self.generators = [(gen, gen.get_state()) for gen in data_generators(data)]
        stateful = callable(getattr(data, "state_dict", None)) and callable(
            getattr(data, "load_state_dict", None)
        )
        self.data_state = _to_cpu(data.state_dict()) if stateful else None

    def restore(self) -> None:
        """Put everything back: values, devices, the module's own tensor objects, gradients, modes."""
        with torch.no_grad():
            for tensor, saved, device in self.copies.values():
                tensor.data = saved.to(device)
            for module, name, tensor in self.owners:
                setattr(module, name, tensor)
            for p, grad in self.grads:
                p.grad = None if grad is None else grad.to(p.device)
        for module, training in self.modes:
            module.training = training
        self.optimizer.load_state_dict(self.optimizer_state)
        set_rng_state(self.rng)
        if self.mps_rng is not None:
            torch.mps.set_rng_state(self.mps_rng)
        for gen, state in self.generators:
            gen.set_state(state)
        if self.data_state is not None:
            self.data.load_state_dict(self.data_state)


def _check_arguments(
    optimizer: Any, min_lr: float, max_lr: float, num_steps: int, smooth: float, diverge: float | None
) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise StepError(
            f"lr_find sweeps one optimizer, got {type(optimizer).__name__}; pass "
            f"optimizer=torch.optim.SGD(model.parameters(), lr=...) (for several optimizers, sweep each "
            f"with a model made of its parameters)"
        )
    if not (0 < min_lr < max_lr) or not math.isfinite(max_lr):
        raise ConfigError(
            f"lr_find needs 0 < min_lr < max_lr (finite), got min_lr={min_lr!r}, max_lr={max_lr!r}; "
            f"e.g. min_lr=1e-7, max_lr=10"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ConfigError(f"lr_find needs num_steps >= 2 (an int), got {num_steps!r}; e.g. num_steps=100")
    if not 0 <= smooth < 1:
        raise ConfigError(
            f"lr_find needs 0 <= smooth < 1, got smooth={smooth!r}; e.g. 0.98 (0: no smoothing)"
        )
    if diverge is not None and not diverge > 1:
        raise ConfigError(f"lr_find needs diverge > 1 or None, got diverge={diverge!r}; e.g. 4.0")


def lr_find(
    trainer: Trainer,
    model: torch.nn.Module,
    train_data: Iterable[Any],
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Any = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.98,
    diverge: float | None = 4.0,
    plugins: Iterable[object] = (),
) -> LRFindResult:
    """Run the learning-rate range test: train briefly at growing learning rates, suggest one.

    Trains ``model`` for up to ``num_steps`` optimizer steps (as many epochs
    of ``train_data`` as that takes), the learning rate of every param group
    of ``optimizer`` growing exponentially from ``min_lr`` to ``max_lr``, and
    records each step's loss. Stops early when the smoothed loss exceeds
    ``diverge`` times its lowest value so far, or a loss is NaN or infinite.

    The sweep is a ``fit`` of a private Trainer built from ``trainer.config``
    with :data:`SWEEP_OVERRIDES` (no run folder, no checkpoints, no progress,
    no ``torch.compile``, non-finite losses stop it, installed entry-point
    plugins not loaded) and ``max_steps=num_steps``; everything else is the
    given Trainer's: device, strategy, precision, accumulation, gradient
    clipping, manual optimization, seed, ``limit_train_batches``,
    ``disable_plugins``. The given Trainer is not run and its plugins do not
    see the sweep; pass the plugins the sweep needs (a ``training_step`` of
    yours, say) in ``plugins``.

    Afterwards the model (parameters, buffers, gradients, device, train/eval
    modes), the optimizer (state and param groups, learning rates included),
    the random number generators (Python, NumPy, torch CPU, CUDA, MPS) and
    the data's own generators and ``state_dict`` are restored exactly, also
    when the sweep raised. The copies wait in CPU memory.

    Under torchrun every process calls ``lr_find`` and sweeps its shard of the
    data (the ``distributed`` plugin shards and wraps as in ``fit``); a stop is
    agreed by all processes, so all stop at the same step, and the curve is
    averaged over them: every rank gets the same result and suggestion.
    ``strategy="fsdp"`` on several processes is refused (sharding changes the
    model in place).

    Args:
        trainer: The Trainer whose config the sweep takes.
        model: The model to sweep.
        train_data: Training batches, as for ``fit``.
        optimizer: One optimizer over ``model``'s parameters (its learning rate
            is overwritten during the sweep and restored after it).
        loss_fn: As for ``fit``.
        min_lr: The learning rate of the first step.
        max_lr: The learning rate of step ``num_steps``.
        num_steps: The most optimizer steps the sweep takes.
        smooth: The factor of the exponential moving average of the loss
            (0: no smoothing).
        diverge: Stop when the smoothed loss exceeds this multiple of its
            lowest value (the loss is assumed positive); None: never.
        plugins: Plugins for the private Trainer.

    Returns:
        The :class:`LRFindResult`: the curve, the suggestion, ``plot()``.

    Raises:
        ConfigError: an argument is out of range.
        StepError: ``optimizer`` is not one optimizer, or the step returned no loss.
    """
    from dltrain.default_plugins.distributed import launched_by_torchrun
    from dltrain.trainer import Trainer

    if not isinstance(trainer, Trainer):
        raise ConfigError(
            f"lr_find takes the Trainer whose config the sweep uses, got {type(trainer).__name__}; "
            f"e.g. lr_find(dltrain.Trainer(device='cuda'), model, loader, optimizer=opt, loss_fn=...)"
        )
    _check_arguments(optimizer, min_lr, max_lr, num_steps, smooth, diverge)
    config = trainer.config
    several = torch.distributed.is_available() and (
        torch.distributed.is_initialized() or launched_by_torchrun()
    )
    if config.strategy == "fsdp" and several:
        raise ConfigError(
            "lr_find does not support strategy='fsdp' on several processes: sharding changes the model in "
            "place, so it could not be restored; run the sweep with strategy='ddp', or in one process"
        )
    cuda = torch.cuda.is_available() and (config.device == "auto" or config.device.startswith("cuda"))
    snapshot = _Snapshot(model, optimizer, train_data, cuda)
    schedule = _ExponentialSweep(optimizer, min_lr, max_lr, num_steps)
    recorder = _SweepRecorder(schedule, smooth, diverge)
    try:
        sweep = Trainer(config, plugins=[*plugins, recorder], **SWEEP_OVERRIDES, max_steps=num_steps)
        sweep.fit(
            model,
            train_data,
            optimizer=optimizer,
            loss_fn=loss_fn,
            scheduler={"scheduler": schedule, "interval": "step"},
        )
        stop_reason = sweep.state.stop_reason if sweep.state is not None else None
    finally:
        snapshot.restore()
    return recorder.result(stop_reason or "max_steps reached")
