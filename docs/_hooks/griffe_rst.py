"""A griffe extension: render the reST bits of dltrain's docstrings as Markdown.

The docstrings use Sphinx roles (``:class:`~dltrain.State```) and ``::``
literal blocks. mkdocstrings renders docstrings as Markdown, where those
would show as raw text, so this extension rewrites them when the API is
loaded: a role becomes an optional cross-reference (a link when the target
is rendered on the site, plain code otherwise), and ``text::`` before an
indented block becomes ``text:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::\n(\s*\n)+(?=[ \t]+\S)")


def _scopes(obj: griffe.Object) -> list[griffe.Object]:
    """The object, then its parents up to the package: where a bare name is looked up."""
    scopes: list[griffe.Object] = []
    current: griffe.Object | None = obj
    while current is not None:
        scopes.append(current)
        current = current.parent
    return scopes


def _identifier(name: str, obj: griffe.Object) -> str:
    """The full path a role's target most likely means, seen from ``obj``."""
    if name.startswith("dltrain."):
        return name
    head = name.split(".", 1)[0]
    for scope in _scopes(obj):
        if head in scope.members:
            return f"{scope.path}.{name}"
    return name


class ReSTToMarkdown(griffe.Extension):
    """Rewrites Sphinx roles and ``::`` literal-block markers in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return

        def link(match: re.Match[str]) -> str:
            short, name = match.group(1), match.group(2)
            title = name.rsplit(".", 1)[-1] if short else name
            return f'<autoref identifier="{_identifier(name, obj)}" optional><code>{title}</code></autoref>'

        text = _ROLE.sub(link, docstring.value)
        docstring.value = _LITERAL_BLOCK.sub(lambda m: m.group(0).replace("::", ":", 1), text)
