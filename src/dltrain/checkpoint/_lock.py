"""One run per checkpoint directory: an advisory lock held while a run may write there.

The lock is ``flock`` on the file ``.dltrain.lock`` in the directory. The
operating system releases it when the process ends, however it ends, so a
killed run never blocks its own resume. The file holds the owner's PID, host
and start time, for the error a second run gets. A released lock removes its
file; a killed run leaves it behind, unlocked and harmless.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from dltrain._warnings import warn
from dltrain.checkpoint._directory import host_name
from dltrain.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "DirectoryLock"]

#: The lock file's name inside a checkpoint directory.
LOCK_NAME = ".dltrain.lock"

_ATTEMPTS = 8  # a previous owner may remove the file between our open and our flock


class DirectoryLock:
    """An exclusive, advisory lock on a checkpoint directory.

    ``acquire()`` fails at once with a :class:`~dltrain.CheckpointError` when
    another process holds it (on this host, or on another one where the file
    system supports ``flock`` across hosts, as NFSv4 does). Usable as a
    context manager.

    Args:
        directory: The checkpoint directory (it must exist).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and record this process as its owner.

        Where the file system has no locks (``flock`` unsupported), a warning
        says so and the run goes on unprotected.

        Raises:
            CheckpointError: Another process holds the lock; the message names
                the directory and the owner's PID, host and start time.
        """
        if self._fd is not None or fcntl is None:
            return
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise CheckpointError(self._busy_message(owner)) from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks on this file system
                os.close(fd)
                warn(
                    f"cannot lock checkpoint directory {str(self.directory)!r} ({exc}); make sure no other "
                    f"run saves checkpoints there while this one runs"
                )
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous owner removed the file after we opened it: lock the new one
        else:  # pragma: no cover - eight owners in a row released under us
            raise CheckpointError(f"could not lock checkpoint directory {str(self.directory)!r}; try again")
        owner = {
            "pid": os.getpid(),
            "host": host_name(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        data = (json.dumps(owner) + "\n").encode("utf-8")
        with contextlib.suppress(OSError):  # the record is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):
                self.path.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _busy_message(self, owner: dict[str, Any] | None) -> str:
        if owner:
            who = (
                f"process {owner.get('pid', '?')} on host {owner.get('host', '?')!s}, "
                f"started {owner.get('started', '?')!s}"
            )
        else:
            who = "a process that is just starting (its record is not written yet)"
        return (
            f"checkpoint directory {str(self.directory)!r} is in use by another run: {who} "
            f"(lock file {str(self.path)!r}). Two runs saving into one directory would delete each "
            f"other's files. Wait until that run ends, or stop it, then continue it with "
            f"resume='last'; or give this run another checkpoint.dir. The lock goes away by itself "
            f"when that process exits, even if it is killed"
        )

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _read_owner(fd: int) -> dict[str, Any] | None:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None
