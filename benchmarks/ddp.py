"""What dltrain costs over a plain DistributedDataParallel loop, under torchrun.

Two processes (``torchrun --nproc-per-node=2``, Gloo, one CPU thread each)
train the MNIST example's network (784-128-64-10, SGD lr 0.01) on in-memory
tensors, batch 100 per process, each on its half of the data (300 steps per
process per epoch on the 60,000 images). One ``Trainer.fit`` with the default
plugins (metrics, the progress line, the metric log, the distributed plugin's
DDP wrapper, shard and stop agreement) runs all the dltrain epochs; after each
of them, inside a plugin hook and outside its timed window, a plain DDP
epoch runs on a model of its own: the hand-written loop a careful user writes
(``DistributedSampler``, ``DistributedDataParallel``, the loss summed on the
device). So the two alternate, epoch by epoch, and a drift in the machine's
speed cancels out: a sample is a dltrain epoch over the mean of the plain
epochs before and after it. The first pair is a warm-up.

    python benchmarks/ddp.py --data-dir DIR          # 12 rounds (several minutes)
    python benchmarks/ddp.py --quick                 # seconds; a smoke test, not a measurement

Started without torchrun, the script starts itself under torchrun. The last
line is ``RESULT ddp_overhead_ratio=<dltrain epoch / plain epoch (median)>``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from _common import default_data_dir, example_net, fmt, median, median_interval, mnist_tensors, table
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dltrain


class PlainDDP:
    """The plain loop: its own model in DistributedDataParallel, its own sharded loader."""

    def __init__(self, dataset: TensorDataset, batch_size: int) -> None:
        torch.manual_seed(0)
        self.model = nn.parallel.DistributedDataParallel(example_net()())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()
        self.sampler = DistributedSampler(dataset, shuffle=True, seed=0)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler)
        self.epoch = 0
        self.times: list[float] = []

    def run_epoch(self) -> None:
        """One timed epoch."""
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        self.model.train()
        start = time.perf_counter()
        running = None
        for x, y in self.loader:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            running = loss.detach() if running is None else running + loss.detach()
        assert running is not None
        float(running)  # the one read of the epoch, as the metrics plugin makes
        self.times.append(time.perf_counter() - start)


class Alternate:
    """Times each dltrain training epoch; after it, outside the timed window, runs a plain epoch."""

    name = "bench_alternate"

    def __init__(self, plain: PlainDDP) -> None:
        self.plain = plain
        self.times: list[float] = []
        self._start = 0.0

    @dltrain.hookimpl(tryfirst=True)
    def on_train_epoch_start(self) -> None:
        self._start = time.perf_counter()

    @dltrain.hookimpl(trylast=True)
    def on_train_epoch_end(self) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.plain.run_epoch()


def worker(args: argparse.Namespace) -> int:
    """One process of the torchrun job."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    limit = 2000 if args.quick else None
    x, y, source = mnist_tensors(args.data_dir, train=True, limit=limit)
    dataset = TensorDataset(x, y)
    plain = PlainDDP(dataset, args.batch_size)
    plain.run_epoch()  # the plain loop's own warm-up, before the first pair
    rounds = 2 if args.quick else args.rounds
    alternate = Alternate(plain)
    torch.manual_seed(0)
    model = example_net()()
    trainer = dltrain.Trainer(
        max_epochs=rounds + 1, device="cpu", progress="line", run_dir=tempfile.mkdtemp(prefix="dltrain-ddp-"),
        autoload_plugins=False, plugins=[alternate],
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(
            model, DataLoader(dataset, batch_size=args.batch_size, shuffle=True),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss_fn=nn.CrossEntropyLoss(),
        )  # fmt: skip
    steps = len(plain.loader)
    # Epoch i of dltrain ran between plain epochs i and i + 1 (plain epoch 0 is the warm-up).
    ratios = [d / ((plain.times[i] + plain.times[i + 1]) / 2) for i, d in enumerate(alternate.times)][1:]
    extra_us = [
        (d - (plain.times[i] + plain.times[i + 1]) / 2) / steps * 1e6 for i, d in enumerate(alternate.times)
    ][1:]
    if rank == 0:
        low, high = median_interval(ratios)
        print(f"data: {source}; {len(dataset)} images, batch {args.batch_size} per process, {steps} steps "
              f"per process per epoch")  # fmt: skip
        print(f"processes: {world} (torchrun, gloo, 1 CPU thread each); torch {torch.__version__}; "
              f"{len(ratios)} rounds after a warm-up")  # fmt: skip
        print()
        rows = [
            ["plain DDP loop", fmt(median(plain.times[2:])), "", "1.000", ""],
            ["dltrain (default plugins)", fmt(median(alternate.times[1:])), f"{median(extra_us):+.0f}",
             fmt(median(ratios)), f"{fmt(low)}-{fmt(high)}"],
        ]  # fmt: skip
        print(table(["variant", "epoch s (median)", "µs/step over plain", "ratio", "90% interval"], rows))
        print(f"RESULT ddp_overhead_ratio={median(ratios):.4f}")
    # Free the DDP models (each holds the group) before destroying the group, so that destroying it
    # joins Gloo's threads now, not while the interpreter shuts down (which can abort the process).
    del plain, alternate, trainer, model
    gc.collect()
    dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding MNIST/raw/")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one epoch of each loop)")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size per process")
    parser.add_argument("--quick", action="store_true", help="2,000 images, 2 rounds: seconds")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    env: dict[str, Any] = {**os.environ, "OMP_NUM_THREADS": "1", "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]  # fmt: skip
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
