"""Crash-safe checkpoints and bit-exact resume.

A checkpoint is two files in the checkpoint directory: ``step-000000120.ckpt``
(the payload: ``trainer.state_dict()`` written by ``torch.save``) and
``step-000000120.json`` (its manifest: step, epoch, metrics, versions, config,
and the payload's sha256 and size). The manifest is written last, atomically,
and is the commit marker: a payload without a valid manifest is not a
checkpoint, so a crash at any moment of a save leaves the earlier checkpoints
intact and loadable.

Loading always verifies the checksum and uses ``torch.load(weights_only=True)``,
so a damaged file is reported by name and a file crafted to run code is refused.

The built-in plugin :class:`dltrain.default_plugins.checkpoint.CheckpointPlugin`
decides when to save (``TrainerConfig.checkpoint``); ``Trainer.fit(resume=...)``
loads through :func:`load_for_resume`. From a shell::

    python -m dltrain.checkpoint inspect runs/ckpt/step-000000120.ckpt
    python -m dltrain.checkpoint list runs/ckpt
"""

from __future__ import annotations

from dltrain.checkpoint._inspect import format_report, inspect_checkpoint
from dltrain.checkpoint._io import FAULT_ENV, check_plain
from dltrain.checkpoint._lock import DirectoryLock
from dltrain.checkpoint._resume import (
    COMPUTE_FIELDS,
    compare_for_resume,
    load_checkpoint,
    load_for_resume,
    verify_checkpoint,
)
from dltrain.checkpoint._save import save_checkpoint
from dltrain.checkpoint._saver import SaveTiming
from dltrain.checkpoint._store import CheckpointInfo, list_checkpoints, next_name, rank_best

__all__ = [
    "COMPUTE_FIELDS",
    "FAULT_ENV",
    "CheckpointInfo",
    "DirectoryLock",
    "SaveTiming",
    "check_plain",
    "compare_for_resume",
    "format_report",
    "inspect_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_for_resume",
    "next_name",
    "rank_best",
    "save_checkpoint",
    "verify_checkpoint",
]
