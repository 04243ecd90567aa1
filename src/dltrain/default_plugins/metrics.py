"""Built-in plugin ``metrics``: exact epoch loss, accuracy and custom metrics.

Accuracy is reported for evaluation (validate, test) by default, and for
training only when asked (``train_accuracy=True``): during training it is a
running figure over batches seen in train mode (dropout on, weights moving),
and it costs four small tensor operations per step, a tax on every short step.

Values are accumulated on the device as sums and counts (never a mean of
batch means, never a host sync per step) and turned into floats once per
epoch by the Trainer. Under distributed training the sums and counts are
all-reduced, so every rank reports the metric of the whole data set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

from dltrain._markers import hookimpl
from dltrain._running import stack_scalars
from dltrain.errors import DltrainError
from dltrain.metrics import Metric, phases_of
from dltrain.state import Phase

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State, StepOutput
    from dltrain.trainer import Trainer

__all__ = ["MetricsPlugin", "StatefulMetric", "looks_like_classification"]


@runtime_checkable
class StatefulMetric(Protocol):
    """The protocol of torchmetrics' ``Metric``: ``update``, ``compute``, ``reset``."""

    def update(self, outputs: Any, targets: Any) -> None: ...

    def compute(self) -> Any: ...

    def reset(self) -> None: ...


MetricFn = Callable[[Any, Any], Any]


def looks_like_classification(outputs: Any, targets: Any) -> bool:
    """True when ``outputs`` are class scores ``(N, C)`` and ``targets`` class indices ``(N,)``."""
    return (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.is_floating_point()
        and outputs.dim() >= 2
        and not targets.is_floating_point()
        and not targets.is_complex()
        and targets.shape == outputs.shape[:-1]
    )


class _Sums:
    """The sums of one epoch, on the device: loss, correct predictions, custom metrics, counts.

    A batch's loss is appended to ``pending`` as it is (a list append: no
    kernel launch, no host sync). Every ``_FOLD`` batches, and when the batch
    size changes, the pending losses are folded into ``loss`` with one
    stack-and-sum. The fold points depend only on the batches seen, and the
    pending losses are checkpointed as they are, so a resumed epoch sums in
    the same order as an uninterrupted one and reports the same bits.
    Correct predictions and custom metrics are added in place each batch.
    """

    __slots__ = (
        "correct",
        "count",
        "custom",
        "loss",
        "loss_count",
        "named",
        "named_count",
        "pending",
        "pending_bs",
    )

    def __init__(self, device: torch.device, n_custom: int) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.custom = torch.zeros(n_custom, dtype=torch.float64, device=device)
        self.count = 0
        self.loss_count = 0
        self.pending: list[torch.Tensor] = []  # losses of batches of pending_bs samples, not summed yet
        self.pending_bs = 0
        self.named: dict[str, torch.Tensor] = {}  # named losses (StepOutput.losses): weighted sums
        self.named_count: dict[str, int] = {}

    def add_named(self, losses: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Add a batch's named losses, each weighted by the batch's size (device ops, no sync)."""
        for name, value in losses.items():
            total = self.named.get(name)
            if total is None:
                total = self.named[name] = torch.zeros((), dtype=torch.float64, device=self.loss.device)
            total.add_(value.detach().reshape(()).to(torch.float64), alpha=batch_size)
            self.named_count[name] = self.named_count.get(name, 0) + batch_size

    def add_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Add one batch's (detached) mean loss, weighted by the batch's size."""
        self.loss_count += batch_size
        if batch_size != self.pending_bs or len(self.pending) >= _FOLD:
            self.fold()
            self.pending_bs = batch_size
        self.pending.append(loss)

    def fold(self) -> None:
        """Add the pending losses to ``loss`` (device ops, no sync)."""
        if self.pending:
            self.loss.add_(_weighted_sum(self.pending, self.pending_bs))
            self.pending = []

    def total_loss(self) -> torch.Tensor:
        """The loss sum so far, pending losses included; nothing changes."""
        return self.loss + _weighted_sum(self.pending, self.pending_bs) if self.pending else self.loss

    def packed(self) -> torch.Tensor:
        """``[loss, correct, *custom, *named, *named counts, count, loss_count]`` in one float64 tensor,
        to all-reduce (named losses in the order of ``self.named``)."""
        device = self.loss.device
        counts = torch.tensor([self.count, self.loss_count], dtype=torch.float64, device=device)
        loss, correct = self.total_loss().reshape(1), self.correct.to(torch.float64).reshape(1)
        named = [t.reshape(1) for t in self.named.values()]
        named_counts = torch.tensor(
            [self.named_count[k] for k in self.named], dtype=torch.float64, device=device
        )
        return torch.cat([loss, correct, self.custom, *named, named_counts, counts])

    def unpack(self, packed: torch.Tensor) -> dict[str, Any]:
        """The parts of :meth:`packed` (all-reduced or not), by name; named losses as sum and count."""
        c, n = self.custom.numel(), len(self.named)
        return {
            "loss": packed[0],
            "correct": packed[1],
            "custom": packed[2 : 2 + c],
            "named": {k: (packed[2 + c + i], packed[2 + c + n + i]) for i, k in enumerate(self.named)},
            "count": packed[-2],
            "loss_count": packed[-1],
        }


ALL = frozenset({Phase.TRAIN, Phase.VALIDATE, Phase.TEST})

# Pending batch losses are summed every this many batches: one stack of a few KB,
# instead of a type-promoting in-place add (a kernel launch) per batch.
_FOLD = 256


def _weighted_sum(losses: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """``batch_size * sum(losses)`` in float64; losses may be 0-d or of shape (1,)."""
    return stack_scalars(losses).to(torch.float64).sum() * batch_size


class MetricsPlugin:
    """Mean loss, accuracy and user metrics per epoch, for every phase.

    Args:
        accuracy: ``"auto"`` reports accuracy when outputs and targets look
            like classification (see :func:`looks_like_classification`),
            ``"always"`` always, ``"never"`` never.
        train_accuracy: Also report accuracy for training epochs (by default
            only evaluation reports it).
        metrics: Extra metrics by name: a callable ``(outputs, targets) ->
            scalar tensor`` (the batch's mean value; the epoch value is the
            batch-size-weighted mean), an object with torchmetrics'
            ``update``/``compute``/``reset``, or either wrapped in a
            :class:`dltrain.metrics.Metric` to choose its phases.
        report_loss: Whether to report the mean ``loss``; turn it off in a
            second instance that only adds custom metrics.
        name: Plugin name; give a second instance another name.
    """

    def __init__(
        self,
        accuracy: Literal["auto", "always", "never"] = "auto",
        metrics: Mapping[str, MetricFn | StatefulMetric] | None = None,
        *,
        train_accuracy: bool = False,
        report_loss: bool = True,
        name: str = "metrics",
    ) -> None:
        self.name = name
        self._report_loss = report_loss
        self._accuracy = accuracy
        self._train_accuracy = train_accuracy
        self._fns: dict[str, MetricFn] = {}
        self._stateful: dict[str, StatefulMetric] = {}
        self._phases: dict[str, frozenset[Phase]] = {}  # where each custom metric runs
        self._live: list[tuple[int, MetricFn]] = []  # this epoch's batch functions, by index
        for key, metric in (metrics or {}).items():
            phases = ALL
            if isinstance(metric, Metric):
                metric, phases = metric.fn, phases_of(metric.phases, f"metric {key!r}")
            self._phases[key] = phases
            if isinstance(metric, StatefulMetric):
                self._stateful[key] = metric
            elif callable(metric):
                self._fns[key] = metric
            else:
                raise DltrainError(
                    f"metric {key!r} is a {type(metric).__name__}; pass a callable "
                    f"(outputs, targets) -> tensor or an object with update/compute/reset"
                )
        self._sums: _Sums | None = None
        self._classify: bool | None = None
        self._resumed = False

    # -- accumulation --------------------------------------------------------

    def _start(self, state: State) -> None:
        phase = state.phase
        self._live = [(i, fn) for i, (k, fn) in enumerate(self._fns.items()) if phase in self._phases[k]]
        resumed, self._resumed = self._resumed, False
        if resumed and phase is Phase.TRAIN and state.batch_idx > 0:
            return  # continuing an epoch restored from a checkpoint: keep its sums
        self._sums = None
        self._classify = None
        for key, metric in self._stateful.items():
            if phase in self._phases[key]:
                metric.reset()

    @hookimpl
    def on_train_epoch_start(self, state: State) -> None:
        """Reset the sums for a new training epoch."""
        self._start(state)

    @hookimpl
    def on_eval_epoch_start(self, state: State) -> None:
        """Reset the sums for a new evaluation."""
        self._start(state)

    def _update(self, state: State, output: StepOutput) -> None:
        sums = self._sums
        if sums is None:
            sums = self._sums = _Sums(state.device, len(self._fns))
        bs = output.batch_size
        sums.count += bs
        loss = output.loss
        if loss is not None and self._report_loss:
            sums.add_loss(loss.detach() if loss.requires_grad else loss, bs)
        if output.losses:
            sums.add_named(output.losses, bs)
        outputs, targets = output.outputs, output.targets
        if targets is None:
            return
        if self._classify is None:
            wanted = self._train_accuracy or state.phase is not Phase.TRAIN
            self._classify = wanted and (
                self._accuracy == "always"
                or (self._accuracy == "auto" and looks_like_classification(outputs, targets))
            )
        if self._classify:
            sums.correct.add_((outputs.argmax(-1) == targets).sum())  # integer ops: no autograd graph
        if self._live:  # the custom batch metrics of this phase
            for i, fn in self._live:
                sums.custom[i].add_(torch.as_tensor(fn(outputs.detach(), targets)).detach(), alpha=bs)
        if self._stateful:
            for key, metric in self._stateful.items():
                if state.phase in self._phases[key]:
                    metric.update(outputs.detach(), targets)

    @hookimpl
    def on_train_batch_end(self, state: State, output: StepOutput) -> None:
        """Add the batch's loss (and accuracy, custom metrics) to the epoch's sums."""
        self._update(state, output)

    @hookimpl
    def on_eval_batch_end(self, state: State, output: StepOutput) -> None:
        """Add the batch's loss (and accuracy, custom metrics) to the evaluation's sums."""
        self._update(state, output)

    # -- reporting -----------------------------------------------------------

    @hookimpl
    def compute_metrics(self, trainer: Trainer, state: State) -> dict[str, Any] | None:
        """Epoch means from the sums, all-reduced across processes when distributed."""
        sums = self._sums
        if sums is None:
            return None
        packed = sums.packed()
        if state.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        parts = sums.unpack(packed)
        correct, custom, count = parts["correct"], parts["custom"], parts["count"]
        result: dict[str, Any] = {}
        if sums.loss_count:
            result["loss"] = parts["loss"] / parts["loss_count"]
        for key, (total, named_count) in parts["named"].items():
            result[key] = total / named_count
        if self._classify:
            result["accuracy"] = correct / count
        for i, _ in self._live:
            result[list(self._fns)[i]] = custom[i] / count
        for key, metric in self._stateful.items():
            if state.phase in self._phases[key]:
                result[key] = metric.compute()
        return result

    @hookimpl
    def state_dict(self, trainer: Trainer) -> dict[str, Any] | None:
        """The sums of the epoch in progress, so a resumed epoch reports exact means.

        In one process the losses not yet folded into the sum are saved as
        they are, so the resumed epoch folds them where the uninterrupted one
        would have. Under distributed training they are the sums of all ranks
        (an all-reduce: every rank must call this, as the checkpoint plugin does).
        """
        sums = self._sums
        if sums is None:
            return None
        state = trainer.state
        pending = sums.pending
        if state is not None and state.world_size > 1 and torch.distributed.is_initialized():
            packed = sums.packed()
            torch.distributed.all_reduce(packed)
            parts = sums.unpack(packed)
            loss, correct, custom = parts["loss"], parts["correct"].to(torch.int64), parts["custom"]
            count, loss_count = int(parts["count"]), int(parts["loss_count"])
            named = {k: (t.cpu(), int(n)) for k, (t, n) in parts["named"].items()}
            pending = []
        else:
            loss, correct, custom = sums.loss, sums.correct, sums.custom
            count, loss_count = sums.count, sums.loss_count
            named = {k: (t.cpu(), sums.named_count[k]) for k, t in sums.named.items()}
        return {
            "named": {k: t for k, (t, _) in named.items()},
            "named_count": {k: n for k, (_, n) in named.items()},
            "loss": loss.cpu(),
            "pending": stack_scalars(pending).cpu() if pending else torch.zeros(0),
            "pending_batch_size": sums.pending_bs if pending else 0,
            "correct": correct.cpu(),
            "custom": custom.cpu(),
            "count": count,
            "loss_count": loss_count,
            "classify": self._classify,
        }

    @hookimpl
    def load_state_dict(self, trainer: Trainer, state_dict: dict[str, Any]) -> None:
        """Restore the sums; the resumed epoch's start keeps them.

        They are the sums of all ranks of the saving run: under distributed
        training rank 0 takes them and the other ranks start from zero, so the
        all-reduced epoch metrics count every sample once, whatever the number
        of processes before and after.
        """
        device = trainer.state.device if trainer.state is not None else torch.device("cpu")
        sums = _Sums(device, len(self._fns))
        self._sums, self._classify, self._resumed = sums, state_dict["classify"], True
        if trainer.state is not None and trainer.state.rank != 0:
            return
        pending = state_dict.get("pending")  # absent from checkpoints of earlier versions
        losses = list(pending.to(device).unbind()) if pending is not None and pending.numel() else []
        pending_bs = int(state_dict.get("pending_batch_size", 0))
        sums.loss.copy_(state_dict["loss"])
        sums.correct.copy_(state_dict["correct"])
        sums.pending, sums.pending_bs = losses, pending_bs
        if sums.custom.numel() == state_dict["custom"].numel():
            sums.custom.copy_(state_dict["custom"])
        sums.count = int(state_dict["count"])
        sums.loss_count = int(state_dict["loss_count"])
        sums.named = {k: v.to(device) for k, v in state_dict.get("named", {}).items()}
        sums.named_count = {k: int(v) for k, v in state_dict.get("named_count", {}).items()}


def make_plugin(config: TrainerConfig) -> MetricsPlugin:
    """The factory the plugin manager calls."""
    return MetricsPlugin(accuracy=config.accuracy, train_accuracy=config.train_accuracy)
