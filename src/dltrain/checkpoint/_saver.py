"""One save at a time, in a background thread or in the caller's, and what saves cost the caller.

:class:`Saver` is how the checkpoint plugin writes: it snapshots a payload
(:class:`~dltrain.checkpoint._async.Snapshot`) and hands the copy to a worker
thread, or writes the live payload at once; it keeps at most one save in
flight, raises a background failure in the training thread when asked, and
counts the time the training thread spent in saves (:class:`SaveTiming`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dltrain._warnings import warn
from dltrain.checkpoint._async import BackgroundSave, Snapshot
from dltrain.checkpoint._io import check_plain
from dltrain.checkpoint._store import CheckpointInfo
from dltrain.errors import CheckpointError

__all__ = ["SLOW_WAIT_S", "SaveTiming", "Saver"]

_log = logging.getLogger("dltrain.checkpoint")

#: A wait for the previous save longer than this (seconds) is worth a warning (once per fit).
SLOW_WAIT_S = 0.5

Write = Callable[[Mapping[str, Any]], CheckpointInfo]


@dataclass
class SaveTiming:
    """How much the saves of the current (or last) fit held up training, on rank 0.

    Attributes:
        saves: Checkpoints committed.
        blocked_s: Seconds the training thread spent in saves: taking the
            snapshot and waiting for the previous save (asynchronous), or the
            whole write (synchronous, and the final save of a fit).
        waited_s: The part of ``blocked_s`` spent waiting for a background save
            to finish (the previous one, or the one in flight when fit ended).
        last_blocked_s: ``blocked_s`` of the latest save.
        last_waited_s: ``waited_s`` before the latest save.
        last_write_s: Seconds the latest background save took to write and commit.
    """

    saves: int = 0
    blocked_s: float = 0.0
    waited_s: float = 0.0
    last_blocked_s: float = 0.0
    last_waited_s: float = 0.0
    last_write_s: float = 0.0


@dataclass
class _Flight:
    """A background save and what to do when it ends."""

    job: BackgroundSave[CheckpointInfo]
    name: str
    step: int
    committed: Callable[[CheckpointInfo], None]
    failed: Callable[[], None]


class Saver:
    """Writes checkpoints into one directory, one at a time.

    Args:
        directory: The checkpoint directory (named in messages).

    Attributes:
        timing: What the saves cost the training thread (reset with :meth:`reset`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.timing = SaveTiming()
        self._snapshot: Snapshot | None = None
        self._flight: _Flight | None = None
        self._warned = False

    def reset(self) -> None:
        """Count afresh (a new fit). The snapshot buffers are kept for reuse."""
        self.timing = SaveTiming()
        self._warned = False

    def poll(self) -> None:
        """Settle a background save that has finished, raising its failure; never waits.

        Raises:
            CheckpointError: That save failed.
        """
        if self._flight is not None and self._flight.job.done:
            self.wait()

    def wait_before_next(self) -> float:
        """Wait for the save in flight before starting another; warn once per fit when that took long.

        Returns:
            The seconds waited.

        Raises:
            CheckpointError: That save failed.
        """
        flight = self._flight
        waited = self.wait()
        if flight is not None and waited >= SLOW_WAIT_S and not self._warned:
            self._warned = True
            warn(
                f"training waited {waited:.1f} s for checkpoint {flight.name!r} (global step {flight.step}) "
                f"to finish writing in the background (it took {flight.job.seconds:.1f} s): saves come "
                f"faster than {str(self.directory)!r} takes them. Save less often "
                f"(checkpoint.every_n_steps) or write to a faster disk"
            )
        return waited

    def save(
        self,
        payload: Mapping[str, Any],
        write: Write,
        *,
        name: str,
        step: int,
        background: bool,
        committed: Callable[[CheckpointInfo], None],
        failed: Callable[[], None],
    ) -> None:
        """Write ``payload`` with ``write``: now, or from a snapshot in a worker thread.

        Call :meth:`wait_before_next` first. ``committed`` gets the new
        checkpoint's info once it is committed; ``failed`` is called when a
        background save fails (a failure now is raised to the caller instead).
        """
        if not background:
            committed(write(payload))
            self.timing.saves += 1
            return
        check_plain(payload)  # here, in the caller's thread, where a bad plugin state is a bug
        snapshot = self._snapshot = self._snapshot or Snapshot()
        copy, events = snapshot.take(payload)
        job: BackgroundSave[CheckpointInfo] = BackgroundSave(
            partial(write, copy), events=events, name=f"checkpoint-{name}"
        )
        job.start()
        self._flight = _Flight(job, name, step, committed, failed)

    def account(self, started: float, waited: float) -> None:
        """Count one save that held the training thread from ``started`` (``time.perf_counter()``)
        and, of that, waited ``waited`` seconds for the previous one (already counted)."""
        blocked = time.perf_counter() - started
        self.timing.last_blocked_s = blocked
        self.timing.last_waited_s = waited
        self.timing.blocked_s += blocked - waited

    def wait(self, *, raise_error: bool = True) -> float:
        """Wait for the save in flight, if any, and settle it.

        Returns:
            The seconds waited (0.0 when nothing was in flight or it had finished).

        Raises:
            CheckpointError: That save failed (unless ``raise_error`` is False:
                then it is a warning).
        """
        flight, self._flight = self._flight, None
        if flight is None:
            return 0.0
        waited = flight.job.wait()
        self.timing.last_write_s = flight.job.seconds
        self.timing.waited_s += waited
        self.timing.blocked_s += waited
        error = flight.job.error
        if error is None:
            assert flight.job.result is not None
            flight.committed(flight.job.result)
            self.timing.saves += 1
            _log.info("checkpoint %s committed in the background in %.3f s", flight.name, flight.job.seconds)
            return waited
        flight.failed()
        message = (
            f"{error} (this checkpoint, of global step {flight.step}, was being written in the background; "
            f"training stopped at the next step)"
        )
        if not raise_error:
            warn(message)
            return waited
        if isinstance(error, CheckpointError):
            raise CheckpointError(message) from (error.__cause__ or error)
        if isinstance(error, Exception):
            raise CheckpointError(
                f"could not write checkpoint {flight.name!r} to {str(self.directory)!r} at global step "
                f"{flight.step}: {error!r} (in the background; training stopped at the next step)"
            ) from error
        raise error
