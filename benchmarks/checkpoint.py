"""How long a checkpoint save holds up training: synchronous and asynchronous saves, against a bare
``torch.save``, and the memory each needs.

Models: MLPs of about 10M, 50M and 200M parameters (``Linear(w, w)`` layers with
ReLU) trained with SGD with momentum, so a checkpoint holds the weights and as
many momentum values: about 80 MB, 400 MB and 1.6 GB. Batches of 4 random
vectors keep a training step short next to a save.

For each size, in processes forked from this one (so each peak RSS is its own):

- **bare torch.save**: ``torch.save({"model": ..., "optimizer": ...}, path)``
  into the page cache (no fsync, no checksum): what a hand-written loop pays.
  The same process times the parts of a synchronous dltrain save: the whole
  :func:`dltrain.checkpoint.save_checkpoint` (hashed while written, fsynced,
  manifest committed), the fsync alone, and, for loading, the checksum
  verification (read back and hash) and ``torch.load``.
- **none / sync / async**: ``Trainer.fit`` with checkpointing off, with
  ``async_save=False``, and with ``async_save=True``, saving every N steps, N
  chosen so that the steps between two saves take about 2.5 times a
  synchronous save (a background save, slowed down by training beside it,
  then finishes before the next one). The stall of a save is the time of the
  training batch's end hook (timed from outside, by an outermost wrapper) in
  a batch that saved, less the median of the batches that did not; the
  median over the saves after the first (the first asynchronous save also
  allocates its buffers, so it is shown apart). The table also gives the extra time
  of the whole run per save over the run without checkpoints, which adds
  what the background writer takes from training (CPU and memory bandwidth),
  and each process's peak RSS.

    python benchmarks/checkpoint.py                 # 10M, 50M, 200M parameters (about 15 minutes)
    python benchmarks/checkpoint.py --sizes 50M     # one size
    python benchmarks/checkpoint.py --quick         # tiny models: seconds; a smoke test, not a measurement

The last line is ``RESULT stall_ratio=<async stall / sync stall at 50M>
memory_ratio=<peak RSS with async saves / with sync saves at 50M>`` (with
``--quick``, at the middle tiny model).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import fmt, median, table
from torch import nn

import dltrain
from dltrain.checkpoint import save_checkpoint, verify_checkpoint


@dataclass(frozen=True)
class Size:
    name: str
    width: int
    depth: int


SIZES = (Size("10M", 1024, 10), Size("50M", 2048, 12), Size("200M", 4096, 12))
QUICK_SIZES = (Size("0.1M", 128, 6), Size("0.5M", 256, 8), Size("2M", 512, 8))
BATCH = 4


def make_model(size: Size) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(size.depth):
        layers += [nn.Linear(size.width, size.width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def make_batches(size: Size, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, size.width, generator=gen), torch.randint(0, size.width, (BATCH,), generator=gen))
        for _ in range(count)
    ]


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if os.uname().sysname == "Darwin" else peak / 1024


def _timed(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


# -- the worker processes --------------------------------------------------------------------------


def bare(size: Size, folder: Path, reps: int) -> dict[str, Any]:
    """The bare torch.save, the parts of a dltrain save and of loading, and a training step's time."""
    model, batches = make_model(size), make_batches(size)
    opt, loss_fn = make_optimizer(model), nn.CrossEntropyLoss()

    def step() -> None:
        x, y = batches[0]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # momentum buffers exist from here on
    step_s = _timed(step, 5)
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    path = folder / "bare.pt"
    bare_s = _timed(lambda: torch.save(payload, path), reps)
    nbytes = path.stat().st_size
    data = path.read_bytes()
    hash_s = _timed(lambda: hashlib.sha256(data).hexdigest(), reps)
    data = b""

    def save_and_fsync() -> None:
        with open(path, "wb") as f:
            torch.save(payload, f)
            f.flush()
            start = time.perf_counter()
            os.fsync(f.fileno())
            fsyncs.append(time.perf_counter() - start)

    fsyncs: list[float] = []
    for _ in range(reps):
        save_and_fsync()
    infos = []

    def dltrain_save() -> None:
        infos.append(
            save_checkpoint({**payload, "loop": {"global_step": len(infos)}}, folder / "ckpt", keep_last=1)
        )

    sync_save_s = _timed(dltrain_save, reps)
    verify_s = _timed(lambda: verify_checkpoint(infos[-1].payload_path), reps)
    load_s = _timed(lambda: torch.load(infos[-1].payload_path, weights_only=True), reps)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": nbytes,
        "step_s": step_s,
        "bare_s": bare_s,
        "hash_s": hash_s,
        "fsync_s": median(fsyncs),
        "sync_save_s": sync_save_s,
        "verify_s": verify_s,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
    }


class BatchEndTimer:
    """Times each training batch's whole ``on_train_batch_end`` (outermost wrapper: saves included)."""

    name = "bench_batch_end_timer"

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    @dltrain.hookimpl(wrapper=True, tryfirst=True)
    def on_train_batch_end(self, state: dltrain.State) -> Generator[None, None, None]:
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.times[state.global_step] = time.perf_counter() - start


def train(size: Size, folder: Path, mode: str, interval: int, saves: int) -> dict[str, Any]:
    """``Trainer.fit`` saving every ``interval`` steps ``saves`` times, then ``interval - 1`` steps more."""
    model, batches = make_model(size), make_batches(size)
    timer = BatchEndTimer()
    checkpoint = None
    if mode != "none":
        checkpoint = {
            "dir": folder / f"ckpt-{mode}",
            "every_n_steps": interval,
            "every_n_epochs": None,
            "save_on_fit_end": False,
            "keep_last": 2,
            "async_save": mode == "async",
        }
    trainer = dltrain.Trainer(
        max_steps=(saves + 1) * interval - 1,
        max_epochs=10**9,
        device="cpu",
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint=checkpoint,
        plugins=[timer],
    )
    start = time.perf_counter()
    trainer.fit(model, batches, optimizer=make_optimizer(model), loss_fn=nn.CrossEntropyLoss())
    total_s = time.perf_counter() - start
    save_steps = [interval * (k + 1) for k in range(saves)]
    plain = median([t for s, t in trainer_times(timer) if s not in save_steps])
    stalls = [timer.times[s] - plain for s in save_steps]
    result: dict[str, Any] = {
        "total_s": total_s,
        "first_stall_s": stalls[0],  # an asynchronous save's first also allocates its buffers
        "stall_s": median(stalls[1:]),
        "peak_rss_mb": peak_rss_mb(),
    }
    if mode != "none":
        timing = trainer.plugin_manager.get_plugin("checkpoint").timing  # type: ignore[union-attr]
        result.update(saves=timing.saves, waited_s=timing.waited_s, write_s=timing.last_write_s)
    return result


def trainer_times(timer: BatchEndTimer) -> list[tuple[int, float]]:
    return sorted(timer.times.items())[1:]  # the first batch warms up


def _child(queue: Any, fn: Any, args: tuple[Any, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", repr(exc)))


def in_child(fn: Any, *args: Any, threads: int) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked process (its own peak RSS); its result."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, fn, args, threads))
    process.start()
    status, result = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__}{args[:1]} failed: {result}")
    out: dict[str, Any] = result
    return out


# -- the parent ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 saves: seconds")
    parser.add_argument("--sizes", default="10M,50M,200M", help="comma-separated: 10M, 50M, 200M")
    parser.add_argument("--saves", type=int, default=4, help="saves per run (the first is reported apart)")
    parser.add_argument(
        "--dir", default=None, help="where checkpoints are written (default: a temporary dir)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for training (0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.saves < 2:
        parser.error("--saves must be at least 2")
    if args.quick:
        sizes, saves, reps = list(QUICK_SIZES), 2, 2
    else:
        known = {s.name: s for s in SIZES}
        wanted = [name.strip() for name in args.sizes.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"unknown sizes {unknown}; choose from {list(known)}")
        sizes, saves, reps = [known[n] for n in wanted], args.saves, 3
    threads = args.threads or torch.get_num_threads()
    make_optimizer(nn.Linear(1, 1))  # imports what optimizers import lazily, once, before the forks
    root = Path(tempfile.mkdtemp(prefix="dltrain-ckpt-bench-", dir=args.dir))
    rows, parts = [], []
    ratios: dict[str, tuple[float, float]] = {}
    try:
        for size in sizes:
            folder = root / size.name
            folder.mkdir()
            base = in_child(bare, size, folder, reps, threads=threads)
            # A background write shares the CPU with training, which slows it down (up to 2x here):
            # leave it room to finish before the next save.
            interval = max(2, math.ceil(2.5 * base["sync_save_s"] / base["step_s"]))
            runs = {
                mode: in_child(train, size, folder, mode, interval, saves, threads=threads)
                for mode in ("none", "sync", "async")
            }
            shutil.rmtree(folder)
            sync, asyn, none = runs["sync"], runs["async"], runs["none"]
            ratios[size.name] = (asyn["stall_s"] / sync["stall_s"], asyn["peak_rss_mb"] / sync["peak_rss_mb"])
            mb = base["bytes"] / 1e6
            rows.append(
                [
                    f"{size.name} ({base['params'] / 1e6:.1f}M, {mb:.0f} MB)",
                    f"{base['bare_s']:.3f}",
                    f"{sync['stall_s']:.3f}",
                    f"{asyn['stall_s']:.3f} (first {asyn['first_stall_s']:.3f})",
                    fmt(ratios[size.name][0]),
                    f"{(sync['total_s'] - none['total_s']) / saves:+.3f}",
                    f"{(asyn['total_s'] - none['total_s']) / saves:+.3f}",
                    f"{asyn['write_s']:.3f}",
                    f"{interval} x {base['step_s'] * 1e3:.0f} ms",
                    f"{none['peak_rss_mb']:.0f} / {sync['peak_rss_mb']:.0f} / {asyn['peak_rss_mb']:.0f}",
                ]
            )
            parts.append(
                [
                    size.name,
                    f"{base['bare_s']:.3f}",
                    f"{base['sync_save_s']:.3f}",
                    f"{base['hash_s']:.3f} ({mb / base['hash_s']:.0f} MB/s)",
                    f"{base['fsync_s']:.3f}",
                    f"{base['load_s']:.3f}",
                    f"{base['verify_s']:.3f}",
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"torch {torch.__version__}, CPU, {threads} training thread(s); SGD with momentum, batches of {BATCH}; "
        f"{saves} saves per run; seconds are medians" + ("; --quick: not a measurement" if args.quick else "")
    )
    print()
    print(
        table(
            [
                "model",
                "bare torch.save s",
                "sync stall s",
                "async stall s (first save)",
                "async/sync",
                "sync run +s/save",
                "async run +s/save",
                "background write s",
                "save every",
                "peak RSS MB none/sync/async",
            ],
            rows,
        )
    )
    print()
    print("Where a synchronous save's time goes, and what loading verifies (same payload, outside training):")
    print(
        table(
            [
                "model",
                "bare torch.save s",
                "dltrain save s (hash+fsync+manifest)",
                "sha256 of the bytes s",
                "fsync s",
                "torch.load s",
                "verify s (read+sha256)",
            ],
            parts,
        )
    )
    key = "50M" if "50M" in ratios else (sizes[len(sizes) // 2].name if args.quick else sizes[0].name)
    stall_ratio, memory_ratio = ratios[key]
    print()
    print(f"RESULT stall_ratio={fmt(stall_ratio, 4)} memory_ratio={fmt(memory_ratio, 4)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
