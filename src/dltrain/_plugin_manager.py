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

PER_PLUGIN_HOOKS = frozenset({"compute_metrics", "state_dict", "load_state_dict", "on_exception"})
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
        self._pm = pluggy.PluginManager(PROJECT_NAME)
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
        self._code_index = self._index_hook_code()

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
        """The underlying ``pluggy.PluginManager`` (for advanced use)."""
        return self._pm

    def plugins(self) -> list[PluginInfo]:
        """The registered plugins, in registration order."""
        return list(self._info.values())

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

            def call(_impl: Any = impl, **kwargs: Any) -> Any:
                return _impl.function(*[kwargs[a] for a in _impl.argnames])

            yield impl.plugin_name, call

    def call_each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call ``hook_name`` on each implementing plugin separately, in call order.

        Yields ``(plugin_name, result)``. Used where results belong to one
        plugin (metric names, checkpoint state), so they can be attributed.
        """
        for name, call in self.each_impl(hook_name):
            yield name, call(**kwargs)

    # -- errors ------------------------------------------------------------

    def _index_hook_code(self) -> dict[types.CodeType, tuple[str, str, str]]:
        index: dict[types.CodeType, tuple[str, str, str]] = {}
        for hook_name in _HOOK_NAMES:
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                fn = getattr(impl.function, "__func__", impl.function)
                code = getattr(fn, "__code__", None)
                if code is not None:
                    source = self._info[impl.plugin_name].source if impl.plugin_name in self._info else "user"
                    index[code] = (impl.plugin_name, hook_name, source)
        return index

    def culprit(self, exc: BaseException) -> tuple[str, str, str] | None:
        """The (plugin name, hook name, source) whose hook raised ``exc``, if any.

        Walks the traceback for the innermost frame that belongs to a hook
        implementation: free at run time, since nothing is wrapped.
        """
        found = None
        tb = exc.__traceback__
        while tb is not None:
            hit = self._code_index.get(tb.tb_frame.f_code)
            if hit is not None:
                found = hit
            tb = tb.tb_next
        return found


def hookspecs_in_order() -> list[str]:
    """Hook names in the order they are declared in :mod:`dltrain.hookspecs`."""
    return [n for n in vars(hookspecs) if n in _HOOK_NAMES]
