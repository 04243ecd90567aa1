"""Batteries included: tools around a run that are not built-in plugins.

``lr_find`` (:mod:`dltrain.callbacks.lr_find`): the learning-rate range test.
``Profiler`` (:mod:`dltrain.callbacks.profiler`): an opt-in plugin that writes
``torch.profiler`` traces of training steps.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Bound now, not lazily: the function has its module's name, and importing the module
# (``from dltrain.callbacks.lr_find import LRFindResult``) sets the package attribute
# ``lr_find`` to the module, which a lazy look-up would then never replace. Cheap: the
# module imports nothing that ``import dltrain`` has not loaded, bar two small private modules.
from dltrain.callbacks.lr_find import lr_find

if TYPE_CHECKING:
    from dltrain.callbacks.profiler import Profiler

__all__ = ["Profiler", "lr_find"]

_LAZY = {"Profiler": "dltrain.callbacks.profiler"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dltrain.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
