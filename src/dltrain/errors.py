"""The exceptions dltrain raises.

Every error dltrain raises on purpose is a :class:`DltrainError`, so one
``except DltrainError`` catches them all. Each message names the bad value,
where it came from, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DltrainError",
    "NonFiniteError",
    "PluginError",
    "StepError",
]


class DltrainError(Exception):
    """Base class of every error dltrain raises deliberately."""


class ConfigError(DltrainError):
    """A configuration file or value could not be used (bad path, bad format)."""


class PluginError(DltrainError):
    """A plugin could not be registered, or one of its hooks raised.

    The message names the plugin, the hook, and the fix. When a hook raised,
    the original exception is chained as ``__cause__`` so its traceback is kept.
    """


class DeviceError(DltrainError):
    """The requested device does not exist on this machine."""


class DataError(DltrainError):
    """The training or evaluation data cannot be used (empty, missing, wrong shape)."""


class StepError(DltrainError):
    """The model, loss function or optimizer cannot run a training step as given."""


class NonFiniteError(DltrainError):
    """A loss or gradient became NaN or infinite and the policy is ``"raise"``."""


class CheckpointError(DltrainError):
    """A checkpoint cannot be written, read or trusted (corrupt, truncated, unsafe)."""
