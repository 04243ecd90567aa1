"""The checkpoint directory as a place to write: checked up front, write errors explained,
temporary files traced to the process that writes them.

Temporary files are named ``.tmp-<final name>~<host>~<pid>``, so a cleaner can
tell a file a live writer is still filling (leave it) from one whose writer
died (remove it). On this host a writer is alive while its PID runs; a file of
another host is left until it has not changed for :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from pathlib import Path

from dltrain.errors import CheckpointError

__all__ = [
    "STALE_AFTER_S",
    "TMP_PREFIX",
    "host_name",
    "check_directory",
    "is_stale_tmp",
    "make_directory",
    "tmp_name",
    "tmp_owner",
    "untouched_for",
    "write_error",
]

#: Temporary files start with this; no checkpoint name does, so they are never mistaken for one.
TMP_PREFIX = ".tmp-"

#: Leftovers whose writer cannot be checked (another host, an unknown name, a payload without
#: its manifest) are removed once they have not changed for this long (seconds). A live
#: writer changes its file continuously and commits seconds after its last write.
STALE_AFTER_S = 3600.0

_SEP = "~"
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def host_name() -> str:
    """This machine's name as it appears in temporary file names and the lock (no ``~`` or ``/``)."""
    return _HOST_UNSAFE.sub("_", socket.gethostname())[:64] or "localhost"


def tmp_name(final_name: str) -> str:
    """The temporary name this process writes ``final_name`` under."""
    return f"{TMP_PREFIX}{final_name}{_SEP}{host_name()}{_SEP}{os.getpid()}"


def tmp_owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of the writer of temporary file ``name``; None when the name does not say."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name[len(TMP_PREFIX) :].rsplit(_SEP, 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pragma: no cover - cannot tell; assume alive
        return True
    return True


def is_stale_tmp(path: Path, *, grace: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """Whether temporary file ``path`` was left by a writer that is gone.

    Its writer is gone when it ran on this host and its PID no longer runs. A
    file of another host, or with a name that does not say who wrote it, is
    stale once it has not been modified for ``grace`` seconds.
    """
    owner = tmp_owner(path.name)
    if owner is not None and owner[0] == host_name():
        return not _pid_running(owner[1])
    return untouched_for(path, grace, now)


def untouched_for(path: Path, grace: float, now: float | None = None) -> bool:
    """Whether ``path`` exists and was last modified at least ``grace`` seconds ago."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - mtime >= grace


# ---------------------------------------------------------------------------
# Explaining what went wrong
# ---------------------------------------------------------------------------

_NOT_A_DIRECTORY = (
    "a file is in the way: the path, or a folder on it, is a file, not a directory",
    "remove or rename that file, or set checkpoint.dir to another path",
)

_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "no space is left on the device",
        "free space on that disk, keep fewer checkpoints (checkpoint.keep_last), or set checkpoint.dir "
        "to a disk with room",
    ),
    errno.EDQUOT: (
        "the disk quota is exceeded",
        "free space within your quota, keep fewer checkpoints (checkpoint.keep_last), or set "
        "checkpoint.dir to a disk with room",
    ),
    errno.EROFS: (
        "the file system is read-only",
        "set checkpoint.dir to a writable location (or mount that disk read-write)",
    ),
    errno.EACCES: (
        "permission denied",
        "give this user write permission on the directory (chmod, chown), or set checkpoint.dir to a "
        "directory you own",
    ),
    errno.EPERM: (
        "the operation is not permitted",
        "give this user write permission on the directory (chmod, chown), or set checkpoint.dir to a "
        "directory you own",
    ),
    errno.ENOTDIR: _NOT_A_DIRECTORY,
    errno.EEXIST: _NOT_A_DIRECTORY,  # mkdir of a path that is a file
    errno.EIO: (
        "an input/output error (a failing disk or a lost network mount)",
        "check the disk or the mount; then continue with resume='last'",
    ),
    errno.ENAMETOOLONG: ("a file name is too long", "set checkpoint.dir to a shorter path"),
}


def explain(exc: OSError) -> tuple[str, str]:
    """``(cause, fix)`` for an error of writing into a checkpoint directory."""
    if exc.errno in _CAUSES:
        return _CAUSES[exc.errno]
    return (
        exc.strerror or type(exc).__name__,
        "check that checkpoint.dir is a writable directory on a healthy disk",
    )


def write_error(
    directory: Path, exc: OSError, *, step: int | None = None, name: str | None = None
) -> CheckpointError:
    """The :class:`CheckpointError` for a failed save into ``directory`` (raise it ``from exc``)."""
    cause, fix = explain(exc)
    what = f"checkpoint {name!r}" if name else "a checkpoint"
    at = f" at global step {step}" if step is not None else ""
    return CheckpointError(
        f"could not write {what} to {str(directory)!r}{at}: {cause} ({exc}). To fix it, {fix}. "
        f"The earlier checkpoints there are intact, and the partial files were removed"
    )


# ---------------------------------------------------------------------------
# Checking the directory before the first step
# ---------------------------------------------------------------------------


def _unusable(directory: Path, exc: OSError) -> CheckpointError:
    cause, fix = explain(exc)
    return CheckpointError(
        f"checkpoint.dir {str(directory)!r} cannot hold checkpoints: {cause} ({exc}). To fix it, "
        f"{fix}. (Checked before the first training step, so no work was lost.)"
    )


def check_directory(directory: Path) -> bool:
    """Check, without creating anything, that checkpoints can be written to ``directory``.

    An existing directory gets a small temporary file written and removed; for
    one that does not exist yet, its nearest existing parent must be a
    directory this process may create folders in.

    Returns:
        Whether ``directory`` exists.

    Raises:
        CheckpointError: It is (or would be below) a file, or cannot be
            written (read-only, permission denied); the message names the cause and the fix.
    """
    try:
        if directory.is_dir():
            _probe(directory)
            return True
        if directory.exists():
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(directory))
        parent = directory.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
            code = errno.EROFS if read_only else errno.EACCES
            raise OSError(code, os.strerror(code), str(parent))
    except OSError as exc:
        raise _unusable(directory, exc) from exc
    return False


def make_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) if missing, and check that it takes files.

    Raises:
        CheckpointError: As :func:`check_directory`.
    """
    try:
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(directory))
        directory.mkdir(parents=True, exist_ok=True)
        _probe(directory)
    except OSError as exc:
        raise _unusable(directory, exc) from exc


def _probe(directory: Path) -> None:
    """Create, write and remove a small temporary file in ``directory``."""
    probe = directory / tmp_name("probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
