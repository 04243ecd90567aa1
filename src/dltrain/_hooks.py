"""Fast, explicit hook calls for the loop: hooks nobody implements cost nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dltrain._plugin_manager import PluginManager

__all__ = ["Hooks"]


def _direct(impls: list[Any], *, firstresult: bool) -> Any:
    """Call plain (non-wrapper) hook implementations as pluggy would, without its dispatch.

    Same semantics as pluggy's multicall when no wrapper is involved: the
    implementations run last-registered first, each with keyword arguments
    restricted to its own argnames; a first-result hook stops at the first
    non-None result, any other collects the non-None results in a list.
    Exceptions propagate unchanged.
    """
    calls = [(impl.function, tuple(impl.argnames)) for impl in reversed(impls)]
    if len(calls) == 1:
        function, argnames = calls[0]
        if firstresult:

            def call_one_first(**kwargs: Any) -> Any:
                return function(*[kwargs[a] for a in argnames])

            return call_one_first

        def call_one(**kwargs: Any) -> Any:
            result = function(*[kwargs[a] for a in argnames])
            return [] if result is None else [result]

        return call_one

    if firstresult:

        def call_first(**kwargs: Any) -> Any:
            for function, argnames in calls:
                result = function(*[kwargs[a] for a in argnames])
                if result is not None:
                    return result
            return None

        return call_first

    def call_all(**kwargs: Any) -> Any:
        results = []
        for function, argnames in calls:
            result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                results.append(result)
        return results

    return call_all


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
        """Re-read which hooks have implementations (call at the start of each run).

        A hook whose implementations are all plain (no wrappers) is called
        directly, without pluggy's dispatch: the same result, a few
        microseconds less per call. Hooks with wrappers go through pluggy.
        """
        relay = self._manager.hook
        self._callers = {}
        for name, caller in vars(relay).items():
            if name.startswith("_"):
                continue
            impls = caller.get_hookimpls()
            if not impls:
                continue
            if not any(impl.wrapper or impl.hookwrapper for impl in impls):
                firstresult = bool(caller.spec is not None and caller.spec.opts.get("firstresult"))
                self._callers[name] = _direct(impls, firstresult=firstresult)
            else:
                self._callers[name] = caller

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
