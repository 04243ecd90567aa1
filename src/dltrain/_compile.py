"""``torch.compile`` for the Trainer: the backend checked before a run, the wrapper reused between runs."""

from __future__ import annotations

import difflib

import torch

from dltrain.config import CompileOptions
from dltrain.errors import ConfigError

__all__ = ["Compiler", "check_backend"]


def check_backend(backend: str) -> None:
    """Raise a ConfigError, before anything runs, when ``backend`` is not a torch.compile backend."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        close = difflib.get_close_matches(backend, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"compile.backend {backend!r} is not a torch.compile backend; {hint}the known ones are "
            f"{', '.join(known)} (backends of other packages register when they are imported)"
        )


class Compiler:
    """Compiles a run's model, reusing the wrapper of the previous run of the same model.

    A new ``torch.compile`` wrapper would compile again at its first step;
    ``validate`` after ``fit``, or a second ``fit``, reuse the last one when
    the module and the options are the same.
    """

    def __init__(self) -> None:
        self._last: tuple[torch.nn.Module, CompileOptions, torch.nn.Module] | None = None

    def forget(self) -> None:
        """Drop the last wrapper (and the module it compiled)."""
        self._last = None

    def wrap(self, model: torch.nn.Module, options: CompileOptions) -> torch.nn.Module:
        """``torch.compile(model)`` with ``options``; ``model`` itself when the user compiled it
        already (under DDP: the module inside)."""
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        if hasattr(inner, "_orig_mod"):
            return model
        if self._last is not None:
            source, last_options, last_wrapper = self._last
            if source is model and last_options == options:
                return last_wrapper
        wrapper: torch.nn.Module = torch.compile(  # type: ignore[assignment]
            model,
            backend=options.backend,
            mode=options.mode,
            fullgraph=options.fullgraph,
            dynamic=options.dynamic,
        )
        self._last = (model, options, wrapper)
        return wrapper
