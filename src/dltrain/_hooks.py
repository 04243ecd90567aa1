"""Fast, explicit hook calls for the loop: hooks nobody implements cost nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dltrain._plugin_manager import PluginManager

__all__ = ["Hooks"]


class Hooks:
    """The hook callers of one plugin manager, with unimplemented hooks as None.

    The loop fetches each caller once per epoch (:meth:`get`) and skips a
    call entirely when it is None, so a hook that no plugin implements adds
    no Python call per step.
    """

    def __init__(self, manager: PluginManager) -> None:
        self._manager = manager
        self._callers: dict[str, Any] = {}

    def refresh(self) -> None:
        """Re-read which hooks have implementations (call at the start of each run)."""
        relay = self._manager.hook
        self._callers = {
            name: caller
            for name, caller in vars(relay).items()
            if not name.startswith("_") and caller.get_hookimpls()
        }

    def get(self, name: str) -> Any:
        """The caller of hook ``name``, or None when no plugin implements it."""
        return self._callers.get(name)

    def call(self, name: str, **kwargs: Any) -> list[Any]:
        """Call hook ``name`` (all implementations); nothing happens without any."""
        caller = self._callers.get(name)
        if caller is None:
            return []
        result: list[Any] = caller(**kwargs)
        return result

    def call_first(self, name: str, **kwargs: Any) -> Any:
        """Call a first-result hook ``name``; None without implementations."""
        caller = self._callers.get(name)
        return None if caller is None else caller(**kwargs)
