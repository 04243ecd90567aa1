"""A directory of checkpoints: naming, listing, saving, retention, 'last' and 'best'.

Layout: each checkpoint is two files side by side, ``step-000000120.ckpt``
(the payload, written by ``torch.save``) and ``step-000000120.json`` (its
manifest, the commit marker). The number is the global step, zero-padded to
nine digits; a save whose name a checkpoint in the directory already has gets ``-1``
(``-2``, ...) appended: an epoch-end save at the step of the step save it
replaces (``step-000000120-1`` replaces ``step-000000120``), or a run started
in a directory whose older checkpoints include that step. Temporary files start
with ``.tmp-`` and name their writer's host and PID; a save removes those whose
writer is gone (see :func:`clean_stale`). The lock file ``.dltrain.lock``
belongs to :class:`~dltrain.checkpoint.DirectoryLock`. Files that do not
follow these patterns are never touched.

Order: every manifest holds a ``serial``, one more than the largest in the
directory when it was written, so "newest" means "written last", whatever
the steps (a new run into an old directory is newest even at a lower step).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dltrain.checkpoint._directory import STALE_AFTER_S, TMP_PREFIX, is_stale_tmp, untouched_for
from dltrain.checkpoint._io import MANIFEST_SUFFIX, PAYLOAD_SUFFIX, fsync_dir, read_manifest
from dltrain.errors import CheckpointError

__all__ = [
    "CheckpointInfo",
    "clean_stale",
    "is_checkpoint_name",
    "list_checkpoints",
    "next_name",
    "rank_best",
    "scan",
]

_NAME_RE = re.compile(r"^step-\d{9,}(?:-\d+)?$")

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it.

    Attributes:
        name: The file stem (``step-000000120``).
        directory: The folder holding its two files.
        serial: Its place in the directory's write order (larger is newer).
        global_step: Optimizer steps taken when it was saved.
        epoch: Epochs completed before the one it was saved in (``State.epoch``).
        batch_idx: Index of the last training batch it includes, within its epoch.
        micro_step: Micro-batches accumulated since the last optimizer step.
        stage: Where in the epoch the loop was (``train``, ``validate``, ``done``).
        trigger: What saved it (``step``, ``epoch``, ``fit_end`` or ``manual``).
        metrics: The run's latest metrics at the save (non-finite values as None).
        monitor: The metric that ranks checkpoints for ``best``, if any.
        mode: ``min`` or ``max``: which way ``monitor`` is better.
        score: The value of ``monitor`` in this checkpoint, if it had one.
        created: When it was written (UTC, ISO 8601).
        payload_bytes: Size of the payload file.
        payload_sha256: Checksum of the payload file.
        versions: The dltrain and torch versions that wrote it.
        manifest: The whole manifest, as read.
    """

    name: str
    directory: Path
    serial: int
    global_step: int
    epoch: int
    batch_idx: int
    micro_step: int
    stage: str | None
    trigger: str
    metrics: dict[str, float | None]
    monitor: str | None
    mode: str
    score: float | None
    created: str
    payload_bytes: int
    payload_sha256: str
    versions: dict[str, str]
    manifest: dict[str, Any] = field(repr=False, compare=False)

    @property
    def payload_path(self) -> Path:
        """The ``.ckpt`` file."""
        return self.directory / f"{self.name}{PAYLOAD_SUFFIX}"

    @property
    def manifest_path(self) -> Path:
        """The ``.json`` manifest file."""
        return self.directory / f"{self.name}{MANIFEST_SUFFIX}"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], manifest_path: Path) -> CheckpointInfo:
        """Build from a manifest already checked by ``read_manifest``."""
        m = dict(manifest)
        return cls(
            name=manifest_path.name[: -len(MANIFEST_SUFFIX)],
            directory=manifest_path.parent,
            serial=int(m.get("serial", 0)),
            global_step=int(m.get("global_step", 0)),
            epoch=int(m.get("epoch", 0)),
            batch_idx=int(m.get("batch_idx", 0)),
            micro_step=int(m.get("micro_step", 0)),
            stage=m.get("stage"),
            trigger=str(m.get("trigger", "manual")),
            metrics=dict(m.get("metrics") or {}),
            monitor=m.get("monitor"),
            mode=str(m.get("mode", "min")),
            score=m.get("score"),
            created=str(m.get("created", "")),
            payload_bytes=int(m["payload_bytes"]),
            payload_sha256=str(m["payload_sha256"]),
            versions=dict(m.get("versions") or {}),
            manifest=m,
        )


def is_checkpoint_name(stem: str) -> bool:
    """Whether ``stem`` follows dltrain's checkpoint naming (``step-NNNNNNNNN[-K]``)."""
    return bool(_NAME_RE.match(stem))


def scan(directory: Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """List the checkpoints in ``directory`` (cheaply: no checksums) and what is wrong there.

    A checkpoint is listed when its manifest is valid and its payload exists
    with the recorded size. Everything else of dltrain's naming is reported
    as ``(path, problem)``: unreadable manifests, missing or truncated
    payloads, payloads without a manifest (an interrupted save).

    Returns:
        The listed checkpoints oldest first (by ``serial``), and the problems.
    """
    infos: list[CheckpointInfo] = []
    problems: list[tuple[Path, str]] = []
    if not directory.is_dir():
        return infos, problems
    for entry in sorted(directory.iterdir()):
        stem, suffix = entry.stem, entry.suffix
        if entry.name.startswith(TMP_PREFIX) or not is_checkpoint_name(stem):
            continue
        if suffix == MANIFEST_SUFFIX:
            try:
                info = CheckpointInfo.from_manifest(read_manifest(entry), entry)
            except (CheckpointError, ValueError, TypeError, KeyError) as exc:
                problems.append((entry, str(exc)))
                continue
            payload = info.payload_path
            if not payload.is_file():
                problems.append(
                    (payload, f"checkpoint file {str(payload)!r} is missing (its manifest exists)")
                )
            elif payload.stat().st_size != info.payload_bytes:
                problems.append(
                    (
                        payload,
                        f"checkpoint file {str(payload)!r} is truncated or overwritten: "
                        f"{payload.stat().st_size} bytes, its manifest says {info.payload_bytes}",
                    )
                )
            else:
                infos.append(info)
        elif suffix == PAYLOAD_SUFFIX and not entry.with_suffix(MANIFEST_SUFFIX).exists():
            problems.append(
                (
                    entry,
                    f"checkpoint file {str(entry)!r} has no manifest: a save was interrupted before it "
                    f"committed, so it is not a checkpoint",
                )
            )
    infos.sort(key=lambda i: i.serial)
    return infos, problems


def list_checkpoints(directory: str | Path) -> list[CheckpointInfo]:
    """The committed checkpoints in ``directory``, oldest first (newest is ``[-1]``).

    Reads only the manifests and file sizes; :func:`dltrain.checkpoint.verify_checkpoint`
    checks a payload's checksum.
    """
    return scan(Path(directory))[0]


def rank_best(
    infos: Iterable[CheckpointInfo], monitor: str | None = None, mode: str | None = None
) -> list[CheckpointInfo]:
    """The checkpoints that have a score for ``monitor``, best first (ties: newest first).

    With ``monitor``/``mode`` None, those of the newest checkpoint that has a
    monitor are used.
    """
    items = list(infos)
    if monitor is None:
        with_monitor = [i for i in items if i.monitor]
        if not with_monitor:
            return []
        newest = max(with_monitor, key=lambda i: i.serial)
        monitor, mode = newest.monitor, mode or newest.mode
    sign = -1.0 if mode == "max" else 1.0
    scored = [i for i in items if i.monitor == monitor and i.score is not None]
    return sorted(scored, key=lambda i: (sign * float(i.score or 0.0), -i.serial))


def clean_stale(directory: Path, *, grace: float = STALE_AFTER_S) -> list[Path]:
    """Remove what interrupted saves left behind, and only what their writers left for good.

    * A temporary file (``.tmp-*``) goes when its writer is gone: it ran on
      this host and its PID no longer runs. One from another host, or with a
      name that does not say who wrote it, goes once unchanged for ``grace``
      seconds.
    * A payload without a manifest (``step-*.ckpt``: a save interrupted
      between renaming its payload and committing its manifest) goes once
      unchanged for ``grace`` seconds, since its writer may be about to commit
      it. The checkpoint plugin passes ``grace=0`` once, at the start of a run,
      while it holds the directory's lock: no other run can be writing then.

    Only dltrain's own names are touched.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            stale = is_stale_tmp(entry, grace=grace)
        else:
            stale = (
                entry.suffix == PAYLOAD_SUFFIX
                and is_checkpoint_name(entry.stem)
                and not entry.with_suffix(MANIFEST_SUFFIX).exists()
                and untouched_for(entry, grace)
            )
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        fsync_dir(directory)
    return removed


def next_name(directory: str | Path, step: int) -> str:
    """The name the next checkpoint at global ``step`` in ``directory`` gets.

    ``step-000000120``, or ``step-000000120-1``, ``-2``... when a checkpoint
    of that name exists (a payload without a manifest does not count: it is
    not a checkpoint, and the next save removes it).
    """
    folder = Path(directory)
    base = f"step-{step:09d}"
    name, n = base, 0
    while (folder / f"{name}{MANIFEST_SUFFIX}").exists():
        n += 1
        name = f"{base}-{n}"
    return name
