"""One pluggy PluginManager per Trainer: built-ins, entry points, then the user's.

Registration order decides call order (pluggy calls the newest first), so
user plugins run before entry-point plugins, which run before built-ins;
``tryfirst``/``trylast`` and wrappers adjust that where it matters.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from dltrain import hookspecs
from dltrain._hooks import CALLER_FILE_PREFIX
from dltrain._markers import PROJECT_NAME
from dltrain.errors import PluginError

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "PluginInfo", "PluginManager"]

ENTRY_POINT_GROUP = "dltrain"
"""The entry-point group third-party plugin distributions register under."""

DISABLE_AUTOLOAD_ENV = "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD"
"""Environment variable that, set to a non-empty value other than ``0``, skips entry points."""

_BUILTIN_FACTORIES: tuple[tuple[str, str], ...] = (
    ("device", "dltrain.default_plugins.device:make_plugin"),
    ("distributed", "dltrain.default_plugins.distributed:make_plugin"),
    ("step", "dltrain.default_plugins.step:make_plugin"),
    ("metrics", "dltrain.default_plugins.metrics:make_plugin"),
    ("progress", "dltrain.default_plugins.progress:make_plugin"),
    ("metric_log", "dltrain.default_plugins.metric_log:make_plugin"),
    ("checkpoint", "dltrain.default_plugins.checkpoint:make_plugin"),
    # Last: its on_fit_end is a tryfirst wrapper, the outermost layer of that hook,
    # and among tryfirst wrappers pluggy enters the last registered first. So its
    # KeyboardInterrupt / SystemExit(143) comes after every built-in's on_fit_end,
    # the checkpoint plugin's final save included, whatever their markers.
    ("signals", "dltrain.default_plugins.signals:make_plugin"),
)
"""Built-in plugins in registration order: (name, "module:factory"). Each factory takes the TrainerConfig and returns a plugin, or None when the config turns the plugin off (pay only for what is used)."""

BUILTIN_PLUGINS: tuple[str, ...] = tuple(name for name, _ in _BUILTIN_FACTORIES)
"""Names of the built-in plugins, each of which ``disable_plugins`` can block."""

PER_PLUGIN_HOOKS = frozenset(
    {
        "compute_metrics",
        "compute_step_metrics",
        "state_dict",
        "load_state_dict",
        "on_exception",
        "on_teardown",
    }
)
"""Hooks the Trainer calls on each plugin separately (their results belong to one plugin), so wrappers cannot wrap them."""

_HOOK_NAMES = frozenset(
    name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "dltrain_spec")
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin came from.

    Attributes:
        name: The plugin's name (what ``disable_plugins`` matches).
        source: ``"builtin"``, ``"entrypoint"`` or ``"user"``.
        origin: The module, entry point or class it came from.
        hooks: Names of the hooks it implements.
    """

    name: str
    source: str
    origin: str
    hooks: tuple[str, ...]


def _plugin_name(plugin: object) -> str:
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return type(plugin).__name__


def _describe(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return f"module {plugin.__name__}"
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _autoload_disabled_by_env() -> bool:
    value = os.environ.get(DISABLE_AUTOLOAD_ENV, "")
    return value not in ("", "0")


def _import_factory(spec: str) -> Callable[[TrainerConfig], object | None]:
    module_name, attr = spec.split(":")
    module = __import__(module_name, fromlist=[attr])
    factory: Callable[[TrainerConfig], object | None] = getattr(module, attr)
    return factory


class PluginManager:
    """The plugins of one Trainer and typed access to their hooks.

    Not shared between Trainers: each Trainer builds its own, so two Trainers
    in one process never share plugin state.
    """

    def __init__(self, config: TrainerConfig, plugins: Iterable[object] = ()) -> None:
        self._pm = _PluggyManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        self._blocked = set(config.disable_plugins)
        for name in self._blocked:
            self._pm.set_blocked(name)
        for name, factory_path in _BUILTIN_FACTORIES:
            if name in self._blocked:
                continue
            plugin = _import_factory(factory_path)(config)
            if plugin is not None:
                self.register(plugin, name=name, source="builtin")
        if config.autoload_plugins and not _autoload_disabled_by_env():
            self._load_entry_points()
        for plugin in plugins:
            self.register(plugin, source="user")
        self._check_pending()

    # -- registration ------------------------------------------------------

    def register(self, plugin: object, *, name: str | None = None, source: str = "user") -> None:
        """Register one plugin instance (or module) under its name.

        Raises:
            PluginError: for a class instead of an instance, a duplicate name,
                or a hook implementation with arguments its hook does not have.
        """
        if inspect.isclass(plugin):
            raise PluginError(
                f"plugin {plugin.__qualname__!r} is a class, not an instance: "
                f"register {plugin.__qualname__}() (forgot the ()?)"
            )
        name = name or _plugin_name(plugin)
        if name in self._blocked:
            return
        if self._pm.has_plugin(name) and source == "user" and self._info[name].source == "entrypoint":
            # Your own instance of an installed plugin (configured in code) replaces the autoloaded one.
            self._pm.unregister(name=name)
            del self._info[name]
        if self._pm.has_plugin(name):
            raise PluginError(
                f"two plugins are named {name!r} ({self._info[name].origin} and {_describe(plugin)}); "
                f"give one a different `name` attribute"
            )
        self._check_impls(name, plugin)
        try:
            self._pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(self._explain_validation(name, plugin, exc)) from exc
        hooks = tuple(sorted(hc.name for hc in self._pm.get_hookcallers(plugin) or ()))
        self._info[name] = PluginInfo(name, source, _describe(plugin), hooks)

    @staticmethod
    def _check_impls(name: str, plugin: object) -> None:
        """Refuse what pluggy would accept but never call as written."""
        for hook in _HOOK_NAMES:
            impl = getattr(plugin, hook, None)
            opts = getattr(impl, "dltrain_impl", None)
            if impl is None or opts is None:
                continue
            if hook in PER_PLUGIN_HOOKS and (opts.get("wrapper") or opts.get("hookwrapper")):
                raise PluginError(
                    f"plugin {name!r} implements {hook!r} as a wrapper, but {hook} is called on each "
                    f"plugin separately, so a wrapper would never run; implement it as a plain hook"
                )
            keyword_only = [
                p.name
                for p in inspect.signature(impl).parameters.values()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
            ]
            if keyword_only:
                raise PluginError(
                    f"plugin {name!r} implements {hook!r} with keyword-only or ** parameter(s) "
                    f"{keyword_only}; hooks pass their arguments by name to ordinary parameters: "
                    f"def {hook}(self, {', '.join(p.lstrip('*') for p in keyword_only)})"
                )

    def _load_entry_points(self) -> None:
        import importlib.metadata  # only when autoloading: it costs ~20 ms to import

        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._blocked or self._pm.has_plugin(ep.name):
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} failed to import: "
                    f"{exc!r}; fix or uninstall that distribution, or set "
                    f"{DISABLE_AUTOLOAD_ENV}=1 / disable_plugins=[{ep.name!r}]"
                ) from exc
            # A class (or other factory) makes a fresh instance per Trainer,
            # so plugin state is never shared between Trainers.
            plugin = obj if isinstance(obj, types.ModuleType) or not callable(obj) else obj()
            self.register(plugin, name=ep.name, source="entrypoint")
            info = self._info[ep.name]
            self._info[ep.name] = PluginInfo(info.name, info.source, f"entry point {ep.value}", info.hooks)

    def _explain_validation(self, name: str, plugin: object, exc: pluggy.PluginValidationError) -> str:
        msg = str(exc)
        for hook in _HOOK_NAMES:
            impl = getattr(plugin, hook, None)
            if impl is None or not hasattr(impl, "dltrain_impl"):
                continue
            spec_args = set(inspect.signature(getattr(hookspecs, hook)).parameters)
            impl_args = [p for p in inspect.signature(impl).parameters if p != "self"]
            extra = [a for a in impl_args if a not in spec_args]
            if extra:
                return (
                    f"plugin {name!r} implements hook {hook!r} with argument(s) {extra} that the hook "
                    f"does not have; {hook} is called with {sorted(spec_args)} (take any subset of them)"
                )
        return f"plugin {name!r} cannot be registered: {msg}"

    def _check_pending(self) -> None:
        for name, plugin in self._pm.list_name_plugin():
            for attr in dir(plugin):
                if attr in _HOOK_NAMES:
                    continue
                try:
                    value = getattr(plugin, attr)
                except Exception:
                    continue
                if callable(value) and hasattr(value, "dltrain_impl"):
                    close = difflib.get_close_matches(attr, sorted(_HOOK_NAMES), n=1)
                    hint = (
                        f"; did you mean {close[0]!r}?" if close else "; see dltrain.hookspecs for the hooks"
                    )
                    raise PluginError(
                        f"plugin {name!r} marks {attr!r} with @hookimpl but there is no hook {attr!r}{hint}"
                    )
        self._pm.check_pending()

    # -- introspection -----------------------------------------------------

    @property
    def hook(self) -> Any:
        """pluggy's hook relay: ``pm.hook.on_fit_start(trainer=..., state=...)``."""
        return self._pm.hook

    @property
    def pluggy_manager(self) -> pluggy.PluginManager:
        """The underlying ``pluggy.PluginManager`` (for advanced use).

        Its ``enable_tracing()`` and ``add_hookcall_monitoring()`` see every
        hook call the Trainer makes: while one is installed, hooks are called
        through pluggy's dispatch (slower by a few microseconds a call) instead
        of the generated callers. Install it before a run, or between epochs.
        """
        return self._pm

    @property
    def monitored(self) -> bool:
        """Whether a pluggy hook-call monitor (tracing) is installed."""
        return self._pm.monitors > 0

    def plugins(self) -> list[PluginInfo]:
        """The registered plugins, in registration order."""
        return list(self._info.values())

    def user_plugins(self) -> list[object]:
        """The plugins registered by the user (``Trainer(plugins=[...])``), in registration order."""
        return [self._pm.get_plugin(name) for name, info in self._info.items() if info.source == "user"]

    def get_plugin(self, name: str) -> object | None:
        """The plugin registered under ``name``, or None."""
        return self._pm.get_plugin(name)

    def implementers(self, hook_name: str) -> list[str]:
        """Names of the plugins implementing ``hook_name``, in the order they are called."""
        caller = getattr(self._pm.hook, hook_name)
        impls = list(reversed(caller.get_hookimpls()))
        # Wrappers run around the others: list them first, as they are entered first.
        wrappers = [i for i in impls if i.hookwrapper or i.wrapper]
        plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
        return [i.plugin_name + (" (wrapper)" if i in wrappers else "") for i in wrappers + plain]

    def explain(self) -> str:
        """A table: for each hook, the plugins that implement it, in call order."""
        lines = []
        for hook_name in hookspecs_in_order():
            names = self.implementers(hook_name)
            lines.append(f"{hook_name:26s} {', '.join(names) if names else '-'}")
        return "\n".join(lines)

    def has_impls(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name``."""
        return bool(getattr(self._pm.hook, hook_name).get_hookimpls())

    def each_impl(self, hook_name: str) -> Iterator[tuple[str, Callable[..., Any]]]:
        """Each plugin's implementation of ``hook_name`` as ``(plugin_name, call)``, in call order.

        ``call(**kwargs)`` calls that one implementation as pluggy would (with
        the arguments it names). Used for the hooks in :data:`PER_PLUGIN_HOOKS`,
        whose results or arguments belong to one plugin.
        """
        caller = getattr(self._pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                continue
            via = None
            if self.monitored:  # through pluggy's dispatch, so that its monitors see the call
                others = [p for p in self._pm.get_plugins() if p is not impl.plugin]
                via = self._pm.subset_hook_caller(hook_name, others)
            yield impl.plugin_name, _ImplCall(impl, hook_name, via)

    def call_each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call ``hook_name`` on each implementing plugin separately, in call order.

        Yields ``(plugin_name, result)``. Used where results belong to one
        plugin (metric names, checkpoint state), so they can be attributed.
        """
        for name, call in self.each_impl(hook_name):
            yield name, call(**kwargs)

    # -- errors ------------------------------------------------------------

    def culprit(self, exc: BaseException) -> tuple[str, str, str] | None:
        """The (plugin name, hook name, source) whose hook implementation raised ``exc``, if any.

        Read from the traceback alone, at the innermost place where a hook
        implementation was called (see :func:`_called_impl`), so it costs
        nothing at run time and names the implementation as it was called,
        even when several share one code object (``functools.wraps``
        decorators, generated methods).
        """
        found = None
        tb = exc.__traceback__
        by_code: dict[types.CodeType, set[tuple[str, str]]] | None = None
        while tb is not None:
            hit = self._called_impl(tb)
            if hit is None:
                # A frame of an implementation itself, entered where none of the above shows it
                # (the tail of a wrapper, after its yield): known by its code when only one has it.
                by_code = self._impls_by_code() if by_code is None else by_code
                owners = by_code.get(tb.tb_frame.f_code, set())
                hit = next(iter(owners)) if len(owners) == 1 else None
            if hit is not None:
                found = hit
            tb = tb.tb_next
        if found is None:
            return None
        plugin, hook = found
        info = self._info.get(plugin)
        return plugin, hook, info.source if info is not None else "user"

    def _called_impl(self, tb: types.TracebackType) -> tuple[str, str] | None:
        """The (plugin, hook) that the frame of ``tb`` was calling when the error passed, if it was
        calling a hook implementation: a generated hook caller (its line names the implementation),
        a per-plugin call (:class:`_ImplCall`), or pluggy's own dispatch (its ``hook_impl``)."""
        frame = tb.tb_frame
        owners = frame.f_globals.get("_dltrain_owners")
        if owners is not None and frame.f_code.co_filename.startswith(CALLER_FILE_PREFIX):
            hit: tuple[str, str] | None = owners.get(tb.tb_lineno)
            return hit
        local_self = frame.f_locals.get("self")
        if isinstance(local_self, _ImplCall):
            return local_self.impl.plugin_name, local_self.hook_name
        hook_impl = frame.f_locals.get("hook_impl")
        inner = tb.tb_next
        if isinstance(hook_impl, pluggy.HookImpl) and inner is not None:
            # pluggy's loop variable names the implementation being set up or called; a wrapper's
            # teardown runs later, under another value, so check that it is the frame called.
            called = getattr(hook_impl.function, "__func__", hook_impl.function)
            if getattr(called, "__code__", None) is inner.tb_frame.f_code:
                hook_name = frame.f_locals.get("hook_name")
                if not isinstance(hook_name, str):
                    hook_name = self._hook_of(hook_impl)
                return hook_impl.plugin_name, hook_name
        return None

    def _impls_by_code(self) -> dict[types.CodeType, set[tuple[str, str]]]:
        """Every implementation's (plugin, hook) by its code, and by the code of the function a
        ``functools.wraps`` decorator wraps (made when an error is explained, never per call)."""
        index: dict[types.CodeType, set[tuple[str, str]]] = {}
        for hook_name in _HOOK_NAMES:
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                function = getattr(impl.function, "__func__", impl.function)
                for fn in {function, inspect.unwrap(function)}:
                    code = getattr(fn, "__code__", None)
                    if code is not None:
                        index.setdefault(code, set()).add((impl.plugin_name, hook_name))
        return index

    def _hook_of(self, hook_impl: pluggy.HookImpl) -> str:
        for name, caller in vars(self._pm.hook).items():
            if any(impl is hook_impl for impl in caller.get_hookimpls()):
                return str(name)
        return "?"


class _PluggyManager(pluggy.PluginManager):
    """pluggy's manager, counting the hook-call monitors installed on it.

    ``enable_tracing`` and ``add_hookcall_monitoring`` wrap pluggy's dispatch;
    the Trainer calls most hooks through generated callers that bypass it (a
    few microseconds less per call), so while a monitor is installed it calls
    every hook through pluggy instead, and the monitor sees every call.
    """

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.monitors = 0

    def add_hookcall_monitoring(self, before: Any, after: Any) -> Callable[[], None]:
        undo = super().add_hookcall_monitoring(before, after)
        self.monitors += 1
        undone = False

        def undo_and_count() -> None:
            nonlocal undone
            undo()
            if not undone:
                undone = True
                self.monitors -= 1

        return undo_and_count


class _ImplCall:
    """One plugin's implementation of one hook, called as pluggy would (with the arguments it names)."""

    __slots__ = ("hook_name", "impl", "via")

    def __init__(self, impl: pluggy.HookImpl, hook_name: str, via: Any = None) -> None:
        self.impl = impl
        self.hook_name = hook_name
        self.via = via  # a pluggy caller over this plugin alone, while a monitor is installed

    def __call__(self, **kwargs: Any) -> Any:
        if self.via is not None:
            results = self.via(**kwargs)
            return results[0] if results else None
        impl = self.impl
        return impl.function(*[kwargs[a] for a in impl.argnames])


def hookspecs_in_order() -> list[str]:
    """Hook names in the order they are declared in :mod:`dltrain.hookspecs`."""
    return [n for n in vars(hookspecs) if n in _HOOK_NAMES]
