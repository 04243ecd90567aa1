"""How long a run resumed inside an epoch takes to reach its first step.

A checkpoint saved at 10 % and at 90 % of an MNIST epoch (the tutorial's
pipeline: a shuffled ``DataLoader`` over ``torchvision.datasets.MNIST`` with
``ToTensor()``, batch 100, 600 batches an epoch) is resumed by a new Trainer,
and the time from calling ``fit`` to the end of its first optimizer step is
taken (the median of ``--repeats``). Each time includes building the run,
verifying and loading the checkpoint, and reaching the checkpoint's place in
the epoch's data order:

- ``DataLoader``: the loader as the tutorial makes it. dltrain fast-forwards
  its index sampler (the indices of the batches already trained on are drawn,
  no sample is loaded);
- ``any iterable (replay)``: the same loader behind a plain iterable, which
  dltrain can only replay: it fetches, and drops, every batch already trained
  on (what every loader got before the fast-forward existed);
- ``InMemoryLoader``: the same images in memory (``InMemoryLoader.from_dataset``),
  which starts an iteration at any batch;
- the baseline, ``plain PyTorch, fresh epoch``: a hand-written loop's first
  step of an epoch over the tutorial's loader, from ``iter(loader)`` to the end
  of ``optimizer.step()``: what a resume costs at best.

Without the real files in ``--data-dir``, random MNIST-shaped IDX files are
written to a temporary folder, so the pipeline runs as it would.

    python benchmarks/resume.py --data-dir <dir holding MNIST/raw>
    python benchmarks/resume.py --quick        # seconds; a smoke test, not a measurement

The last line is ``RESULT resume_10_s=<s> resume_90_s=<s> replay_90_s=<s>
ratio_90_vs_replay=<x> ratio_90_vs_plain=<x>``: the DataLoader's resume times at
10 % and 90 %, the replay's at 90 %, the fast-forward's resume at 90 % over the
replay's (both measured in this run; below 1 is faster), and over the plain
loop's fresh epoch start.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import (
    default_data_dir,
    example_net,
    fmt,
    has_mnist,
    has_torchvision,
    median,
    table,
    write_fake_mnist,
)
from torch import nn

import dltrain
from dltrain.checkpoint import list_checkpoints
from dltrain.data import InMemoryLoader

BATCH_SIZE = 100
LR = 0.01
SEED = 0


class AnyIterable:
    """A loader behind a plain iterable (no DataLoader, no state): dltrain resumes it by replaying."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batch_size = loader, loader.batch_size

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class FirstStep:
    """Records when the first training batch of a fit has finished (its optimizer step included)."""

    name = "bench_first_step"

    def __init__(self) -> None:
        self.at: float | None = None

    @dltrain.hookimpl(trylast=True)
    def on_train_batch_end(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    return example_net()()


def _fit(data: Any, checkpoint_dir: Path, *, max_steps: int, every: int | None, resume: str | None) -> float:
    """Fit until ``max_steps``; the seconds from calling fit to the end of its first step."""
    model = _model()
    first = FirstStep()
    trainer = dltrain.Trainer(
        max_steps=max_steps,
        device="cpu",
        seed=SEED,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": checkpoint_dir, "every_n_steps": every, "every_n_epochs": None, "keep_last": 100},
        plugins=[first],
    )
    start = time.perf_counter()
    trainer.fit(
        model,
        data,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        loss_fn=nn.CrossEntropyLoss(),
        resume=resume,
    )
    assert first.at is not None
    return first.at - start


def _plain_first_step(loader: Any) -> float:
    """A hand-written loop: from ``iter(loader)`` to the end of the epoch's first step."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    x, y = next(iter(loader))
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=3, help="resumes of each variant and place (median)")
    parser.add_argument("--quick", action="store_true", help="2,000 images, 1 repeat: seconds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one keeps timings stable on a shared machine",
    )
    args = parser.parse_args(argv)
    if not has_torchvision():
        print("torchvision is not installed: the tutorial's DataLoader cannot be built")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    n_train = 2000 if args.quick else 60000
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        real = has_mnist(data_dir)
        if not real:
            data_dir = str(write_fake_mnist(tmp, n_train, 100, seed=SEED))
        dataset: Any = datasets.MNIST(data_dir, train=True, download=False, transform=transforms.ToTensor())
        if n_train < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(n_train))
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
        memory = InMemoryLoader.from_dataset(dataset, batch_size=BATCH_SIZE, shuffle=True, seed=SEED)
        batches = len(loader)
        places = {"10 %": batches // 10, "90 %": batches * 9 // 10}
        step = places["10 %"]

        # One run per kind of loader saves checkpoints every 10 % of the epoch, up to 90 %.
        checkpoints: dict[str, Path] = {}
        for kind, data in (("loader", loader), ("memory", memory)):
            directory = Path(tmp) / f"ckpt-{kind}"
            _fit(data, directory, max_steps=places["90 %"], every=step, resume=None)
            checkpoints[kind] = directory
        variants = {
            "DataLoader (fast-forward)": ("loader", loader),
            "any iterable (replay)": ("loader", AnyIterable(loader)),
            "InMemoryLoader": ("memory", memory),
        }
        seconds: dict[tuple[str, str], float] = {}
        for place, at in places.items():
            for name, (kind, data) in variants.items():
                (info,) = [i for i in list_checkpoints(checkpoints[kind]) if i.global_step == at]
                times = [
                    _fit(data, checkpoints[kind], max_steps=at + 1, every=None, resume=str(info.payload_path))
                    for _ in range(repeats)
                ]
                seconds[(name, place)] = median(times)
        plain = median([_plain_first_step(loader) for _ in range(repeats)])

    source = (
        f"real MNIST from {args.data_dir}"
        if real
        else f"synthetic MNIST-shaped IDX files (no MNIST in {args.data_dir})"
    )
    print(f"data: {source}; {n_train} training images, batch {BATCH_SIZE}, {batches} batches an epoch")
    print(
        f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats} resumes"
        + ("; --quick: not a measurement" if args.quick else "")
    )
    print()
    rows: list[list[object]] = []
    for name in variants:
        rows.append(
            [name]
            + [f"{seconds[(name, place)]:.3f}" for place in places]
            + [f"{seconds[(name, place)] / plain:.1f}" for place in places]
        )
    rows.append(["plain PyTorch, fresh epoch", f"{plain:.3f}", f"{plain:.3f}", "1.0", "1.0"])
    header = [
        "resumed at",
        *(f"{p} (batch {b}) s" for p, b in places.items()),
        *(f"{p} vs plain" for p in places),
    ]
    print(table(header, rows))
    print()
    fast, replay = "DataLoader (fast-forward)", "any iterable (replay)"
    print(
        f"RESULT resume_10_s={fmt(seconds[(fast, '10 %')], 3)} resume_90_s={fmt(seconds[(fast, '90 %')], 3)} "
        f"replay_90_s={fmt(seconds[(replay, '90 %')], 3)} "
        f"ratio_90_vs_replay={fmt(seconds[(fast, '90 %')] / seconds[(replay, '90 %')], 3)} "
        f"ratio_90_vs_plain={fmt(seconds[(fast, '90 %')] / plain, 2)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
