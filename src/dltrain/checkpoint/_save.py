"""Saving one checkpoint into a directory: the write protocol of ``_io`` plus the
manifest's contents and retention (``keep_last``, ``keep_best``, ``supersedes``).

Old checkpoints are deleted only after the new one is committed, each manifest
before its payload.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dltrain._warnings import warn
from dltrain.checkpoint._directory import write_error
from dltrain.checkpoint._io import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    PAYLOAD_SUFFIX,
    check_plain,
    finite_or_none,
    fsync_dir,
    maybe_fault,
    write_manifest,
    write_payload,
)
from dltrain.checkpoint._store import (
    CheckpointInfo,
    Mode,
    clean_stale,
    is_checkpoint_name,
    next_name,
    rank_best,
    scan,
)
from dltrain.errors import CheckpointError

__all__ = ["config_digest", "save_checkpoint"]


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
        CheckpointError: The payload holds something that is not plain data;
            ``name`` is not a free checkpoint name; or the directory cannot be
            written (no space left, read-only, permission denied, a file in the
            way): the message names the directory, the cause and the fix, the
            file system's ``OSError`` is the ``__cause__``, the earlier
            checkpoints are intact and no partial file is left.
    """
    check_plain(payload)
    folder = Path(directory)
    loop = payload.get("loop") or {}
    step = int(loop.get("global_step", 0))
    try:
        return _save(
            payload, folder, step, metrics, monitor, mode, trigger, keep_last, keep_best, supersedes, name
        )
    except OSError as exc:
        raise write_error(folder, exc, step=step, name=name) from exc


def _save(
    payload: Mapping[str, Any],
    folder: Path,
    step: int,
    metrics: Mapping[str, Any] | None,
    monitor: str | None,
    mode: Mode,
    trigger: str,
    keep_last: int | None,
    keep_best: int,
    supersedes: str | None,
    name: str | None,
) -> CheckpointInfo:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)
    loop = payload.get("loop") or {}
    infos, _ = scan(folder)
    if name is None:
        name = next_name(folder, step)
    elif not is_checkpoint_name(name) or (folder / f"{name}{MANIFEST_SUFFIX}").exists():
        raise CheckpointError(
            f"cannot save checkpoint {name!r} in {str(folder)!r}: the name is taken or does not follow "
            f"the pattern step-NNNNNNNNN[-K]; use dltrain.checkpoint.next_name(directory, step)"
        )
    payload_path = folder / f"{name}{PAYLOAD_SUFFIX}"
    sha, size = write_payload(payload, payload_path, step=step)
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
    try:
        written = write_manifest(manifest, folder / f"{name}{MANIFEST_SUFFIX}", step=step)
    except BaseException:
        payload_path.unlink(missing_ok=True)  # never committed: not a checkpoint, only lost space
        raise
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
