"""Fast, explicit hook calls for the loop: hooks nobody implements cost nothing."""

from __future__ import annotations

import functools
import linecache
import types
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dltrain._plugin_manager import PluginManager

__all__ = ["Hooks"]


#: File names of generated hook callers start with this (tracebacks show them; blame reads them).
CALLER_FILE_PREFIX = "<dltrain hook caller "


def _direct(name: str, spec_args: Sequence[str], impls: Sequence[Any], *, firstresult: bool) -> Any:
    """A function that calls plain (non-wrapper) hook implementations as pluggy would, without its dispatch.

    Same semantics as pluggy's multicall when no wrapper is involved: the
    implementations run last-registered first, each with the arguments it
    names; a first-result hook stops at the first non-None result, any other
    collects the non-None results in a list. Exceptions propagate unchanged.

    The function is generated with the hook's own keyword parameters and one
    positional call per implementation, as :mod:`dataclasses` generates
    ``__init__``: a call then costs two plain Python calls, with no
    keyword-argument dict, no argument list built per implementation and no
    loop (a third of what a generic ``**kwargs`` forwarder costs, per step).

    Its globals also say who is called on which line (``_dltrain_owners``), so
    an error is blamed on the (plugin, hook) that raised it from the traceback
    alone (:func:`blame`), at no cost per call.
    """
    ordered = list(reversed(impls))
    code, lines = _caller_code(name, tuple(spec_args), tuple(tuple(i.argnames) for i in ordered), firstresult)
    namespace: dict[str, Any] = {f"_impl{i}": impl.function for i, impl in enumerate(ordered)}
    namespace["_dltrain_owners"] = {line: (ordered[i].plugin_name, name) for line, i in lines.items()}
    return types.FunctionType(code, namespace, name)


@functools.lru_cache(maxsize=512)
def _caller_code(
    name: str, spec_args: tuple[str, ...], impl_args: tuple[tuple[str, ...], ...], firstresult: bool
) -> tuple[types.CodeType, dict[int, int]]:
    """The code of a caller for :func:`_direct` and the line of each implementation's call
    (line number -> implementation index). It depends only on names, so it is compiled once."""
    body: list[str] = []
    calls: dict[int, int] = {}  # index in body -> implementation
    for i, argnames in enumerate(impl_args):
        call = f"_impl{i}({', '.join(argnames)})"
        calls[len(body)] = i
        if firstresult:
            body += [f"result = {call}", "if result is not None:", "    return result"]
        elif len(impl_args) == 1:
            body += [f"result = {call}", "return [] if result is None else [result]"]
        else:
            body += [f"result = {call}", "if result is not None:", "    results.append(result)"]
    if firstresult:
        body.append("return None")
    elif len(impl_args) > 1:
        body = ["results = []", *body, "return results"]
        calls = {index + 1: i for index, i in calls.items()}
    params = f"*, {', '.join(spec_args)}" if spec_args else ""
    source = f"def {name}({params}):\n" + "".join(f"    {line}\n" for line in body)
    # A file name of its own, with its source in linecache: tracebacks and warnings that pass
    # through the caller show its lines, e.g. "result = _impl1(trainer, state)".
    filename = f"{CALLER_FILE_PREFIX}{name} {zlib.crc32(source.encode()):08x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = compile(source, filename, "exec")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return code, {index + 2: i for index, i in calls.items()}  # line 1 is the def


class Hooks:
    """The hook callers of one plugin manager, with unimplemented hooks as None.

    The loop fetches each caller once per epoch (:meth:`get`) and skips a
    call entirely when it is None, so a hook that no plugin implements adds
    no Python call per step.
    """

    def __init__(self, manager: PluginManager) -> None:
        self._manager = manager
        self._callers: dict[str, Any] = {}
        self._pluggy: dict[str, Any] = {}

    def refresh(self) -> None:
        """Re-read which hooks have implementations (call at the start of each run).

        A hook whose implementations are all plain (no wrappers) is called
        directly, without pluggy's dispatch: the same result, a few
        microseconds less per call. Hooks with wrappers go through pluggy.
        """
        relay = self._manager.hook
        self._callers, self._pluggy = {}, {}
        for name, caller in vars(relay).items():
            if name.startswith("_"):
                continue
            self._pluggy[name] = caller  # a monitor sees every call, to hooks nobody implements too
            impls = caller.get_hookimpls()
            if not impls:
                continue
            if caller.spec is not None and not any(impl.wrapper or impl.hookwrapper for impl in impls):
                firstresult = bool(caller.spec.opts.get("firstresult"))
                self._callers[name] = _direct(name, caller.spec.argnames, impls, firstresult=firstresult)
            else:
                self._callers[name] = caller

    def _table(self) -> dict[str, Any]:
        # Under a pluggy hook-call monitor (enable_tracing), every call goes through pluggy.
        return self._pluggy if self._manager.monitored else self._callers

    def get(self, name: str) -> Any:
        """The caller of hook ``name``, or None when no plugin implements it.

        The loop fetches callers once per run or epoch, not per step.
        """
        return self._table().get(name)

    def call(self, name: str, **kwargs: Any) -> list[Any]:
        """Call hook ``name`` (all implementations); nothing happens without any."""
        caller = self._table().get(name)
        if caller is None:
            return []
        result: list[Any] = caller(**kwargs)
        return result

    def call_first(self, name: str, **kwargs: Any) -> Any:
        """Call a first-result hook ``name``; None without implementations."""
        caller = self._table().get(name)
        return None if caller is None else caller(**kwargs)
