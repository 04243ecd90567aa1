"""Crash-safe file writing, manifests, verification and safe loading.

The write protocol (one checkpoint ``NAME`` in directory ``D``):

1. the payload goes to ``D/.tmp-NAME.ckpt~HOST~PID``, hashed while it is
   written (one pass: it is never read back), then flushed and fsync'ed;
2. ``os.replace`` gives it its final name ``D/NAME.ckpt``; ``D`` is fsync'ed;
3. the manifest (step, epoch, sha256 and size of the payload, versions,
   config, metrics) goes to ``D/.tmp-NAME.json~HOST~PID`` the same way and is
   renamed to ``D/NAME.json``; ``D`` is fsync'ed.

The manifest is the commit marker: a payload without a valid manifest that
matches it is not a checkpoint. A crash (power loss, SIGKILL) at any moment
therefore leaves either the previous set of checkpoints or the previous set
plus the new one; never a half-written file under a checkpoint's name.

Everything here is synchronous and touches only the given paths; it may run
in any thread (the checkpoint plugin's background saves call it from one).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, cast

import torch

from dltrain.checkpoint._directory import TMP_PREFIX, tmp_name
from dltrain.errors import CheckpointError

__all__ = [
    "FAULT_ENV",
    "FAULT_PAUSE_S",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_SUFFIX",
    "PAYLOAD_SUFFIX",
    "TMP_PREFIX",
    "check_plain",
    "finite_or_none",
    "fsync_dir",
    "maybe_fault",
    "read_manifest",
    "safe_load",
    "sha256_file",
    "verify_payload",
    "write_manifest",
    "write_payload",
]

FORMAT = "dltrain-checkpoint"
FORMAT_VERSION = 1
PAYLOAD_SUFFIX = ".ckpt"
MANIFEST_SUFFIX = ".json"

#: Test-only fault injection: ``STAGE[@STEP][:ACTION]`` makes the process act
#: at that stage of a save (of the checkpoint at global step ``STEP``, when
#: given), in whichever thread writes it. Stages: ``payload-tmp`` (temporary
#: payload written), ``payload`` (payload renamed, no manifest yet),
#: ``manifest-tmp`` (temporary manifest written), ``manifest`` (committed,
#: before old ones are deleted), ``delete`` (one old manifest deleted, its
#: payload not yet). Actions: ``kill`` (the default: SIGKILL itself), ``term``
#: and ``int`` (send itself SIGTERM or SIGINT, then go on after
#: :data:`FAULT_PAUSE_S`: a signal while the save is in flight), ``pause``
#: (sleep :data:`FAULT_PAUSE_S`: a slow disk). Unset, it costs one environment
#: lookup per stage.
FAULT_ENV = "DLTRAIN_CHECKPOINT_FAULT"

#: How long the ``pause``, ``term`` and ``int`` fault actions hold the save (seconds).
FAULT_PAUSE_S = 0.5

_FAULT_SIGNALS = {"kill": "SIGKILL", "term": "SIGTERM", "int": "SIGINT"}

_MANIFEST_REQUIRED = ("format", "format_version", "name", "payload", "payload_sha256", "payload_bytes")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------
# Durability primitives
# ---------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable (no-op where unsupported)."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def maybe_fault(stage: str, step: int) -> None:
    """Act as :data:`FAULT_ENV` asks at ``stage`` of the save at global ``step`` (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, action = spec.partition(":")
    want, _, at = where.partition("@")
    if want != stage or (at and int(at) != step):
        return
    action = action or "kill"
    if action in _FAULT_SIGNALS:
        os.kill(os.getpid(), getattr(signal, _FAULT_SIGNALS[action]))
    elif action != "pause":
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r}; use kill, term, int or pause")
    time.sleep(FAULT_PAUSE_S)


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it.

    It keeps the first ``OSError`` of the file: ``torch.save``'s zip writer
    replaces it with a ``RuntimeError`` ("unexpected pos ...") that names neither
    the cause nor the file.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            written = self._raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self._raw.flush()


def _tmp_path(final: Path) -> Path:
    return final.with_name(tmp_name(final.name))


def _commit(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_atomically(final: Path, write: Callable[[IO[bytes]], object], *, fault: str, step: int) -> None:
    """The one crash-safe write: a temp file beside ``final``, flushed and fsynced, then
    ``os.replace`` and an fsync of the directory. On any error the temp file is removed."""
    tmp = _tmp_path(final)
    try:
        with open(tmp, "wb") as raw:
            write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        maybe_fault(fault, step)
        _commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_payload(payload: Mapping[str, Any], final: Path, *, step: int) -> tuple[str, int]:
    """Write ``payload`` with ``torch.save`` to ``final`` atomically and durably.

    Returns:
        The sha256 (hex) and size in bytes of the file written.

    Raises:
        OSError: The file could not be written (the file system's own error;
            the temporary file is removed).
    """
    writers: list[_HashingWriter] = []

    def write(raw: IO[bytes]) -> None:
        writer = _HashingWriter(raw)
        writers.append(writer)
        try:
            torch.save(dict(payload), cast(IO[bytes], writer))  # it only calls write/flush
        except Exception:
            if writer.error is not None:  # the file's own error, not the zip writer's echo of it
                raise writer.error.with_traceback(writer.error.__traceback__) from None
            raise

    _write_atomically(final, write, fault="payload-tmp", step=step)
    maybe_fault("payload", step)
    return writers[0].sha256.hexdigest(), writers[0].size


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(manifest: Mapping[str, Any], final: Path, *, step: int) -> dict[str, Any]:
    """Write ``manifest`` (with its own checksum added) to ``final`` atomically and durably.

    Returns:
        The manifest as written, ``manifest_sha256`` included.
    """
    data = dict(manifest)
    data["manifest_sha256"] = _manifest_digest(data)
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _write_atomically(final, lambda raw: raw.write(text.encode("utf-8")), fault="manifest-tmp", step=step)
    return data


# ---------------------------------------------------------------------------
# Reading and verifying
# ---------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a manifest file.

    Raises:
        CheckpointError: The file is missing, is not JSON, is not a dltrain
            manifest, lacks a field, or does not match its own checksum.
    """
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint manifest {str(path)!r} does not exist, so the checkpoint is incomplete "
            f"(a save interrupted before it committed?); use an older checkpoint"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is unreadable or not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a dltrain checkpoint manifest (no format {FORMAT!r})")
    missing = [k for k in _MANIFEST_REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} lacks the fields {missing}")
    if data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint manifest {str(path)!r} has format version {data['format_version']}, newer "
            f"than this dltrain reads ({FORMAT_VERSION}); upgrade dltrain"
        )
    if data.get("manifest_sha256") != _manifest_digest(data):
        raise CheckpointError(
            f"checkpoint manifest {str(path)!r} is corrupt: its content does not match its checksum"
        )
    return data


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_payload(manifest: Mapping[str, Any], payload_path: Path) -> None:
    """Check that ``payload_path`` is the file ``manifest`` describes (size, then sha256).

    Raises:
        CheckpointError: The payload is missing, truncated, too long, or its bytes changed.
    """
    if not payload_path.is_file():
        raise CheckpointError(f"checkpoint file {str(payload_path)!r} is missing (its manifest exists)")
    size, expected = payload_path.stat().st_size, int(manifest["payload_bytes"])
    if size != expected:
        what = "truncated" if size < expected else "longer than it was written"
        raise CheckpointError(
            f"checkpoint file {str(payload_path)!r} is {what}: {size} bytes, its manifest says "
            f"{expected}; the file was damaged after it was written; use another checkpoint"
        )
    if sha256_file(payload_path) != manifest["payload_sha256"]:
        raise CheckpointError(
            f"checkpoint file {str(payload_path)!r} is corrupt: its sha256 does not match its manifest "
            f"(bytes changed on disk or in a copy); use another checkpoint"
        )


def safe_load(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a payload with ``torch.load(weights_only=True)`` onto the CPU.

    Only tensors and plain Python data are accepted: a file whose pickle would
    construct any other object (and so could run code) is refused unexecuted.
    ``mmap=True`` maps the tensors' storage instead of reading it (for inspection).

    Raises:
        CheckpointError: The file holds other objects, cannot be read, or is not a dict.
    """
    if mmap:  # only the zip format can be memory-mapped
        with open(path, "rb") as f:
            mmap = f.read(4) == b"PK\x03\x04"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {str(path)!r}: it holds Python objects other than tensors and plain "
            f"data, which could run code when unpickled ({reason}). dltrain checkpoints never do; "
            f"do not load this file unless you know where it came from"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} holds a {type(payload).__name__}, not a dltrain payload (a dict)"
        )
    return payload


# ---------------------------------------------------------------------------
# What may go into a payload
# ---------------------------------------------------------------------------

_ATOMS: frozenset[type] = frozenset(
    {str, int, float, bool, complex, bytes, bytearray, type(None), torch.dtype, torch.device, torch.layout}
)
_CONTAINERS: frozenset[type] = frozenset({dict, OrderedDict, list, tuple, set, torch.Size})


def check_plain(obj: Any, where: str = "payload") -> None:
    """Check that ``obj`` holds only what ``torch.load(weights_only=True)`` accepts.

    Raises:
        CheckpointError: Naming the first offending value by its key path
            (``payload['plugins']['mine']['best']``) and its type.
    """
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind in _ATOMS or isinstance(value, torch.Tensor):
            continue
        if kind in (dict, OrderedDict):
            for key, item in value.items():
                if type(key) not in _ATOMS:
                    raise _not_plain(path, key, f"a key of type {type(key).__qualname__}")
                stack.append((item, f"{path}[{key!r}]"))
            continue
        if kind in _CONTAINERS:
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
            continue
        raise _not_plain(path, value, f"a {kind.__module__}.{kind.__qualname__}")


def _not_plain(path: str, value: Any, what: str) -> CheckpointError:
    return CheckpointError(
        f"cannot save a checkpoint: {path} is {what} ({value!r:.60}); checkpoints hold only tensors "
        f"and plain Python data (dict, list, tuple, set, str, int, float, bool, None), so they load "
        f"safely with torch.load(weights_only=True). Convert it (e.g. float(x), x.tolist(), "
        f"torch.as_tensor(x), enum.value) in the state_dict that returns it"
    )


def finite_or_none(value: Any) -> float | None:
    """A metric as a JSON-safe float: None for NaN, inf and non-numbers."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
