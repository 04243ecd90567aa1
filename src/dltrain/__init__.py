"""dltrain: a small, fast, trustworthy training loop for any PyTorch model.

Public names only; everything else is private. ``import dltrain`` loads
torch and pluggy. The Trainer and the configuration (which need pydantic)
load on first use of ``dltrain.Trainer``, ``dltrain.TrainerConfig``,
``dltrain.CheckpointConfig`` or ``dltrain.CompileOptions``, so plugin modules that only need
``dltrain.hookimpl`` import fast; optional parts (torchvision, progress
bars, plotting, loggers) load only when a run uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dltrain._markers import DISTRIBUTION, hookimpl, hookspec
from dltrain._plugin_manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, PluginInfo
from dltrain._rng import seed_everything
from dltrain.data import InMemoryLoader
from dltrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    DltrainError,
    NonFiniteError,
    PluginError,
    StepError,
)
from dltrain.metrics import EpochMetric, Metric
from dltrain.state import History, Phase, RunKind, Stage, State, StepOutput

if TYPE_CHECKING:
    from dltrain._loop import unwrap_model
    from dltrain.config import CheckpointConfig, CompileOptions, TrainerConfig
    from dltrain.trainer import Trainer

# Public names loaded on first access (PEP 562): those whose modules need pydantic, and the
# loop's unwrap_model, which plugin modules rarely need at import.
_LAZY = {
    "Trainer": "dltrain.trainer",
    "TrainerConfig": "dltrain.config",
    "CheckpointConfig": "dltrain.config",
    "CompileOptions": "dltrain.config",
    "unwrap_model": "dltrain._loop",
}

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "CheckpointConfig",
    "CheckpointError",
    "CompileOptions",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DltrainError",
    "EpochMetric",
    "History",
    "InMemoryLoader",
    "Metric",
    "NonFiniteError",
    "Phase",
    "PluginError",
    "PluginInfo",
    "RunKind",
    "Stage",
    "State",
    "StepError",
    "StepOutput",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "hookimpl",
    "hookspec",
    "seed_everything",
    "unwrap_model",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name == "__version__":
        from importlib.metadata import version

        return version(DISTRIBUTION)
    raise AttributeError(f"module 'dltrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
