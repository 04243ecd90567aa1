"""Callbacks people reach for in their first week, each an ordinary plugin on the public hooks.

Register an instance like any plugin (``Trainer(plugins=[EarlyStopping()])``),
or name it in a run file's ``plugins:`` list
(``{class_path: "dltrain.callbacks:EarlyStopping", init_args: {patience: 5}}``).
Each is resumable (its state is in every checkpoint), safe under torchrun
(it prints on rank 0 only; a stop goes through
:meth:`~dltrain.Trainer.request_stop`, which every process agrees on) and
costs nothing when it is not registered: ``import dltrain`` does not import
this package, and this package imports a callback's module only when the
callback is first used.

| name | what it does |
| --- | --- |
| :class:`EarlyStopping` | stops when a monitored metric stops improving, or is not finite |
| :class:`LearningRateMonitor` | logs every parameter group's learning rate (and momentum or betas) |
| :class:`EMA` | keeps an exponential moving average of the weights; evaluates with it |
| :class:`TimeLimit` | stops before a wall-clock limit, leaving time for the final checkpoint |
| :class:`GradientNormMonitor` | logs the gradient norm every logging interval, without a sync per step |
| :class:`ModelSummary` | prints the parameters per module at fit start |
| :func:`lr_find` | finds a learning rate by a short range test |
| :class:`Profiler` | writes ``torch.profiler`` traces of a few training steps |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dltrain.callbacks.early_stopping import EarlyStopping
    from dltrain.callbacks.ema import EMA
    from dltrain.callbacks.grad_norm import GradientNormMonitor
    from dltrain.callbacks.lr_finder import LRFindResult, lr_find
    from dltrain.callbacks.lr_monitor import LearningRateMonitor
    from dltrain.callbacks.model_summary import ModelSummary
    from dltrain.callbacks.profiler import Profiler
    from dltrain.callbacks.time_limit import TimeLimit

# Each public name and the module that defines it, imported on first access (PEP 562): a run
# that uses one callback imports one small module. A callback added later needs only a line here.
_LAZY = {
    "EarlyStopping": "dltrain.callbacks.early_stopping",
    "EMA": "dltrain.callbacks.ema",
    "GradientNormMonitor": "dltrain.callbacks.grad_norm",
    "LearningRateMonitor": "dltrain.callbacks.lr_monitor",
    "ModelSummary": "dltrain.callbacks.model_summary",
    "TimeLimit": "dltrain.callbacks.time_limit",
    "Profiler": "dltrain.callbacks.profiler",
    "lr_find": "dltrain.callbacks.lr_finder",  # the module's name is not the function's:
    "LRFindResult": "dltrain.callbacks.lr_finder",  # importing it never shadows the function
}

__all__ = [
    "EMA",
    "EarlyStopping",
    "GradientNormMonitor",
    "LRFindResult",
    "LearningRateMonitor",
    "ModelSummary",
    "Profiler",
    "TimeLimit",
    "lr_find",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dltrain.callbacks' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
