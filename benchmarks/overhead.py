"""What dltrain's loop costs over a hand-written PyTorch loop, on MNIST-sized work.

Every variant trains the same MLP (784-128-64-10, the MNIST example's
``Net``) with SGD (lr 0.01) on the same in-memory batches of 100, one epoch
at a time: one model and one loader serve them all, so only the loop
differs. The variants run interleaved in one process, after a warm-up round.
Each round runs the plain loop, then a variant, then the plain loop, then
the next variant, and so on (in a rotating order); a variant's epoch divided
by the mean of the plain epochs right before and after it is one sample.
Every timed epoch follows an untimed epoch of the same loop: a real run is
many epochs of one loop, and an epoch right after a different loop runs a
few percent slower, whichever loop it is.
The table gives the median over rounds, so a drift in the machine's speed,
which neighbouring epochs share, cancels out. It also gives a 90% bootstrap
interval of that median, the extra time per step (median of the samples'
differences) and the ratio of the fastest epochs (noise only ever adds
time, so the fastest epochs are the least disturbed): a variant's fastest
epoch over the fastest of the plain epochs that followed it.

Variants:

- plain: the loop a careful PyTorch user writes (see ``_common.plain_epoch``).
- plain again: the same loop timed as if it were a variant, an A/A control.
  Its ratio is 1 plus measurement noise: a variant whose interval overlaps
  the control's cannot be told apart from the plain loop on this machine.
- dltrain: ``Trainer.fit`` with its default plugins (device, step, metrics:
  epoch loss and accuracy accumulated on the device), one ``fit`` call per epoch,
  so its per-run set-up is counted too.
- dltrain, train accuracy: the same with ``train_accuracy=True`` (accuracy of
  the training batches too, four more small tensor ops per step).
- dltrain, bare: every built-in plugin disabled (``disable_plugins=BUILTIN_PLUGINS``);
  a four-line ``training_step`` plugin supplies the loss. The loop alone.
- dltrain, EMA: the default plugins plus ``dltrain.callbacks.EMA(decay=0.999)``
  (an exponential moving average of the weights, one fused update per step).
- Lightning, Ignite: when installed.

    python benchmarks/overhead.py                   # 20 rounds on the full 60,000 images (8 min)
    python benchmarks/overhead.py --rounds 40       # a tighter interval (about 16 minutes)
    python benchmarks/overhead.py --quick           # seconds; a smoke test, not a measurement

The last line is ``RESULT overhead_ratio=<dltrain/plain> bare_ratio=<bare/plain>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import (
    default_data_dir,
    example_net,
    fmt,
    median,
    median_interval,
    mnist_tensors,
    plain_epoch,
    table,
)
from torch import nn

import dltrain
from dltrain.callbacks import EMA
from dltrain.data import InMemoryLoader


class MinimalStep:
    """The least a run needs once the built-ins are off: a loss from a batch."""

    name = "minimal_step"

    @dltrain.hookimpl
    def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        loss: torch.Tensor = trainer.loss_fn(model(inputs), targets)
        return loss


EpochFn = Callable[[], None]

CONTROL = "plain loop again (A/A control)"


def _plain(model: nn.Module, loader: InMemoryLoader) -> EpochFn:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def epoch() -> None:
        plain_epoch(model, opt, loss_fn, loader)

    return epoch


def _dltrain(model: nn.Module, loader: InMemoryLoader, device: str, **config: Any) -> EpochFn:
    """One epoch of ``Trainer.fit``. By default every default built-in is on: device, step,
    metrics, the progress line (printed into a buffer, as into a log file) and the metric log
    (written to a temporary run directory). Installed third-party plugins are not loaded."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    settings: dict[str, Any] = {
        "progress": "line",
        "run_dir": tempfile.mkdtemp(prefix="dltrain-bench-"),
        "autoload_plugins": False,
        **config,
    }
    trainer = dltrain.Trainer(max_epochs=1, device=device, seed=None, **settings)
    loss_fn = nn.CrossEntropyLoss()
    sink = io.StringIO()

    def epoch() -> None:
        sink.seek(0)
        sink.truncate()
        with contextlib.redirect_stdout(sink):
            trainer.fit(model, loader, optimizer=opt, loss_fn=loss_fn)

    return epoch


def _lightning(model: nn.Module, loader: InMemoryLoader, device: str) -> EpochFn | str:
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L
        except ImportError:
            return "not installed"

    class Module(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss: torch.Tensor = self.loss_fn(self.net(x), y)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    accelerator = "gpu" if device.startswith("cuda") else "cpu"

    def epoch() -> None:
        trainer = L.Trainer(
            max_epochs=1,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train_dataloaders=loader)

    return epoch


def _ignite(model: nn.Module, loader: InMemoryLoader, device: str) -> EpochFn | str:
    try:
        from ignite.engine import create_supervised_trainer
    except ImportError:
        return "not installed"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = create_supervised_trainer(model, opt, nn.CrossEntropyLoss(), device=device)

    def epoch() -> None:
        engine.run(loader, max_epochs=1)

    return epoch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding MNIST/raw/")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one epoch of each)")
    parser.add_argument("--quick", action="store_true", help="2,000 images, 2 rounds: seconds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one keeps timings stable on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")

    x, y, source = mnist_tensors(args.data_dir, train=True, limit=2000 if args.quick else None)
    device = args.device
    torch.manual_seed(0)
    template = example_net()()

    variants: dict[str, EpochFn | str] = {}
    # Every variant trains the same model on the same batches (one loader), so the only
    # difference between them is the loop; each framework gets its own SGD (stateless).
    model = copy.deepcopy(template).to(device)
    loader = InMemoryLoader(x, y, batch_size=100, shuffle=True, seed=0, device=device)
    plain = _plain(model, loader)
    variants[CONTROL] = plain  # the plain loop again, timed as a variant: the noise floor
    variants["dltrain (default plugins)"] = _dltrain(model, loader, device)
    variants["dltrain, train_accuracy=True"] = _dltrain(model, loader, device, train_accuracy=True)
    variants["dltrain, bare (all built-ins off)"] = _dltrain(
        model, loader, device, disable_plugins=dltrain.BUILTIN_PLUGINS, plugins=[MinimalStep()]
    )
    variants["dltrain, EMA(decay=0.999)"] = _dltrain(model, loader, device, plugins=[EMA(decay=0.999)])
    variants["Lightning"] = _lightning(model, loader, device)
    variants["Ignite"] = _ignite(model, loader, device)
    others = [name for name, fn in variants.items() if callable(fn)]
    # per variant, per round: (its epoch, the plain epoch before it, the plain epoch after it)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in others}

    def timed(fn: EpochFn) -> float:
        # A training run is many epochs of one loop, not alternating loops: an epoch right
        # after another loop's runs measurably slower (a few percent here, whatever the
        # loop), so each timed epoch follows an untimed epoch of the same loop.
        fn()
        gc.collect()  # garbage left by the untimed epoch is not charged to the timed one
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # Each round: plain, A, plain, B, plain, ... in a rotating order. A variant's epoch is
    # compared with the mean of the plain epochs right before and after it, so a drift in
    # the machine's speed (which neighbouring epochs share) cancels out to first order.
    for r in range(rounds + 1):  # round 0 warms up and is not counted
        shift = r % len(others)
        before = timed(plain)
        for name in others[shift:] + others[:shift]:
            fn = variants[name]
            assert callable(fn)
            t_variant = timed(fn)
            after = timed(plain)
            if r:
                samples[name].append((t_variant, before, after))
            before = after

    steps = len(loader)
    rows = []
    ratios: dict[str, float] = {}
    plain_times = [after for runs in samples.values() for _, _, after in runs]
    rows.append(["plain loop", f"{median(plain_times):.3f}", "", fmt(1.0), "", "", ""])
    for name, fn in variants.items():
        if not callable(fn):
            rows.append([name, fn, "", "", "", "", ""])
            continue
        times = [t for t, _, _ in samples[name]]
        baseline = [(before + after) / 2 for _, before, after in samples[name]]
        per_round = [t / b for t, b in zip(times, baseline, strict=True)]
        extra_us = median([1e6 * (t - b) / steps for t, b in zip(times, baseline, strict=True)])
        ratios[name] = median(per_round)
        low, high = median_interval(per_round)
        # the fastest of the plain epochs right after this variant's: as many tries as the
        # variant's own (the fastest of all plain epochs would be biased low against any one)
        fastest_plain = min(after for _, _, after in samples[name])
        fastest = min(times) / fastest_plain
        rows.append(
            [
                name,
                f"{median(times):.3f}",
                f"{extra_us:+.0f}",
                fmt(ratios[name]),
                f"{low:.3f}-{high:.3f}",
                fmt(fastest),
                f"{1e6 * (min(times) - fastest_plain) / steps:+.0f}",
            ]
        )
    print(f"data: {source}; {len(x)} images, batch 100, {steps} steps per epoch")
    print(
        f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{rounds} rounds after 1 warm-up" + ("; --quick: not a measurement" if args.quick else "")
    )
    print()
    header = [
        "variant",
        "epoch s (median)",
        "µs/step over plain",
        "ratio to plain",
        "90% interval",
        "fastest/fastest",
        "µs/step (fastest)",
    ]
    print(table(header, rows))
    print()
    print(
        f"RESULT overhead_ratio={fmt(ratios['dltrain (default plugins)'], 4)} "
        f"bare_ratio={fmt(ratios['dltrain, bare (all built-ins off)'], 4)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
