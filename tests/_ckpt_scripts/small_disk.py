"""Checkpoint write failures on a real, tiny file system; run by ``tests/test_checkpoint_directory.py``.

Expects ``MOUNT`` to be a fresh 1 MiB tmpfs, mounted by the caller inside a
private mount namespace (``unshare``), where this process may remount it.
Prints one JSON object per case, in this order (one interpreter start for all):

* ``sync`` and ``async``: in a directory of its own, a checkpoint that fits
  is saved by hand; then a Trainer (synchronous or asynchronous saves)
  trains a model too big for what is left and hits "no space left on device"
  at its first save.
* ``read-only``: the file system is remounted read-only; a Trainer is
  started with a checkpoint directory on it.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import dltrain
from dltrain.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint


class CountBatches:
    name = "count_batches"

    def __init__(self) -> None:
        self.steps: list[int] = []

    @dltrain.hookimpl
    def on_train_batch_end(self, state: dltrain.State) -> None:
        self.steps.append(state.global_step)


def fit(directory: Path, *, params: int, async_save: bool) -> tuple[BaseException | None, list[int]]:
    counter = CountBatches()
    model = torch.nn.Linear(params // 4, 4, bias=False)
    data = [(torch.randn(2, params // 4), torch.randint(0, 4, (2,))) for _ in range(4)]
    trainer = dltrain.Trainer(
        max_epochs=1,
        device="cpu",
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": directory, "every_n_steps": 1, "async_save": async_save},
        plugins=[counter],
    )
    try:
        trainer.fit(
            model,
            data,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
    except BaseException as exc:
        return exc, counter.steps
    return None, counter.steps


def describe(exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {"error": None}
    cause = exc.__cause__
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "cause_errno": getattr(cause, "errno", None),
        "cause_type": type(cause).__name__ if cause is not None else None,
    }


def full_disk(folder: Path, mode: str) -> dict[str, Any]:
    first = save_checkpoint({"model": {"w": torch.zeros(1000)}, "loop": {"global_step": 0}}, folder)
    exc, steps = fit(folder, params=400_000, async_save=mode == "async")  # 1.6 MB of weights
    verify_checkpoint(first.payload_path)  # raises if damaged
    return {
        "case": mode,
        **describe(exc),
        "steps": steps,
        "checkpoints": [i.name for i in list_checkpoints(folder)],
        "files": sorted(p.name for p in folder.iterdir()),
        "enospc": errno.ENOSPC,
    }


def read_only(mount: Path) -> dict[str, Any]:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    exc, steps = fit(mount / "new", params=16, async_save=True)
    return {"case": "read-only", **describe(exc), "steps": steps, "erofs": errno.EROFS}


def main() -> None:
    mount = Path(sys.argv[1])
    for mode in ("sync", "async"):
        print(json.dumps(full_disk(mount / mode, mode)), flush=True)
    print(json.dumps(read_only(mount)), flush=True)


if __name__ == "__main__":
    main()
