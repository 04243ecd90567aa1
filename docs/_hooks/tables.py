"""An MkDocs hook: tables generated from the code when the site is built, so they cannot drift.

A page asks for one with an HTML comment on a line of its own:

    <!-- dltrain: fields TrainerConfig -->        a table: field, type, default, meaning
    <!-- dltrain: json-schema TrainerConfig -->   the JSON schema, in a collapsed block
    <!-- dltrain: hooks -->                       every hook by phase: kind, when it is called
    <!-- dltrain: hooks-of module:Class -->        the hooks a plugin class implements, with markers

Config models come from ``dltrain.config``; hooks from ``dltrain.hookspecs``
(its phase banners, its specification markers and the first line of each docstring).
"""

from __future__ import annotations

import json
import re
from typing import Any

_DIRECTIVE = re.compile(r"^<!-- dltrain: (fields|json-schema|hooks|hooks-of) ?([\w.:]*) -->$", re.M)
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


def hooks_of(path: str) -> str:
    """``module:Class``'s hook implementations, in hook order, with their markers (wrapper, tryfirst...)."""
    import importlib

    from dltrain._plugin_manager import hookspecs_in_order

    module_name, class_name = path.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    parts = []
    for hook in hookspecs_in_order():
        options = getattr(getattr(cls, hook, None), "dltrain_impl", None)
        if options is None:
            continue
        markers = [m for m in ("wrapper", "hookwrapper", "tryfirst", "trylast") if options.get(m)]
        parts.append(f"`{hook}`" + (f" ({', '.join(markers)})" if markers else ""))
    return ", ".join(parts) + "."


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace each ``<!-- dltrain: ... -->`` directive with what it asks for."""

    def render(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "hooks":
            return hooks_table()
        if kind == "hooks-of":
            return hooks_of(name)
        return fields_table(name) if kind == "fields" else json_schema_block(name)

    return _DIRECTIVE.sub(render, markdown)
