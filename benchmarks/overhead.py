"""What dltrain's loop costs over a hand-written PyTorch loop, on MNIST-sized work.

Every variant trains its own copy of the same MLP (784-128-64-10, the MNIST
example's ``Net``) with SGD (lr 0.01) on the same in-memory batches of 100,
one epoch at a time. The variants run interleaved in one process (one epoch
of each per round, in a rotating order, after a warm-up round), and the
ratio to the plain loop is taken per round, then the median over rounds:
so drift in the machine's speed hits all variants alike.

Variants:

- plain: the loop a careful PyTorch user writes (see ``_common.plain_epoch``).
- dltrain: ``Trainer.fit`` with its default plugins (device, step, metrics:
  epoch loss and accuracy accumulated on the device), one ``fit`` call per epoch,
  so its per-run set-up is counted too.
- dltrain, no accuracy: the same with ``accuracy="never"``.
- dltrain, bare: every built-in plugin disabled (``disable_plugins=BUILTIN_PLUGINS``);
  a four-line ``training_step`` plugin supplies the loss. The loop alone.
- Lightning, Ignite: when installed.

    python benchmarks/overhead.py                   # 5 rounds on the full 60,000 images
    python benchmarks/overhead.py --quick           # seconds; a smoke test, not a measurement

The last line is ``RESULT overhead_ratio=<dltrain/plain> bare_ratio=<bare/plain>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
    mnist_tensors,
    plain_epoch,
    table,
)
from torch import nn

import dltrain
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
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one epoch of each)")
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

    # Each fit starts a new run at epoch 0, so every round of a dltrain variant
    # sees the same shuffle; that changes no timing.
    def loader() -> InMemoryLoader:
        return InMemoryLoader(x, y, batch_size=100, shuffle=True, seed=0, device=device)

    def model() -> nn.Module:
        return copy.deepcopy(template).to(device)

    variants["plain loop"] = _plain(model(), loader())
    variants["dltrain (default plugins)"] = _dltrain(model(), loader(), device)
    variants["dltrain, accuracy='never'"] = _dltrain(model(), loader(), device, accuracy="never")
    variants["dltrain, bare (all built-ins off)"] = _dltrain(
        model(),
        loader(),
        device,
        disable_plugins=dltrain.BUILTIN_PLUGINS,
        plugins=[MinimalStep()],
    )
    variants["Lightning"] = _lightning(model(), loader(), device)
    variants["Ignite"] = _ignite(model(), loader(), device)
    runnable = [name for name, fn in variants.items() if callable(fn)]

    times: dict[str, list[float]] = {name: [] for name in runnable}
    for r in range(rounds + 1):  # round 0 warms up and is not counted
        shift = r % len(runnable)
        for name in runnable[shift:] + runnable[:shift]:
            fn = variants[name]
            assert callable(fn)
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)

    base = times["plain loop"]
    rows = []
    ratios: dict[str, float] = {}
    for name, fn in variants.items():
        if not callable(fn):
            rows.append([name, fn, "", "", ""])
            continue
        per_round = [t / b for t, b in zip(times[name], base, strict=True)]
        ratios[name] = median(per_round)
        steps = len(loader())
        rows.append(
            [
                name,
                f"{median(times[name]):.3f}",
                f"{1e3 * median(times[name]) / steps:.3f}",
                fmt(ratios[name]),
                f"{min(per_round):.3f}-{max(per_round):.3f}",
            ]
        )
    print(f"data: {source}; {len(x)} images, batch 100, {len(loader())} steps per epoch")
    print(
        f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{rounds} rounds after 1 warm-up" + ("; --quick: not a measurement" if args.quick else "")
    )
    print()
    print(table(["variant", "epoch s (median)", "ms/step", "ratio to plain", "ratio range"], rows))
    print()
    print(
        f"RESULT overhead_ratio={fmt(ratios['dltrain (default plugins)'], 4)} "
        f"bare_ratio={fmt(ratios['dltrain, bare (all built-ins off)'], 4)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
