"""dltrain: a small, fast, trustworthy training loop for any PyTorch model.

Public names only; everything else is private. ``import dltrain`` loads
torch, pluggy and pydantic, and nothing optional (torchvision, progress
bars, plotting, loggers load only when used).
"""

from __future__ import annotations

from typing import Any

from dltrain._markers import hookimpl, hookspec
from dltrain._plugin_manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, PluginInfo
from dltrain._rng import seed_everything
from dltrain.config import CheckpointConfig, TrainerConfig
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
from dltrain.state import History, Phase, RunKind, State, StepOutput
from dltrain.trainer import Trainer

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DltrainError",
    "History",
    "InMemoryLoader",
    "NonFiniteError",
    "Phase",
    "PluginError",
    "PluginInfo",
    "RunKind",
    "State",
    "StepError",
    "StepOutput",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "hookimpl",
    "hookspec",
    "seed_everything",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("dltrain")
    raise AttributeError(f"module 'dltrain' has no attribute {name!r}")
