"""What dltrain's loop costs over a hand-written loop, in instructions: exact, whatever the machine is doing.

Timings on a shared machine drift by percents; instruction counts do not.
Each variant runs under Valgrind's callgrind twice, in a fresh process, for a
short and a long epoch (``--steps`` and ``2 * --steps`` batches of the MNIST
example's network on batches of 100, in memory); the difference of the two
totals divided by the difference in steps is the variant's cost per step,
with interpreter start-up, imports and per-run set-up cancelled out. The
set-up itself is the short run's total minus its steps' share.

    python benchmarks/instructions.py                 # 4 variants x 2 runs under callgrind (minutes)
    python benchmarks/instructions.py --steps 20      # a quicker, still exact, count
    python benchmarks/instructions.py --variants plain dltrain ema   # what EMA adds to the default plugins

Needs ``valgrind`` on the PATH. The last line is
``RESULT instruction_ratio=<default plugins / plain> bare_instruction_ratio=<bare / plain>``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "dltrain", "bare", "manual", "ema")
DEFAULT_VARIANTS = ("plain", "dltrain", "bare", "manual")
LABELS = {
    "plain": "plain loop",
    "dltrain": "dltrain (default plugins)",
    "bare": "dltrain, bare (all built-ins off)",
    "manual": "dltrain, manual optimization (bare)",
    "ema": "dltrain, EMA(decay=0.999)",
}


def run_variant(variant: str, steps: int) -> None:
    """One epoch of ``steps`` batches of ``variant`` (the body callgrind counts)."""
    import contextlib
    import io

    import torch
    from _common import example_net
    from overhead import MinimalStep
    from torch import nn

    import dltrain
    from dltrain.data import InMemoryLoader

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.rand(steps * 100, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (steps * 100,), generator=gen),
    )
    loader = InMemoryLoader((x, y), batch_size=100, shuffle=True, seed=0)
    model = example_net()()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    if variant == "plain":
        from _common import plain_epoch

        plain_epoch(model, opt, loss_fn, loader)
        return

    class ManualStep:
        @dltrain.hookimpl
        def training_step(self, trainer: dltrain.Trainer, model: nn.Module, batch: object) -> torch.Tensor:
            inputs, targets = batch  # type: ignore[misc]
            loss: torch.Tensor = trainer.loss_fn(model(inputs), targets)
            trainer.backward(loss)
            trainer.optimizer_step()
            return loss

    settings: dict[str, object] = {
        "progress": "line",
        "run_dir": tempfile.mkdtemp(),
        "autoload_plugins": False,
    }
    if variant == "ema":
        from dltrain.callbacks import EMA

        settings["plugins"] = [EMA(decay=0.999)]
    if variant in ("bare", "manual"):
        settings = {
            "run_dir": None,
            "autoload_plugins": False,
            "disable_plugins": dltrain.BUILTIN_PLUGINS,
            "plugins": [ManualStep() if variant == "manual" else MinimalStep()],
            "manual_optimization": variant == "manual",
        }
    trainer = dltrain.Trainer(max_epochs=1, device="cpu", **settings)  # type: ignore[arg-type]
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(model, loader, optimizer=opt, loss_fn=loss_fn)


def count(variant: str, steps: int) -> int:
    """Instructions of a whole process running :func:`run_variant` under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, str(Path(__file__).resolve()), "--run", variant, "--steps", str(steps),
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
            "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        match = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
        if result.returncode != 0 or match is None:
            raise SystemExit(f"callgrind failed for {variant}:\n{result.stderr[-2000:]}")
        return int(match.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=40, help="batches of the short epoch (the long one has 2x)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        sys.path.insert(0, str(HERE))
        run_variant(args.run, args.steps)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    short, long = args.steps, 2 * args.steps
    per_step: dict[str, float] = {}
    setup: dict[str, float] = {}
    for variant in args.variants:
        a, b = count(variant, short), count(variant, long)
        per_step[variant] = (b - a) / (long - short)
        setup[variant] = a - short * per_step[variant]
        print(f"{LABELS[variant]:38s} {per_step[variant]:12,.0f} instructions/step", flush=True)
    plain = per_step.get("plain")
    if plain is None:
        return 0
    print()
    print("| variant | instructions per step | over plain | ratio | set-up per run over plain |")
    print("| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        extra = per_step[variant] - plain
        print(
            f"| {LABELS[variant]} | {per_step[variant]:,.0f} | {extra:+,.0f} | {per_step[variant] / plain:.4f} "
            f"| {setup[variant] - setup['plain']:+,.0f} |"
        )
    ratio = per_step.get("dltrain", plain) / plain
    bare = per_step.get("bare", plain) / plain
    print(f"RESULT instruction_ratio={ratio:.4f} bare_instruction_ratio={bare:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
