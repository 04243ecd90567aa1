"""The run file of ``dltrain fit``: what to train, on what, and how, by import path.

```yaml
seed: 0                                  # seeds Python, NumPy and torch before anything is built
trainer: {max_epochs: 10, device: auto}  # a TrainerConfig
model:
  class_path: my_project.models:Net      # "package.module:Name" (or "package.module.Name")
  init_args: {hidden: 128}
optimizer:
  class_path: torch.optim:SGD            # called as SGD(model.parameters(), **init_args)
  init_args: {lr: 0.01}
scheduler:                               # optional; called as StepLR(optimizer, **init_args)
  class_path: torch.optim.lr_scheduler:StepLR
  init_args: {step_size: 5}
loss:
  class_path: torch.nn:CrossEntropyLoss  # a class is instantiated; a function is the loss itself
data:
  train: {class_path: my_project.data:train_loader, init_args: {batch_size: 64}}
  val: {class_path: my_project.data:val_loader}      # optional
  test: {class_path: my_project.data:test_loader}    # optional, run after fit
plugins:                                 # optional: plugin instances, registered after the built-ins
  - class_path: dltrain.callbacks:EarlyStopping
    init_args: {monitor: val_loss, patience: 3}
  - class_path: dltrain.callbacks:LearningRateMonitor
resume: auto                             # optional: 'auto', 'last', 'best' or a checkpoint's path
```

Every value is validated by pydantic, and every error names the key it is
about (``model.class_path: cannot import 'foo.Bar': module 'foo' not found``).
Command-line overrides (``--trainer.max_epochs 3``) are dotted keys whose
values are parsed as YAML scalars; an unknown key is an error that names the
closest valid one. An entry of a list is named by its index
(``--plugins.0.init_args.patience 5``), a whole list by its key
(``--plugins '[{class_path: "dltrain.callbacks:EMA"}]'``).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import json
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dltrain.config import TrainerConfig, load_config_file, yaml12_loader
from dltrain.errors import ConfigError

__all__ = [
    "ComponentSpec",
    "DataSpec",
    "RunConfig",
    "apply_overrides",
    "add_import_dirs",
    "build",
    "build_plugins",
    "format_validation_error",
    "import_object",
    "load_run_config",
    "parse_overrides",
    "read_run_file",
    "valid_keys",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentSpec(_Strict):
    """One object of the run, named by import path, with its keyword arguments."""

    class_path: str = Field(
        description="Import path of a class or function: 'package.module:Name' or 'package.module.Name'."
    )
    init_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments it is called with."
    )


class DataSpec(_Strict):
    """The data of the run: each entry is called and must return an iterable of batches."""

    train: ComponentSpec = Field(description="Returns the training batches (a DataLoader, a list...).")
    val: ComponentSpec | None = Field(default=None, description="Returns the validation batches.")
    test: ComponentSpec | None = Field(
        default=None, description="Returns the test batches, evaluated once after fit."
    )


class RunConfig(_Strict):
    """A whole run of ``dltrain fit``: the Trainer's settings and the objects it trains."""

    seed: int | None = Field(
        default=None,
        description="Seed Python, NumPy and torch before the model and data are built (same weights each run).",
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="The TrainerConfig.")
    model: ComponentSpec = Field(description="The model: a torch.nn.Module class (or factory).")
    optimizer: ComponentSpec = Field(
        description="The optimizer class, called with model.parameters() first (e.g. torch.optim:SGD)."
    )
    loss: ComponentSpec | None = Field(
        default=None,
        description="The loss: a class (instantiated with init_args) or a function (used as is).",
    )
    scheduler: ComponentSpec | None = Field(
        default=None, description="An LR scheduler class, called with the optimizer first."
    )
    data: DataSpec = Field(description="The data factories.")
    plugins: list[ComponentSpec] = Field(
        default_factory=list,
        description="Plugins to register after the built-ins, each called with init_args "
        "(e.g. dltrain.callbacks:EarlyStopping).",
    )
    resume: str | None = Field(
        default=None,
        description="Continue from a checkpoint of trainer.checkpoint.dir: 'auto' (the newest when there "
        "is one, else start fresh: the same command for every run of a requeued job), 'last', 'best', "
        "or a checkpoint's path (e.g. --resume last in the next job after a TimeLimit stop).",
    )


# ---------------------------------------------------------------------------
# Keys and overrides
# ---------------------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``), if any; not in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if _list_item_model(annotation) is not None:
        return None
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """``X`` for a field that is a list of pydantic models ``list[X]``, else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _is_free_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (dict, Mapping) or annotation is Any


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` (``trainer.max_epochs``, ``model.init_args``...)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        inner = _model_in(field.annotation)
        if inner is not None:
            keys.extend(valid_keys(inner, key + "."))
    return keys


def _check_key(key: str) -> None:
    """Raise a ConfigError naming the closest valid key if ``key`` is not one."""
    model: type[BaseModel] | None = RunConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        here = ".".join(parts[: i + 1])
        assert model is not None
        field = model.model_fields.get(part)
        if field is None or not part:
            names = list(model.model_fields)
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            if close:  # fix the one bad part, keep the rest: optimiser.init_args.lr -> optimizer.init_args.lr
                suggestion = ".".join([*parts[:i], close[0], *parts[i + 1 :]])
            else:  # a key one section too high: --max_epochs -> trainer.max_epochs
                tail = ".".join(parts[i:])
                found = [k for k in valid_keys() if k.endswith("." + tail)] if i == 0 else []
                suggestion = found[0] if len(found) == 1 else ""
            if suggestion:
                raise ConfigError(f"unknown key {key!r}; did you mean {suggestion!r}?")
            where = f"under {'.'.join(parts[:i])!r}" if i else "at the top level"
            raise ConfigError(f"unknown key {key!r}; the keys {where} are: {', '.join(names)}")
        if _is_free_mapping(field.annotation):
            return  # init_args: any key below
        item = _list_item_model(field.annotation)
        if item is not None and i + 1 < len(parts):  # plugins.0.init_args.patience
            if not parts[i + 1].isdigit():
                raise ConfigError(
                    f"unknown key {key!r}: {here!r} is a list; name an entry by its index "
                    f"({here}.0.{'.'.join(parts[i + 1 :])}) or set the whole list (--{here} '[...]')"
                )
            model, i = item, i + 2
            continue
        model = _model_in(field.annotation)
        if model is None and i + 1 < len(parts):
            raise ConfigError(f"unknown key {key!r}: {here!r} is a value, not a section")
        i += 1


def _parse_value(text: str) -> Any:
    """A command-line value as a YAML scalar (``3``, ``0.1``, ``null``, ``[1, 2]``), else a string."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dev dependency
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return yaml.load(text, Loader=yaml12_loader())  # a SafeLoader subclass
    except yaml.YAMLError:
        return text


def read_run_file(path: str | Path) -> dict[str, Any]:
    """Read a run file (YAML, JSON or TOML) into a dict; YAML with 1.2 booleans (``off`` is a string).

    Raises:
        ConfigError: the file is missing, unreadable, or does not hold a mapping.
    """
    return load_config_file(path)


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Turn ``["--trainer.max_epochs", "3", "--model.init_args.hidden=64"]`` into ``{key: value}``.

    Raises:
        ConfigError: a token is not ``--key value`` / ``--key=value``, a key
            has no value, or a key is not a key of the run file.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}: overrides are written --key value or --key=value "
                f"(for example --trainer.max_epochs 3)"
            )
        if "=" in token:
            key, _, text = token[2:].partition("=")
            i += 1
        else:
            key = token[2:]
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE or --{key}=VALUE")
            text = tokens[i + 1]
            i += 2
        _check_key(key)
        overrides[key] = _parse_value(text)
    return overrides


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key of ``overrides`` set (sections created as needed).

    A numeric part names an entry of a list (``plugins.0.init_args.patience``).

    Raises:
        ConfigError: a key names an entry of a list that the data does not have.
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        node: Any = result
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                index = int(part) if part.isdigit() else -1
                if not 0 <= index < len(node):
                    where = ".".join(parts[:depth])
                    raise ConfigError(
                        f"--{key}: {where!r} has {len(node)} entries (indexes 0 to {len(node) - 1}), "
                        f"not {part}; set the whole list with --{where} '[...]'"
                        if node
                        else f"--{key}: {where!r} has no entries; set the whole list with --{where} '[...]'"
                    )
                if last:
                    node[index] = value
                elif isinstance(node[index], (dict, list)):
                    node = node[index]
                else:
                    node = node[index] = {}
            elif last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, (dict, list)) or (
                    isinstance(child, list) and not parts[depth + 1].isdigit()
                ):
                    child = node[part] = [] if parts[depth + 1].isdigit() else {}
                node = child
    return result


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(
    exc: ValidationError, source: str = "the run file", overridden: Iterable[str] = (), prefix: str = ""
) -> str:
    """One line per problem, each starting with the key it is about.

    Args:
        exc: pydantic's error.
        source: Where the values came from, for people ("'run.yaml'").
        overridden: Keys set on the command line (their source is the option).
        prefix: The key of the validated model in the run file (``"trainer"``).
    """
    overridden = set(overridden)
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]  # drop union tags
        loc = [*prefix.split("."), *loc] if prefix else loc
        key = _loc(loc)
        where = f"--{key}" if key in overridden else source
        if err["type"] == "extra_forbidden":
            try:
                _check_key(key)
                hint = ""
            except ConfigError as problem:  # "unknown key 'x'; did you mean 'y'?" -> the hint
                hint = str(problem).partition(";")[2]
            lines.append(f"{key}: unknown key in {where}" + (f";{hint}" if hint else ""))
        elif err["type"] == "missing":
            lines.append(f"{key}: missing; {_describe_key(key)}")
        else:
            got = err.get("input")
            lines.append(f"{key}: {err['msg']} (got {got!r} from {where})")
    return "\n".join(lines)


def _describe_key(key: str) -> str:
    model: type[BaseModel] | None = RunConfig
    description = "required"
    for part in key.replace("[", ".").replace("]", "").split("."):  # plugins[0].class_path
        if part.isdigit():
            continue  # an entry of the list whose item model is already current
        if model is None or part not in model.model_fields:
            break
        field = model.model_fields[part]
        description = field.description or description
        model = _model_in(field.annotation) or _list_item_model(field.annotation)
    return f"required: {description}"


def load_run_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a run file (YAML, JSON or TOML), apply overrides, and validate it.

    Args:
        path: The run file, or None to build the run from ``overrides`` alone.
        overrides: Dotted keys and values (see :func:`parse_overrides`).

    Raises:
        ConfigError: the file cannot be read, or a value is invalid; the
            message has one line per problem, each naming its key.
    """
    overrides = dict(overrides or {})
    data = read_run_file(path) if path is not None else {}
    merged = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        source = repr(str(path)) if path is not None else "the command line"
        raise ConfigError(
            f"invalid run configuration:\n{format_validation_error(exc, source, overrides)}"
        ) from None


# ---------------------------------------------------------------------------
# Building the objects
# ---------------------------------------------------------------------------


def import_object(path: str, key: str = "class_path") -> Any:
    """Import ``"package.module:Name"`` (or ``"package.module.Name"``) and return the object.

    Raises:
        ConfigError: naming ``key``, the path, and what went wrong (a module
            not found, a missing attribute with the closest name, an import that raised).
    """
    text = path.strip()
    if ":" in text:
        module_name, _, attr_path = text.partition(":")
    else:
        module_name, _, attr_path = text.rpartition(".")
    if not module_name or not attr_path or not all(p.isidentifier() for p in attr_path.split(".")):
        raise ConfigError(
            f"{key}: {path!r} is not an import path; write 'package.module:Name' (e.g. 'torch.optim:SGD')"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{key}: cannot import {text!r}: module {missing!r} not found "
                f"(is it installed, or is its folder the current folder or the run file's folder?)"
            ) from None
        raise ConfigError(
            f"{key}: importing module {module_name!r} failed: it needs module {missing!r}, "
            f"which is not installed"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"{key}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for i, attr in enumerate(attr_path.split(".")):
        if not hasattr(obj, attr):
            owner = module_name + "".join("." + a for a in attr_path.split(".")[:i])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: cannot import {text!r}: {owner!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, attr)
    return obj


def _signature_problem(obj: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        params = [
            p.name
            for p in list(signature.parameters.values())[len(args) :]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        unknown = [k for k in kwargs if k not in signature.parameters]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, params, n=1)
            if close:
                hints.append(f"{name!r}: did you mean {close[0]!r}?")
        hint = ("; " + "; ".join(hints)) if hints else ""
        return f"{exc}{hint} (it takes: {', '.join(params) or 'no arguments'})"
    return None


def build(spec: ComponentSpec, key: str, *args: Any, as_is_if_function: bool = False) -> Any:
    """Import ``spec.class_path`` and call it with ``*args`` and ``spec.init_args``.

    Args:
        spec: What to build.
        key: The key of ``spec`` in the run file, named by every error (``"model"``).
        *args: Positional arguments passed first (the model's parameters for an optimizer).
        as_is_if_function: Return a function itself instead of calling it, with
            ``init_args`` bound when there are any (used for the loss).

    Raises:
        ConfigError: the import failed, the arguments do not fit the
            signature, or the call raised; the message names ``key``.
    """
    obj = import_object(spec.class_path, f"{key}.class_path")
    name = spec.class_path
    if as_is_if_function and not inspect.isclass(obj) and callable(obj):
        if not spec.init_args:
            return obj
        import functools

        problem = _signature_problem(obj, (None, None), spec.init_args)
        if problem:
            raise ConfigError(f"{key}.init_args: {name} does not accept them: {problem}")
        return functools.partial(obj, **spec.init_args)
    if not callable(obj):
        raise ConfigError(
            f"{key}.class_path: {name!r} is a {type(obj).__name__}, not a class or function to call"
        )
    problem = _signature_problem(obj, args, spec.init_args)
    if problem:
        raise ConfigError(f"{key}.init_args: {name} does not accept them: {problem}")
    try:
        return obj(*args, **spec.init_args)
    except Exception as exc:
        raise ConfigError(f"{key}: {name}(...) raised {type(exc).__name__}: {exc}") from exc


def build_plugins(specs: Sequence[ComponentSpec], key: str = "plugins") -> list[object]:
    """Build the plugins of a run file's ``plugins:`` list, each called with its ``init_args``.

    Args:
        specs: The entries, in order (the order they are registered in).
        key: The list's key in the run file, named by every error (``plugins[1].init_args: ...``).

    Raises:
        ConfigError: an entry cannot be built (see :func:`build`), or what it
            built is a class or implements no dltrain hook.
    """
    plugins: list[object] = []
    names: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        plugin = build(spec, where)
        if inspect.isclass(plugin):
            raise ConfigError(
                f"{where}.class_path: {spec.class_path!r} returned the class {plugin.__qualname__}, "
                f"not a plugin instance; name the class itself (it is called with init_args)"
            )
        marked = [n for n in dir(plugin) if hasattr(getattr(plugin, n, None), "dltrain_impl")]
        if not marked:
            raise ConfigError(
                f"{where}.class_path: {spec.class_path!r} built a {type(plugin).__name__}, which implements "
                f"no dltrain hook (a plugin marks its hook methods with @dltrain.hookimpl)"
            )
        name = getattr(plugin, "name", None) or type(plugin).__name__
        if name in names:
            raise ConfigError(
                f"{where}: {names[name]} and {where} are both plugins named {name!r}, and a Trainer "
                f"registers one plugin per name (its checkpoint state is kept under it); keep one of them"
            )
        names[str(name)] = where
        plugins.append(plugin)
    return plugins


def add_import_dirs(run_file: str | Path | None) -> None:
    """Let class paths name modules in the current folder and in the run file's folder."""
    folders = [Path.cwd()]
    if run_file is not None:
        folders.append(Path(run_file).resolve().parent)
    for folder in folders:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
