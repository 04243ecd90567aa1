"""The pluggy markers for the ``dltrain`` project name.

Use :data:`hookimpl` to mark a plugin's hook implementations; dltrain's own
specifications in :mod:`dltrain.hookspecs` are marked with :data:`hookspec`.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "dltrain"

#: The distribution's name on the package index (``pip install torch-dltrain``); the import name is ``dltrain``.
DISTRIBUTION = "torch-dltrain"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a hook specification (used by :mod:`dltrain.hookspecs`)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a hook implementation in a plugin: ``@dltrain.hookimpl``."""
