"""An MkDocs hook: tables generated from the code when the site is built, so they cannot drift.

A page asks for a table or block with an HTML comment on a line of its own:

    <!-- dltrain: fields TrainerConfig -->        a table: field, type, default, meaning
    <!-- dltrain: json-schema TrainerConfig -->   the JSON schema, in a collapsed block
    <!-- dltrain: hooks -->                       every hook by phase: kind, when it is called

and for words inside a sentence with one anywhere in the text:

    <!-- dltrain: hooks-of module:Class -->       the hooks a plugin class implements, with markers
    <!-- dltrain: list GROUP -->                  the hooks of a group: `a`, `b` and `c`
    <!-- dltrain: count GROUP -->                 how many hooks the group has ("seven")

where GROUP is ``all``, ``firstresult`` (first result wins), ``per-plugin``
(called on each plugin separately) or ``batch`` (the hooks under the batch
phase's banner). Config models come from ``dltrain.config``; hooks from
``dltrain.hookspecs`` (its phase banners, its specification markers and the
first line of each docstring) and ``dltrain._plugin_manager``. A plugin class
of one of this repository's plugin distributions is read from its source
folder when the distribution is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from mkdocs.exceptions import PluginError

_DIRECTIVE = re.compile(r"^<!-- dltrain: (fields|json-schema|hooks) ?([\w.:]*) -->$", re.M)
_INLINE = re.compile(r"<!-- dltrain: (hooks-of|list|count) ([\w.:-]+) -->")
_PLUGIN_SOURCES = Path(__file__).resolve().parents[2] / "plugins"
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_BANNER = re.compile(r"^# -{20,}\n# (?P<title>.+)\n# -{20,}$", re.M)
#: What the Trainer does with the results of the hooks that are neither "first wins" nor ignored.
_RESULTS = {"compute_metrics": "merged", "state_dict": "kept per plugin"}
_SPEC = re.compile(r"^def (?P<name>\w+)\(", re.M)


def _models() -> dict[str, Any]:
    from dltrain.config import CheckpointConfig, CompileOptions, TrainerConfig

    return {
        "TrainerConfig": TrainerConfig,
        "CheckpointConfig": CheckpointConfig,
        "CompileOptions": CompileOptions,
    }


def _type(schema: dict[str, Any]) -> str:
    """A short, readable type from one property's JSON schema."""
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "enum" in schema:
        return " | ".join(f'`"{v}"`' for v in schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return "`None`"
    if kind == "array":
        item = _type(schema.get("items", {})).strip("`")
        return f"`list[{item}]`"
    name = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}.get(kind or "", "any")
    if schema.get("format") == "path":
        name = "path"
    if "exclusiveMinimum" in schema:
        name += f" > {schema['exclusiveMinimum']}"
    elif "minimum" in schema:
        name += f" ≥ {schema['minimum']}"
    return f"`{name}`"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "`None`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(name: str) -> str:
    """A Markdown table of the fields of config model ``name``, in declaration order."""
    model = _models()[name]
    properties = model.model_json_schema()["properties"]
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field_name, field in model.model_fields.items():
        schema = properties[field_name]
        rows.append(
            f"| `{field_name}` | {_escape(_type(schema))} | {_default(field)} "
            f"| {_escape(field.description or '')} |"
        )
    return "\n".join(rows)


def json_schema_block(name: str) -> str:
    """The JSON schema of config model ``name`` in a collapsed block."""
    schema = json.dumps(_models()[name].model_json_schema(), indent=2)
    body = "\n".join(f"    {line}" if line else "" for line in ["```json", *schema.splitlines(), "```"])
    return f'??? example "JSON schema of `{name}`"\n\n{body}\n'


def hooks_table() -> str:
    """Every hook, grouped under the phase banners of ``dltrain.hookspecs``, linked to its reference."""
    import inspect

    from dltrain import hookspecs
    from dltrain._plugin_manager import PER_PLUGIN_HOOKS

    if not set(_RESULTS) <= PER_PLUGIN_HOOKS:
        raise PluginError(
            f"_RESULTS names hooks not called per plugin: {sorted(set(_RESULTS) - PER_PLUGIN_HOOKS)}"
        )
    source = inspect.getsource(hookspecs)
    rows = ["| hook | results | summary |", "| --- | --- | --- |"]
    banners = list(_BANNER.finditer(source))
    for i, banner in enumerate(banners):
        end = banners[i + 1].start() if i + 1 < len(banners) else len(source)
        rows.append(f"| **{_escape(banner.group('title'))}** | | |")
        for spec in _SPEC.finditer(source, banner.end(), end):
            name = spec.group("name")
            function = getattr(hookspecs, name)
            first = function.dltrain_spec["firstresult"]
            summary = (inspect.getdoc(function) or "").split("\n\n")[0].replace("**First result wins.**", "")
            summary = summary.replace("**All results are merged.**", "").strip()
            summary = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", summary)
            summary = summary.replace("``", "`")
            kind = "first wins" if first else _RESULTS.get(name, "ignored")
            rows.append(f"| [`{name}`](#dltrain.hookspecs.{name}) | {kind} | {_escape(summary)} |")
    return "\n".join(rows)


def _import(module_name: str) -> ModuleType:
    """The module; one of ``plugins/*/src/`` when it is not installed."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        for init in _PLUGIN_SOURCES.glob(f"*/src/{module_name}/__init__.py"):
            spec = importlib.util.spec_from_file_location(module_name, init)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module
        raise


def hooks_of(path: str) -> str:
    """``module:Class``'s hook implementations, in hook order, with their markers (wrapper, tryfirst...)."""
    from dltrain._plugin_manager import hookspecs_in_order

    module_name, class_name = path.split(":")
    cls = getattr(_import(module_name), class_name)
    parts = []
    for hook in hookspecs_in_order():
        options = getattr(getattr(cls, hook, None), "dltrain_impl", None)
        if options is None:
            continue
        markers = [m for m in ("wrapper", "hookwrapper", "tryfirst", "trylast") if options.get(m)]
        parts.append(f"`{hook}`" + (f" ({', '.join(markers)})" if markers else ""))
    return ", ".join(parts)


def hook_group(group: str) -> list[str]:
    """The hooks of ``group`` (see the module's docstring), in the order ``dltrain.hookspecs`` declares them."""
    import inspect

    from dltrain import hookspecs
    from dltrain._plugin_manager import PER_PLUGIN_HOOKS, hookspecs_in_order

    hooks = hookspecs_in_order()
    if group == "all":
        return hooks
    if group == "firstresult":
        return [h for h in hooks if getattr(hookspecs, h).dltrain_spec["firstresult"]]
    if group == "per-plugin":
        return [h for h in hooks if h in PER_PLUGIN_HOOKS]
    if group == "batch":
        source = inspect.getsource(hookspecs)
        banners = list(_BANNER.finditer(source))
        for i, banner in enumerate(banners):
            if banner.group("title").startswith("Batches"):
                end = banners[i + 1].start() if i + 1 < len(banners) else len(source)
                return [spec.group("name") for spec in _SPEC.finditer(source, banner.end(), end)]
        raise PluginError("dltrain.hookspecs has no 'Batches' banner any more")
    raise PluginError(f"unknown hook group {group!r}; use all, firstresult, per-plugin or batch")


def hook_list(group: str) -> str:
    """The hooks of ``group`` as prose: `a`, `b` and `c`."""
    names = [f"`{h}`" for h in hook_group(group)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def hook_count(group: str) -> str:
    """How many hooks ``group`` has, in words up to ten."""
    count = len(hook_group(group))
    return _WORDS[count] if count < len(_WORDS) else str(count)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace each ``<!-- dltrain: ... -->`` directive with what it asks for."""

    def render(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "hooks":
            return hooks_table()
        return fields_table(name) if kind == "fields" else json_schema_block(name)

    def render_inline(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "hooks-of":
            return hooks_of(name)
        return hook_list(name) if kind == "list" else hook_count(name)

    page = kwargs.get("page")
    result = _INLINE.sub(render_inline, _DIRECTIVE.sub(render, markdown))
    left = re.search(r"<!-- dltrain:.*?-->", result)
    if left:
        where = page.file.src_uri if page is not None else "a page"
        raise PluginError(f"{where}: unknown directive {left.group(0)!r}; see docs/_hooks/tables.py")
    return result
