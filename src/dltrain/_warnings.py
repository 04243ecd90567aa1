"""Warnings attributed to the user's code, not to the plugin or hook that raised them."""

from __future__ import annotations

import os
import sys
import warnings

import pluggy

__all__ = ["warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PLUGGY_DIR = os.path.dirname(os.path.abspath(pluggy.__file__)) + os.sep
# dltrain, pluggy, the generated hook callers (dltrain._hooks) and frozen standard modules.
_INTERNAL_PREFIXES = (_PACKAGE_DIR, _PLUGGY_DIR, "<dltrain hook caller ", "<frozen ")


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_PREFIXES)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first caller outside dltrain and pluggy.

    A warning from a built-in plugin's hook then names the line of the user's
    script that started the run (``trainer.fit(...)``), as a warning from
    Python's standard library names the line that called it, instead of a
    frame inside the loop. Without such a frame (the ``dltrain`` command), it
    points at its own caller.
    """
    frame = sys._getframe(1)
    level = 2  # warnings.warn's stacklevel of this function's caller
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
