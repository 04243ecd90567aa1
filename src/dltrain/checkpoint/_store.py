"""A directory of checkpoints: naming, listing, saving, retention, 'last' and 'best'.

Layout: each checkpoint is two files side by side, ``step-000000120.ckpt``
(the payload, written by ``torch.save``) and ``step-000000120.json`` (its
manifest, the commit marker). The number is the global step, zero-padded to
nine digits; a save whose name a checkpoint in the directory already has gets ``-1``
(``-2``, ...) appended: an epoch-end save at the step of the step save it
replaces (``step-000000120-1`` replaces ``step-000000120``), or a run started
in a directory whose older checkpoints include that step. Temporary files start with
``.tmp-`` and are removed by the next save. Files that do not follow this
pattern are never touched.

Order: every manifest holds a ``serial``, one more than the largest in the
directory when it was written, so "newest" means "written last", whatever
the steps (a new run into an old directory is newest even at a lower step).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dltrain._warnings import warn
from dltrain.checkpoint._io import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    PAYLOAD_SUFFIX,
    TMP_PREFIX,
    check_plain,
    finite_or_none,
    fsync_dir,
    maybe_fault,
    read_manifest,
    write_manifest,
    write_payload,
)
from dltrain.errors import CheckpointError

__all__ = [
    "CheckpointInfo",
    "clean_stale",
    "is_checkpoint_name",
    "list_checkpoints",
    "next_name",
    "rank_best",
    "save_checkpoint",
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


def clean_stale(directory: Path) -> None:
    """Remove temporary files and payloads without a manifest left by interrupted saves.

    Only dltrain's own names are touched (``.tmp-*`` and ``step-*.ckpt``).
    """
    removed = False
    for entry in directory.iterdir():
        stale = entry.name.startswith(TMP_PREFIX) or (
            entry.suffix == PAYLOAD_SUFFIX
            and is_checkpoint_name(entry.stem)
            and not entry.with_suffix(MANIFEST_SUFFIX).exists()
        )
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed = True
    if removed:
        fsync_dir(directory)


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


def _jsonable(value: Any) -> Any:
    """Plain JSON data: paths and unknown objects as strings, non-finite floats as strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def config_digest(config: Any) -> str | None:
    """A sha256 of a config's canonical JSON (None without a config)."""
    if config is None:
        return None
    text = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_checkpoint(
    payload: Mapping[str, Any],
    directory: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    monitor: str | None = None,
    mode: Mode = "min",
    trigger: str = "manual",
    keep_last: int | None = None,
    keep_best: int = 0,
    supersedes: str | None = None,
    name: str | None = None,
) -> CheckpointInfo:
    """Write one checkpoint durably, then apply retention.

    ``payload`` is usually ``trainer.state_dict()``; its ``loop``, ``config``
    and ``versions`` entries, when present, fill the manifest.

    Args:
        payload: Tensors and plain Python data only (checked first).
        directory: Where checkpoints live (created if missing).
        metrics: Metrics to record in the manifest (for people and for ``best``).
        monitor: The metric that ranks checkpoints for ``best``.
        mode: Whether a smaller (``min``) or larger (``max``) ``monitor`` is better.
        trigger: What asked for the save, recorded for people.
        keep_last: Keep this many newest checkpoints; None keeps all.
        keep_best: Keep this many best ones by ``monitor`` as well.
        supersedes: Name of a checkpoint at the same global step that this
            one replaces (deleted once this one is durable).
        name: The file stem to use (see :func:`next_name`); by default the
            next free ``step-NNNNNNNNN`` name.

    Returns:
        The new checkpoint's :class:`CheckpointInfo`.

    Raises:
        CheckpointError: The payload holds something that is not plain data,
            or ``name`` is not a free checkpoint name.
        OSError: The directory cannot be written (disk full, permissions).
    """
    check_plain(payload)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)
    loop = payload.get("loop") or {}
    step = int(loop.get("global_step", 0))
    infos, _ = scan(folder)
    if name is None:
        name = next_name(folder, step)
    elif not is_checkpoint_name(name) or (folder / f"{name}{MANIFEST_SUFFIX}").exists():
        raise CheckpointError(
            f"cannot save checkpoint {name!r} in {str(folder)!r}: the name is taken or does not follow "
            f"the pattern step-NNNNNNNNN[-K]; use dltrain.checkpoint.next_name(directory, step)"
        )
    sha, size = write_payload(payload, folder / f"{name}{PAYLOAD_SUFFIX}", step=step)
    clean_metrics = {str(k): finite_or_none(v) for k, v in (metrics or {}).items()}
    config = _jsonable(payload.get("config"))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "payload": f"{name}{PAYLOAD_SUFFIX}",
        "payload_sha256": sha,
        "payload_bytes": size,
        "serial": max((i.serial for i in infos), default=0) + 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "global_step": step,
        "epoch": int(loop.get("epoch", 0)),
        "batch_idx": int(loop.get("batch_idx", 0)),
        "micro_step": int(loop.get("micro_step", 0)),
        "stage": loop.get("stage"),
        "trigger": trigger,
        "metrics": clean_metrics,
        "monitor": monitor,
        "mode": mode,
        "score": clean_metrics.get(monitor) if monitor else None,
        "versions": _jsonable(payload.get("versions") or {"torch": str(torch.__version__)}),
        "config": config,
        "config_sha256": config_digest(config),
    }
    written = write_manifest(manifest, folder / f"{name}{MANIFEST_SUFFIX}", step=step)
    maybe_fault("manifest", step)
    info = CheckpointInfo.from_manifest(written, folder / f"{name}{MANIFEST_SUFFIX}")
    if keep_last is not None or supersedes is not None:
        _retain(infos, info, keep_last, keep_best, monitor, mode, supersedes)
    return info


def _retain(
    old: list[CheckpointInfo],
    new: CheckpointInfo,
    keep_last: int | None,
    keep_best: int,
    monitor: str | None,
    mode: str,
    supersedes: str | None,
) -> None:
    """Delete what retention no longer keeps; the new checkpoint is already durable."""
    gone = {i.name for i in old if i.name == supersedes and i.global_step == new.global_step}
    remaining = [i for i in old if i.name not in gone] + [new]
    if keep_last is not None:
        keep = {i.name for i in remaining[-keep_last:]}
        if monitor and keep_best:
            keep |= {i.name for i in rank_best(remaining, monitor, mode)[:keep_best]}
        gone |= {i.name for i in remaining if i.name not in keep}
    gone.discard(new.name)
    for info in old:  # oldest first
        if info.name in gone:
            _delete(info, new.global_step)
    if gone:
        fsync_dir(new.directory)


def _delete(info: CheckpointInfo, step: int) -> None:
    # Manifest first: from that moment the checkpoint no longer exists, and a
    # crash before the payload goes leaves only a manifest-less file, which
    # the next save removes.
    try:
        info.manifest_path.unlink(missing_ok=True)
        maybe_fault("delete", step)
        info.payload_path.unlink(missing_ok=True)
    except OSError as exc:
        warn(f"could not delete old checkpoint {str(info.payload_path)!r}: {exc}")
