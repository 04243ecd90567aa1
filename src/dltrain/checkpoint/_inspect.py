"""What a checkpoint holds, for people: :func:`inspect_checkpoint` and its text form."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dltrain.checkpoint._io import read_manifest, safe_load, verify_payload
from dltrain.checkpoint._resume import resolve_manifest
from dltrain.checkpoint._store import CheckpointInfo
from dltrain.errors import CheckpointError

__all__ = ["format_report", "inspect_checkpoint"]


def _contents(payload: Mapping[str, Any]) -> dict[str, Any]:
    model = payload.get("model")
    tensors = [v for v in model.values() if isinstance(v, torch.Tensor)] if isinstance(model, Mapping) else []
    plugins = payload.get("plugins")
    history = payload.get("history")
    epochs = history.get("epochs") if isinstance(history, Mapping) else None
    return {
        "keys": sorted(str(k) for k in payload),
        "model_tensors": len(tensors),
        "model_values": sum(t.numel() for t in tensors),
        "plugins": sorted(plugins) if isinstance(plugins, Mapping) else [],
        "history_epochs": len(epochs) if isinstance(epochs, list) else None,
    }


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint and verify it, without raising on damage.

    Args:
        path: The checkpoint's ``.ckpt`` file, its ``.json`` manifest, or their stem.

    Returns:
        A JSON-ready dict: ``ok`` (True when the manifest is valid, the
        payload matches its size and sha256, and it loads safely),
        ``problems`` (what is wrong, each naming the file), ``path``,
        ``manifest_path``, and, as far as the manifest could be read,
        ``name``, ``global_step``, ``epoch``, ``batch_idx``, ``micro_step``,
        ``stage``, ``trigger``, ``created``, ``metrics``, ``monitor``,
        ``mode``, ``score``, ``versions``, ``config``, ``payload_bytes``,
        ``payload_sha256``, and, when it loaded, ``contents`` (payload keys,
        model tensor and value counts, plugin names, epochs of history).
    """
    report: dict[str, Any] = {"path": str(path), "ok": False, "problems": []}
    try:
        manifest_path = resolve_manifest(path)
        report["manifest_path"] = str(manifest_path)
        info = CheckpointInfo.from_manifest(read_manifest(manifest_path), manifest_path)
    except CheckpointError as exc:
        report["problems"].append(str(exc))
        return report
    m = info.manifest
    report.update(
        path=str(info.payload_path),
        name=info.name,
        global_step=info.global_step,
        epoch=info.epoch,
        batch_idx=info.batch_idx,
        micro_step=info.micro_step,
        stage=info.stage,
        trigger=info.trigger,
        created=info.created,
        metrics=info.metrics,
        monitor=info.monitor,
        mode=info.mode,
        score=info.score,
        versions=info.versions,
        config=m.get("config"),
        payload_bytes=info.payload_bytes,
        payload_sha256=info.payload_sha256,
    )
    try:
        verify_payload(m, info.payload_path)
        payload = safe_load(info.payload_path, mmap=True)
    except CheckpointError as exc:
        report["problems"].append(str(exc))
        return report
    report["contents"] = _contents(payload)
    report["ok"] = True
    return report


def _fmt_metrics(metrics: Mapping[str, Any]) -> str:
    parts = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())]
    return "  ".join(parts) or "(none)"


def format_report(report: Mapping[str, Any]) -> str:
    """The text that ``python -m dltrain.checkpoint inspect`` prints for one report."""
    lines = [f"checkpoint  {report['path']}"]
    if report["ok"]:
        lines.append(f"status      OK (size and sha256 match the manifest; {report['payload_bytes']} bytes)")
    else:
        lines.append("status      DAMAGED OR UNSAFE")
        lines.extend(f"  problem   {p}" for p in report["problems"])
    if "global_step" not in report:
        return "\n".join(lines)
    lines.append(
        f"position    global step {report['global_step']}, epoch {report['epoch'] + 1} "
        f"(completed before it: {report['epoch']}), batch {report['batch_idx']}, "
        f"micro-step {report['micro_step']}, stage {report['stage']}"
    )
    lines.append(f"saved       {report['created']} (trigger: {report['trigger']})")
    lines.append(f"metrics     {_fmt_metrics(report['metrics'] or {})}")
    if report.get("monitor"):
        lines.append(f"ranked by   {report['monitor']} ({report['mode']}): score {report['score']}")
    versions = report.get("versions") or {}
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    contents = report.get("contents")
    if contents:
        lines.append(
            f"contents    {', '.join(contents['keys'])}; model: {contents['model_tensors']} tensors, "
            f"{contents['model_values']:,} values; plugins: {', '.join(contents['plugins']) or '(none)'}"
        )
    if report.get("config") is not None:
        config = json.dumps(report["config"], indent=2, sort_keys=True)
        lines.append("config      " + config.replace("\n", "\n            "))
    return "\n".join(lines)


def inspect_directory(directory: Path) -> list[dict[str, Any]]:
    """Reports for every checkpoint-like file pair in ``directory``, in name order."""
    from dltrain.checkpoint._store import is_checkpoint_name

    stems = sorted(
        {p.stem for p in directory.iterdir() if p.suffix in (".ckpt", ".json") and is_checkpoint_name(p.stem)}
    )
    return [inspect_checkpoint(directory / stem) for stem in stems]
