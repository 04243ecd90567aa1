"""Finding, verifying and loading a checkpoint to continue a run from it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dltrain._warnings import warn
from dltrain.checkpoint._io import MANIFEST_SUFFIX, PAYLOAD_SUFFIX, read_manifest, safe_load, verify_payload
from dltrain.checkpoint._store import CheckpointInfo, rank_best, scan
from dltrain.errors import CheckpointError

__all__ = [
    "COMPUTE_FIELDS",
    "compare_for_resume",
    "load_checkpoint",
    "load_for_resume",
    "resolve_manifest",
    "verify_checkpoint",
]

#: Config fields whose change alters what the rest of a resumed run computes.
#: (``max_epochs``/``max_steps`` are left out: extending a run is what resuming is for;
#: so are ``device`` and ``seed``: the RNG state is restored from the checkpoint.)
COMPUTE_FIELDS: tuple[str, ...] = (
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "scheduler_interval",
    "limit_train_batches",
)

_SPECIAL = ("last", "best")
_MAX_LISTED = 8


def resolve_manifest(path: str | os.PathLike[str]) -> Path:
    """The manifest of the checkpoint at ``path`` (its ``.ckpt``, its ``.json``, or their stem).

    Raises:
        CheckpointError: Nothing is there.
    """
    p = Path(path)
    if p.suffix == MANIFEST_SUFFIX:
        manifest = p
    elif p.suffix == PAYLOAD_SUFFIX:
        manifest = p.with_suffix(MANIFEST_SUFFIX)
    else:
        manifest = p.with_name(p.name + MANIFEST_SUFFIX)
    if not manifest.exists() and not manifest.with_suffix(PAYLOAD_SUFFIX).exists() and not p.exists():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; pass a checkpoint's .ckpt file, its .json manifest, "
            f"a checkpoint directory, or 'last' / 'best' with checkpoint.dir set"
        )
    return manifest


def verify_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Check a checkpoint completely: manifest, payload size and sha256.

    Args:
        path: The checkpoint's ``.ckpt`` file, its ``.json`` manifest, or their common stem.

    Returns:
        Its :class:`CheckpointInfo`.

    Raises:
        CheckpointError: Naming the file and what is wrong with it.
    """
    manifest_path = resolve_manifest(path)
    info = CheckpointInfo.from_manifest(read_manifest(manifest_path), manifest_path)
    verify_payload(info.manifest, info.payload_path)
    return info


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a checkpoint and load its payload safely (``weights_only=True``) onto the CPU.

    Raises:
        CheckpointError: The checkpoint is incomplete, corrupt, or holds unsafe objects.
    """
    info = verify_checkpoint(path)
    return safe_load(info.payload_path)


def _bad(path: Path | str, problem: str) -> str:
    return problem if str(path) in problem else f"{path}: {problem}"


def _try_in_order(
    candidates: Iterable[CheckpointInfo], what: str, directory: Path
) -> tuple[dict[str, Any], Path]:
    problems: list[str] = []
    for info in candidates:
        try:
            verify_payload(info.manifest, info.payload_path)
            payload = safe_load(info.payload_path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warn(f"skipping checkpoint {str(info.payload_path)!r} for resume={what!r}: {exc}")
            continue
        return payload, info.payload_path
    raise CheckpointError(
        f"no intact checkpoint in {str(directory)!r} for resume={what!r}; every candidate failed:\n  - "
        + "\n  - ".join(problems)
    )


def load_for_resume(
    resume: str | os.PathLike[str], directory: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], Path]:
    """Find, verify and safely load the checkpoint a run resumes from.

    Args:
        resume: ``"last"`` (the newest intact checkpoint in ``directory``),
            ``"best"`` (the best by the monitored metric), a checkpoint path
            (its ``.ckpt``, ``.json`` or stem), or a directory (its last).
        directory: The checkpoint directory (``config.checkpoint.dir``), needed
            for ``"last"`` and ``"best"``.

    Returns:
        The payload (what ``trainer.state_dict()`` returned, tensors on the CPU)
        and the path of the ``.ckpt`` file it came from.

    Raises:
        CheckpointError: No directory or no checkpoint; an explicit path that is
            incomplete, corrupt or unsafe. For ``"last"`` and ``"best"``, a bad
            candidate is skipped with a warning naming it, and the next one is
            tried; the error comes only when none is intact.
    """
    if isinstance(resume, str) and resume in _SPECIAL:
        if directory is None:
            raise CheckpointError(
                f"resume={resume!r} needs a checkpoint directory, but checkpointing is off; set "
                f"checkpoint={{'dir': ...}} in the Trainer config, or pass the path of a checkpoint"
            )
        return _load_special(resume, Path(directory))
    p = Path(resume)
    if p.is_dir():
        return _load_special("last", p)
    manifest_path = resolve_manifest(p)
    info = CheckpointInfo.from_manifest(read_manifest(manifest_path), manifest_path)
    verify_payload(info.manifest, info.payload_path)
    return safe_load(info.payload_path), info.payload_path


def _load_special(which: str, directory: Path) -> tuple[dict[str, Any], Path]:
    infos, problems = scan(directory)
    for path, problem in problems:
        warn(f"ignoring {str(path)!r} for resume={which!r}: {problem}")
    if not infos:
        where = "does not exist" if not directory.is_dir() else "holds no complete checkpoint"
        raise CheckpointError(
            f"resume={which!r}: checkpoint directory {str(directory)!r} {where}; point checkpoint.dir "
            f"at the directory of the run to continue, or start without resume"
        )
    if which == "last":
        return _try_in_order(reversed(infos), which, directory)
    ranked = rank_best(infos)
    if not ranked:
        raise CheckpointError(
            f"resume='best': no checkpoint in {str(directory)!r} has a score, because none was saved "
            f"with a monitored metric; set checkpoint.monitor (e.g. 'val_loss'), or use resume='last'"
        )
    return _try_in_order(ranked, which, directory)


# ---------------------------------------------------------------------------
# Compatibility of a checkpoint with the run that resumes from it
# ---------------------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and all(isinstance(d, int) for d in value):
        return tuple(value)
    return None


def _shapes(model: Any) -> dict[str, tuple[int, ...] | None] | None:
    if not isinstance(model, Mapping):
        return None
    return {str(k): _shape(v) for k, v in model.items()}


def _fact(d: Mapping[str, Any], key: str) -> Any:
    """``d[key]``, else ``d['loop'][key]``, else ``d['data'][key]``, else None."""
    if d.get(key) is not None:
        return d[key]
    for section in ("loop", "data"):
        sub = d.get(section)
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            return sub[key]
    return None


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def compare_for_resume(saved_payload: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint and the run about to resume from it.

    Only differences that change what the rest of the run computes count:
    the config fields in :data:`COMPUTE_FIELDS`, the model's parameter and
    buffer names and shapes, the world size and the batch size.

    Args:
        saved_payload: A checkpoint's payload (``config``, ``model``, ``world_size``...).
        current: The same facts for the new run: ``config`` (a TrainerConfig as
            JSON data), ``model`` (a state dict, or names to shapes),
            ``world_size``, and optionally ``batch_size``. Each fact may also
            sit under ``loop`` or ``data``; a fact missing on either side is
            not compared.

    Returns:
        Human-readable differences, one per line item; empty when compatible.
    """
    diffs: list[str] = []
    saved_cfg, cur_cfg = saved_payload.get("config"), current.get("config")
    if isinstance(saved_cfg, Mapping) and isinstance(cur_cfg, Mapping):
        for key in COMPUTE_FIELDS:
            if key in saved_cfg and key in cur_cfg and saved_cfg[key] != cur_cfg[key]:
                diffs.append(f"{key}: {saved_cfg[key]!r} in the checkpoint, {cur_cfg[key]!r} now")
    for key in ("world_size", "batch_size"):
        before, now = _fact(saved_payload, key), _fact(current, key)
        if before is not None and now is not None and before != now:
            diffs.append(f"{key}: {before!r} in the checkpoint, {now!r} now")
    saved_shapes, cur_shapes = _shapes(saved_payload.get("model")), _shapes(current.get("model"))
    if saved_shapes is not None and cur_shapes is not None:
        missing = [k for k in saved_shapes if k not in cur_shapes]
        extra = [k for k in cur_shapes if k not in saved_shapes]
        if missing:
            diffs.append(
                f"model: the checkpoint has {len(missing)} entries this model lacks: {_listed(missing)}"
            )
        if extra:
            diffs.append(f"model: this model has {len(extra)} entries the checkpoint lacks: {_listed(extra)}")
        for key, shape in saved_shapes.items():
            now_shape = cur_shapes.get(key)
            if key in cur_shapes and shape is not None and now_shape is not None and shape != now_shape:
                diffs.append(
                    f"model entry {key!r}: shape {list(shape)} in the checkpoint, {list(now_shape)} now"
                )
    return diffs
