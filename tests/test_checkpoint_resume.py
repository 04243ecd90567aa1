"""Bit-exact resume and crash safety, with real processes.

Every run is its own process, killed with SIGKILL where a test crashes it,
and every resume happens in a new process, as a user would meet them. The
processes are forked from a multiprocessing *forkserver* that imported torch
and dltrain once (nothing else ran in it), so each costs a fraction of a
second instead of a full interpreter start-up.

The training script is ``tests/_ckpt_scripts/ckpt_train.py``: an MLP with
dropout on a shuffled DataLoader whose collate draws from Python's, NumPy's
and torch's RNGs, SGD with momentum, a StepLR scheduler; 7 batches an epoch.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dltrain.checkpoint import list_checkpoints, load_for_resume

SCRIPTS = Path(__file__).resolve().parent / "_ckpt_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ckpt_train  # noqa: E402

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="needs POSIX processes and SIGKILL"
)

Run = Callable[..., int]


@pytest.fixture(scope="module")
def run() -> Run:
    """``run(*args, fault=None) -> exit code``: one training process (negative: killed by that signal)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.optim", "numpy", "dltrain", "ckpt_train"])

    def _run(*args: str, fault: str | None = None) -> int:
        env = {"DLTRAIN_CHECKPOINT_FAULT": fault} if fault else {}
        process = ctx.Process(target=ckpt_train.run_child, args=(list(args), env))
        process.start()
        process.join(timeout=300)
        if process.is_alive():  # pragma: no cover - a hang
            process.kill()
            pytest.fail(f"training process {args} hung")
        assert process.exitcode is not None
        return process.exitcode

    return _run


_REFERENCES: dict[tuple[str, ...], dict[str, Any]] = {}


def straight(run: Run, tmp_path_factory: pytest.TempPathFactory, *args: str) -> dict[str, Any]:
    """The uninterrupted run with these settings (computed once per module)."""
    if args not in _REFERENCES:
        folder = tmp_path_factory.mktemp("straight")
        assert run("--dir", str(folder / "ckpt"), "--out", str(folder / "out.pt"), *args) == 0
        _REFERENCES[args] = torch.load(folder / "out.pt", weights_only=True)
    return _REFERENCES[args]


def assert_same_run(reference: dict[str, Any], resumed: dict[str, Any]) -> None:
    """The resumed process ends exactly where the straight run ended, by the same path."""
    tail = reference["losses"][-len(resumed["losses"]) :]
    assert resumed["losses"], "the resumed run trained no batch"
    for (e, b, s, loss, targets), (e2, b2, s2, loss2, targets2) in zip(tail, resumed["losses"], strict=True):
        assert (e, b, s) == (e2, b2, s2)
        assert torch.equal(targets, targets2), f"epoch {e} batch {b}: another batch than the straight run's"
        assert torch.equal(loss, loss2), f"epoch {e} batch {b}: loss {loss2.item()} != {loss.item()}"
    for key in reference["model"]:
        assert torch.equal(reference["model"][key], resumed["model"][key]), key
    ref_opt, res_opt = reference["optimizer"], resumed["optimizer"]
    assert ref_opt["param_groups"] == res_opt["param_groups"]
    for index, state in ref_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], res_opt["state"][index]["momentum_buffer"])
    assert reference["scheduler"] == resumed["scheduler"]
    assert reference["history"] == resumed["history"]


def resume(run: Run, folder: Path, *args: str) -> dict[str, Any]:
    out = folder / "resumed.pt"
    code = run("--dir", str(folder / "ckpt"), "--out", str(out), "--resume", "last", *args)
    assert code == 0, f"the resumed run failed with exit code {code}"
    return torch.load(out, weights_only=True)


# -- bit-exact resume ----------------------------------------------------------------------

BASE = ("--val", "--every-n-steps", "5")
ACCUM = ("--val", "--accum", "2", "--every-n-steps", "2")

CASES = {
    # name: (settings of both runs, how the first run stops, fault, where the resumed run starts)
    "stopped by max_steps mid-epoch": (BASE, ("--max-steps", "10"), None, (1, 3)),
    "killed after a step checkpoint mid-epoch": (BASE, (), "manifest@10", (1, 3)),
    "killed after an epoch-end checkpoint": (BASE, (), "manifest@7", (1, 0)),
    "stopped by max_steps mid-epoch, with accumulation": (ACCUM, ("--max-steps", "3"), None, (0, 6)),
    "killed inside an accumulation group": (ACCUM, ("--save-and-die-at", "5"), None, (0, 5)),
    "killed inside an accumulation group, loading without RNG": (
        (*ACCUM, "--plain-collate"),
        ("--save-and-die-at", "5"),
        None,
        (0, 5),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    run: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, case: str
) -> None:
    settings, stop, fault, (epoch, batch) = CASES[case]
    reference = straight(run, tmp_path_factory, *settings)
    code = run(
        "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "first.pt"), *settings, *stop, fault=fault
    )
    assert code == (0 if fault is None and "--save-and-die-at" not in stop else -signal.SIGKILL)
    resumed = resume(run, tmp_path, *settings)
    assert resumed["losses"][0][:2] == (epoch, batch), "resumed at another place than the checkpoint's"
    assert_same_run(reference, resumed)


# -- crashes while writing ------------------------------------------------------------------

CRASH = ("--val", "--every-n-steps", "5", "--every-n-epochs", "0", "--keep-last", "1", "--plain-collate")

STAGES = {
    # stage at step 10: (the checkpoint 'last' gives afterwards, a warning expected while resolving it)
    "payload-tmp": (5, None),
    "payload": (5, "has no manifest"),
    "manifest-tmp": (5, "has no manifest"),
    "manifest": (10, None),
    "delete": (10, "has no manifest"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_moment_of_a_save_leaves_a_loadable_checkpoint_and_resume_continues(
    run: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, stage: str
) -> None:
    reference = straight(run, tmp_path_factory, *CRASH)
    folder = tmp_path / "ckpt"
    code = run("--dir", str(folder), "--out", str(tmp_path / "first.pt"), *CRASH, fault=f"{stage}@10")
    assert code == -signal.SIGKILL
    expected_step, warning = STAGES[stage]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        payload, path = load_for_resume("last", folder)
    assert payload["loop"]["global_step"] == expected_step, path
    messages = [str(w.message) for w in caught]
    assert (warning is None and not messages) or any(warning in m for m in messages), messages
    assert_same_run(reference, resume(run, tmp_path, *CRASH))
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers
    assert [i.global_step for i in list_checkpoints(folder)] == [21]
