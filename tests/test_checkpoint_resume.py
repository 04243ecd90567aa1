"""Bit-exact resume, crash safety and one run per directory, with real processes.

Every run is its own process, killed with SIGKILL where a test crashes it,
and every resume happens in a new process, as a user would meet them. The
processes are forked from a multiprocessing *forkserver* that imported torch
and dltrain once (nothing else ran in it), so each costs a fraction of a
second instead of a full interpreter start-up.

The training script is ``tests/_ckpt_scripts/ckpt_train.py``: an MLP with
dropout on a shuffled DataLoader whose collate draws from Python's, NumPy's
and torch's RNGs, SGD with momentum, a StepLR scheduler; 7 batches an epoch.
Saves are asynchronous (the default) unless a test says ``--sync-save``.

``DLTRAIN_CRASH_KILLS`` sets how many random SIGKILLs the random-kill test
deals (default 10; 30 for the full check), ``DLTRAIN_CRASH_SEED`` its seed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain import CheckpointError
from dltrain.checkpoint import list_checkpoints, load_for_resume, verify_checkpoint
from dltrain.checkpoint._lock import LOCK_NAME
from dltrain.checkpoint._store import scan

SCRIPTS = Path(__file__).resolve().parent / "_ckpt_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ckpt_train  # noqa: E402

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="needs POSIX processes and SIGKILL"
)

Run = Callable[..., int]
Start = Callable[..., BaseProcess]


@pytest.fixture(scope="module")
def start() -> Start:
    """``start(*args, fault=None) -> process``: a training process, started and not waited for."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.optim", "numpy", "dltrain", "ckpt_train"])

    def _start(*args: str, fault: str | None = None) -> BaseProcess:
        env = {"DLTRAIN_CHECKPOINT_FAULT": fault} if fault else {}
        process = ctx.Process(target=ckpt_train.run_child, args=(list(args), env))
        process.start()
        return process

    return _start


def finish(process: BaseProcess, timeout: float = 300) -> int:
    """Wait for ``process``; its exit code (negative: killed by that signal)."""
    process.join(timeout=timeout)
    if process.is_alive():  # pragma: no cover - a hang
        process.kill()
        pytest.fail("training process hung")
    assert process.exitcode is not None
    return process.exitcode


@pytest.fixture(scope="module")
def run(start: Start) -> Run:
    """``run(*args, fault=None) -> exit code``: one training process (negative: killed by that signal)."""

    def _run(*args: str, fault: str | None = None) -> int:
        return finish(start(*args, fault=fault))

    return _run


_REFERENCES: dict[tuple[str, ...], dict[str, Any]] = {}


def straight(run: Run, tmp_path_factory: pytest.TempPathFactory, *args: str) -> dict[str, Any]:
    """The uninterrupted run with these settings (computed once per module)."""
    if args not in _REFERENCES:
        folder = tmp_path_factory.mktemp("straight")
        assert run("--dir", str(folder / "ckpt"), "--out", str(folder / "out.pt"), *args) == 0
        _REFERENCES[args] = torch.load(folder / "out.pt", weights_only=True)
    return _REFERENCES[args]


def assert_same_run(reference: dict[str, Any], resumed: dict[str, Any], *, trained: bool = True) -> None:
    """The resumed process ends exactly where the straight run ended, by the same path.

    ``trained=False`` allows a resumed run that had nothing left to train
    (it resumed from the final checkpoint).
    """
    tail = reference["losses"][-len(resumed["losses"]) :] if resumed["losses"] else []
    assert resumed["losses"] or not trained, "the resumed run trained no batch"
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


@pytest.mark.parametrize("saving", ["async", "sync"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_moment_of_a_save_leaves_a_loadable_checkpoint_and_resume_continues(
    run: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, stage: str, saving: str
) -> None:
    reference = straight(run, tmp_path_factory, *CRASH)
    folder = tmp_path / "ckpt"
    mode = ("--sync-save",) if saving == "sync" else ()
    code = run("--dir", str(folder), "--out", str(tmp_path / "first.pt"), *CRASH, *mode, fault=f"{stage}@10")
    assert code == -signal.SIGKILL
    assert (folder / LOCK_NAME).exists()  # left by the killed run; it locks nothing any more
    expected_step, warning = STAGES[stage]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        payload, path = load_for_resume("last", folder)
    assert payload["loop"]["global_step"] == expected_step, path
    messages = [str(w.message) for w in caught]
    assert (warning is None and not messages) or any(warning in m for m in messages), messages
    assert_same_run(reference, resume(run, tmp_path, *CRASH, *mode))
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-") or p.name == LOCK_NAME]
    assert not leftovers
    assert [i.global_step for i in list_checkpoints(folder)] == [21]


# -- random kills ------------------------------------------------------------------------------

RANDOM = ("--every-n-steps", "1", "--every-n-epochs", "0", "--keep-last", "2", "--max-epochs", "2")


def assert_only_committed_checkpoints(folder: Path) -> None:
    """Whatever a kill interrupted, every listed checkpoint is whole and nothing damaged has a manifest."""
    infos, problems = scan(folder)
    for path, problem in problems:
        assert "has no manifest" in problem, (path, problem)  # an uncommitted payload, never a torn one
    for info in infos:
        verify_checkpoint(info.payload_path)  # size and sha256 match the manifest
    if infos:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the uncommitted payloads above
            _, path = load_for_resume("last", folder)
        assert path == infos[-1].payload_path


def test_sigkills_at_random_moments_never_leave_a_torn_checkpoint_and_the_run_ends_bit_exact(
    start: Start, run: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Training saves every step (asynchronously) and is SIGKILLed at random moments, resumed
    after each kill, until a run completes; then again in a fresh directory until enough kills."""
    reference = straight(run, tmp_path_factory, *RANDOM)
    # Kill moments are drawn up to the length of a whole run, timed here, so most land inside it.
    began = time.monotonic()
    assert run("--dir", str(tmp_path / "timed"), "--out", str(tmp_path / "timed.pt"), *RANDOM) == 0
    whole_run = time.monotonic() - began
    kills_wanted = int(os.environ.get("DLTRAIN_CRASH_KILLS", "30"))
    rng = random.Random(int(os.environ.get("DLTRAIN_CRASH_SEED", "0")))
    kills = chains = 0
    while kills < kills_wanted:
        folder, out = tmp_path / f"chain{chains}", tmp_path / f"chain{chains}.pt"
        chains += 1
        while True:
            resume_args = ("--resume", "last") if list_checkpoints(folder) else ()
            process = start("--dir", str(folder), "--out", str(out), *RANDOM, *resume_args)
            process.join(timeout=rng.uniform(0.02, whole_run))
            if process.is_alive() and kills < kills_wanted:
                process.kill()
            code = finish(process)
            if code == -signal.SIGKILL:
                kills += 1
                assert_only_committed_checkpoints(folder)
                continue
            assert code == 0  # it finished first
            break
        # A kill after the final save leaves nothing to train: the weights must match all the same.
        assert_same_run(reference, torch.load(out, weights_only=True), trained=False)
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-") or p.name == LOCK_NAME]
    print(f"{kills} SIGKILLs in {chains} runs to completion (a whole run: {whole_run:.2f} s)")


# -- signals while a save is in flight ---------------------------------------------------------


def test_sigterm_while_a_save_is_being_written_commits_it_exits_143_and_resume_is_exact(
    run: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = ("--every-n-steps", "5", "--every-n-epochs", "0", "--keep-last", "5")
    reference = straight(run, tmp_path_factory, *settings)
    folder = tmp_path / "ckpt"
    # The writer thread sends SIGTERM once the payload of step 10 is written, then holds the
    # save for half a second: the fit stops with that save still in flight.
    code = run(
        "--dir", str(folder), "--out", str(tmp_path / "first.pt"), *settings, fault="payload-tmp@10:term"
    )
    assert code == 143
    infos = list_checkpoints(folder)
    assert [i.global_step for i in infos][:2] == [5, 10]
    assert infos[-1].global_step >= 10 and all(i.trigger in ("step", "fit_end") for i in infos)
    for info in infos:
        verify_checkpoint(info.payload_path)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-") or p.name == LOCK_NAME]
    assert_same_run(reference, resume(run, tmp_path, *settings))


# -- one run per directory ---------------------------------------------------------------------


def test_a_second_run_into_a_directory_in_use_fails_before_its_first_step_naming_the_owner(
    start: Start, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    first = start("--dir", str(folder), "--out", str(tmp_path / "first.pt"), "--max-epochs", "100000")
    try:
        lock = folder / LOCK_NAME
        deadline = time.monotonic() + 120
        while str(first.pid) not in (lock.read_text() if lock.exists() else ""):
            assert first.is_alive() and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        batches: list[int] = []

        class Count:
            @dltrain.hookimpl
            def on_train_batch_start(self) -> None:
                batches.append(1)

        model = torch.nn.Linear(6, 3)
        trainer = dltrain.Trainer(
            max_epochs=1,
            device="cpu",
            progress="off",
            run_dir=None,
            autoload_plugins=False,
            checkpoint={"dir": folder},
            plugins=[Count()],
        )
        train, _ = ckpt_train.make_data(val=False)
        with pytest.raises(CheckpointError) as info:
            trainer.fit(
                model,
                train,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loss_fn=torch.nn.CrossEntropyLoss(),
            )
        message = str(info.value)
        assert (
            f"checkpoint directory {str(folder)!r} is in use by another run: process {first.pid} on host"
            in message
        )
        assert "started 20" in message and "resume='last'" in message
        assert batches == []  # refused before the first step
        assert first.is_alive()
    finally:
        os.kill(first.pid, signal.SIGTERM)  # the first run stops cleanly: a final save, exit 143
    assert finish(first) == 143
    assert not (folder / LOCK_NAME).exists()  # released at the end of that run
    infos = list_checkpoints(folder)
    assert infos  # its epoch saves, and the final one where the stop left off
    for item in infos:
        verify_checkpoint(item.payload_path)
