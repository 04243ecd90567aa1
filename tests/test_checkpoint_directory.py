"""The checkpoint directory: one run at a time, checked before the first step, write failures
explained, and leftovers removed only when their writer is gone."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import dltrain
from dltrain import CheckpointError, Trainer
from dltrain.checkpoint import DirectoryLock, _io, list_checkpoints, save_checkpoint, verify_checkpoint
from dltrain.checkpoint._directory import STALE_AFTER_S, explain, host_name, tmp_name, tmp_owner
from dltrain.checkpoint._lock import LOCK_NAME
from dltrain.checkpoint._store import clean_stale
from dltrain.default_plugins.checkpoint import CheckpointPlugin
from dltrain.state import RunKind, State
from dltrain.testing import tiny_loader, tiny_model

SCRIPTS = Path(__file__).resolve().parent / "_ckpt_scripts"
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX file locks and permissions")


def payload(step: int) -> dict[str, Any]:
    return {"model": {"w": torch.full((64,), float(step))}, "loop": {"global_step": step}}


class CountBatches:
    name = "count_batches"

    def __init__(self) -> None:
        self.batches = 0

    @dltrain.hookimpl
    def on_train_batch_start(self) -> None:
        self.batches += 1


def fit(directory: Path, *plugins: object, **checkpoint: Any) -> Trainer:
    model = tiny_model()
    trainer = Trainer(
        max_epochs=1,
        device="cpu",
        seed=0,
        progress="off",
        run_dir=None,
        autoload_plugins=False,
        checkpoint={"dir": directory, **checkpoint},
        plugins=plugins,
    )
    trainer.fit(
        model,
        tiny_loader(batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    return trainer


# -- one run per directory ---------------------------------------------------------------------


@POSIX
def test_a_locked_directory_is_refused_naming_the_owner_and_freed_on_release(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path) as lock:
        assert lock.held
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == host_name()
        with pytest.raises(CheckpointError) as info:
            DirectoryLock(tmp_path).acquire()
        message = str(info.value)
        assert f"checkpoint directory {str(tmp_path)!r} is in use by another run" in message
        assert f"process {os.getpid()} on host {host_name()}, started {owner['started']}" in message
    assert not (tmp_path / LOCK_NAME).exists()
    with DirectoryLock(tmp_path):
        pass


@POSIX
def test_fit_into_a_directory_in_use_fails_before_the_first_step(tmp_path: Path) -> None:
    counter = CountBatches()
    with DirectoryLock(tmp_path), pytest.raises(CheckpointError, match="is in use by another run"):
        fit(tmp_path, counter)
    assert counter.batches == 0
    assert list_checkpoints(tmp_path) == []


@POSIX
def test_the_lock_is_held_during_fit_and_released_after_it_also_after_an_error(tmp_path: Path) -> None:
    seen: list[bool] = []

    class Look:
        @dltrain.hookimpl
        def on_train_batch_end(self, state: dltrain.State) -> None:
            seen.append((tmp_path / LOCK_NAME).exists())
            if state.global_step == 5:
                raise RuntimeError("boom")

    with pytest.raises(dltrain.PluginError):
        fit(tmp_path, Look())
    assert seen == [True] * 5
    assert not (tmp_path / LOCK_NAME).exists()
    fit(tmp_path)  # the next run gets it
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_rank_zero_locks_and_checks_the_directory(tmp_path: Path) -> None:
    plugin = CheckpointPlugin(dltrain.TrainerConfig(checkpoint={"dir": tmp_path / "ckpt"}))
    plugin.on_setup(State(run=RunKind.FIT, rank=1, world_size=2))
    assert not (tmp_path / "ckpt").exists()
    plugin.on_teardown()


def test_validate_neither_creates_nor_locks_the_directory(tmp_path: Path) -> None:
    trainer = Trainer(device="cpu", progress="off", run_dir=None, checkpoint={"dir": tmp_path / "ckpt"})
    trainer.validate(tiny_model(), tiny_loader(samples=16), loss_fn=torch.nn.CrossEntropyLoss())
    assert not (tmp_path / "ckpt").exists()


# -- the directory is checked before the first step ------------------------------------------


def test_a_checkpoint_dir_that_is_a_file_fails_before_the_first_step(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("not a directory")
    counter = CountBatches()
    with pytest.raises(CheckpointError) as info:
        fit(tmp_path / "ckpt", counter)
    message = str(info.value)
    assert (
        f"checkpoint.dir {str(tmp_path / 'ckpt')!r} cannot hold checkpoints: a file is in the way" in message
    )
    assert "remove or rename that file" in message and "before the first training step" in message
    assert isinstance(info.value.__cause__, OSError) and counter.batches == 0


def test_a_checkpoint_dir_below_a_file_fails_before_the_first_step(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="a file is in the way") as info:
        fit(tmp_path / "file" / "ckpt")
    assert isinstance(info.value.__cause__, NotADirectoryError)


def test_a_missing_checkpoint_dir_is_created_at_start(tmp_path: Path) -> None:
    class Look:
        @dltrain.hookimpl
        def on_train_batch_start(self) -> None:
            assert (tmp_path / "a" / "b").is_dir()

    fit(tmp_path / "a" / "b", Look())


@POSIX
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_a_directory_without_write_permission_fails_before_the_first_step(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"permission denied.*chmod"):
            fit(folder)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(
    ("code", "cause", "fix"),
    [
        (errno.ENOSPC, "no space is left on the device", "keep fewer checkpoints"),
        (errno.EDQUOT, "quota", "keep fewer checkpoints"),
        (errno.EROFS, "read-only", "writable location"),
        (errno.EACCES, "permission denied", "chmod"),
        (errno.ENOTDIR, "a file is in the way", "remove or rename that file"),
        (errno.EIO, "input/output error", "resume='last'"),
    ],
)
def test_each_cause_comes_with_its_fix(code: int, cause: str, fix: str) -> None:
    said_cause, said_fix = explain(OSError(code, os.strerror(code)))
    assert cause in said_cause and fix in said_fix


# -- write failures ------------------------------------------------------------------------------


def disk_full_after(limit: int, *, only: str = "") -> Callable[..., IO[bytes]]:
    """An ``open`` whose files raise ENOSPC once ``limit`` bytes are written (to names containing ``only``)."""

    class FullFile:
        def __init__(self, raw: IO[bytes]) -> None:
            self._raw, self._left = raw, limit

        def write(self, data: bytes) -> int:
            size = memoryview(data).nbytes
            if size > self._left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= size
            return self._raw.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._raw, name)

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._raw.close()

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        raw = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by FullFile
        return FullFile(raw) if "w" in mode and only in str(path) else raw

    return fake_open


@pytest.mark.parametrize("when", ["payload", "manifest"])
def test_a_full_disk_is_a_checkpoint_error_naming_directory_cause_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    first = save_checkpoint(payload(1), tmp_path)
    monkeypatch.setattr(
        _io, "open", disk_full_after(100, only=".json" if when == "manifest" else ".ckpt"), raising=False
    )
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(payload(2), tmp_path)
    message = str(info.value)
    assert f"could not write a checkpoint to {str(tmp_path)!r} at global step 2: no space is left" in message
    assert "keep fewer checkpoints (checkpoint.keep_last)" in message and "earlier checkpoints" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert "unexpected pos" not in message  # not torch's zip writer's echo of the error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001.ckpt", "step-000000001.json"]
    verify_checkpoint(first.payload_path)


def test_save_checkpoint_into_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(CheckpointError, match=r"a file is in the way.*remove or rename that file"):
        save_checkpoint(payload(1), tmp_path / "ckpt")


def _unshare() -> list[str] | None:
    """A command prefix that runs in a private mount namespace where tmpfs may be mounted, or None."""
    tool = shutil.which("unshare")
    if sys.platform != "linux" or tool is None:
        return None
    prefix = [tool, "--mount"] if os.geteuid() == 0 else [tool, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, check=False
    )
    return prefix if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def small_disk() -> dict[str, dict[str, Any]]:
    """The reports of ``_ckpt_scripts/small_disk.py`` on a real 1 MiB tmpfs, by case; skips where
    no tmpfs can be mounted."""
    prefix = _unshare()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs Linux with unshare and user namespaces, or root)")
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$1"'  # private: gone with the process
    mount = Path(tempfile.mkdtemp(prefix="dltrain-small-disk-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    try:
        result = subprocess.run(
            [*prefix, "sh", "-c", script, "sh", str(mount), sys.executable, str(SCRIPTS / "small_disk.py")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
    finally:
        mount.rmdir()
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {report["case"]: report for report in reports}


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_a_really_full_disk_stops_training_with_a_checkpoint_error_and_keeps_the_earlier_checkpoint(
    small_disk: dict[str, dict[str, Any]], saving: str
) -> None:
    report = small_disk[saving]
    assert report["error"] == "CheckpointError", report
    assert report["cause_type"] == "OSError" and report["cause_errno"] == report["enospc"]
    message = report["message"]
    assert "could not write checkpoint 'step-000000001' to '" in message
    assert f"/{saving}' at global step 1: no space is left on the device" in message
    assert "keep fewer checkpoints" in message
    if saving == "async":
        assert "in the background; training stopped at the next step" in message
        assert report["steps"] == [1, 2]  # raised at the next step
    else:
        assert report["steps"] == [1]
    assert report["checkpoints"] == ["step-000000000"]  # the earlier one, intact (verified)
    assert report["files"] == ["step-000000000.ckpt", "step-000000000.json"]  # no partial file, no lock


def test_a_read_only_file_system_fails_before_the_first_step(small_disk: dict[str, dict[str, Any]]) -> None:
    report = small_disk["read-only"]
    assert report["error"] == "CheckpointError", report
    assert report["cause_errno"] == report["erofs"]
    assert "the file system is read-only" in report["message"] and "writable location" in report["message"]
    assert report["steps"] == []


# -- leftovers of interrupted saves ----------------------------------------------------------------


def dead_pid() -> int:
    """The PID of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporary_file_names_say_which_host_and_process_writes_them() -> None:
    name = tmp_name("step-000000007.ckpt")
    assert name.startswith(".tmp-step-000000007.ckpt~")
    assert tmp_owner(name) == (host_name(), os.getpid())
    assert tmp_owner(".tmp-step-000000007.ckpt~node-12.cluster~4242") == ("node-12.cluster", 4242)
    assert tmp_owner(".tmp-step-000000007.ckpt-999") is None  # the older naming


def test_cleanup_removes_only_leftovers_of_writers_that_are_gone(tmp_path: Path) -> None:
    old = time.time() - STALE_AFTER_S - 60

    def make(name: str, *, age: float | None = None) -> Path:
        path = tmp_path / name
        path.write_bytes(b"partial")
        if age is not None:
            os.utime(path, (age, age))
        return path

    mine = make(tmp_name("step-000000002.ckpt"))  # a save in flight in this process
    dead = make(f".tmp-step-000000003.ckpt~{host_name()}~{dead_pid()}")
    elsewhere = make(".tmp-step-000000004.ckpt~another-host~123")
    elsewhere_old = make(".tmp-step-000000005.ckpt~another-host~123", age=old)
    legacy_old = make(".tmp-step-000000006.ckpt-999", age=old)
    uncommitted = make("step-000000008.ckpt")  # renamed, its manifest about to be written
    uncommitted_old = make("step-000000009.ckpt", age=old)
    notes = make("notes.txt", age=old)
    removed = clean_stale(tmp_path)
    assert sorted(removed) == sorted([dead, elsewhere_old, legacy_old, uncommitted_old])
    assert all(p.exists() for p in (mine, elsewhere, uncommitted, notes))
    # Holding the directory's lock, a run removes all it can (not a live writer's of this host).
    assert sorted(clean_stale(tmp_path, grace=0.0)) == sorted([elsewhere, uncommitted])
    assert mine.exists() and notes.exists()


def test_a_new_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    save_checkpoint(payload(1), tmp_path)
    dead = tmp_path / f".tmp-step-000000002.ckpt~{host_name()}~{dead_pid()}"
    dead.write_bytes(b"half")
    (tmp_path / "step-000000002.ckpt").write_bytes(b"renamed, never committed")

    class Look:
        @dltrain.hookimpl
        def on_fit_start(self) -> None:
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                LOCK_NAME,
                "step-000000001.ckpt",
                "step-000000001.json",
            ]

    with pytest.warns(UserWarning, match="already holds 1 checkpoint"):
        fit(tmp_path, Look(), every_n_epochs=None, save_on_fit_end=False)
