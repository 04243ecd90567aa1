"""An MkDocs hook: each line of a code block says how far it is indented, so a wrapped line hangs.

``pymdownx.highlight`` (``line_spans: __span``) puts each line of a code block
in a ``<span id="__span-B-L">``. This hook adds the line's indentation to it,
``style="--indent: N" data-indent``, which ``docs/assets/stylesheets/extra.css``
uses to indent the continuation of a line too long for the page four columns
past the line's own start, as Python's own continuation lines are.
"""

from __future__ import annotations

import re
from typing import Any

#: A line's opening tag and its leading spaces (some lexers wrap them in a whitespace token).
_LINE = re.compile(r'<span id="(?P<id>__span-\d+-\d+)">(?P<token><span class="w">)?(?P<indent> *)')


def on_post_page(output: str, **kwargs: Any) -> str:
    """Mark every code line with its indentation, in columns."""

    def mark(line: re.Match[str]) -> str:
        indent = len(line.group("indent"))
        token = line.group("token") or ""
        return f'<span id="{line.group("id")}" style="--indent: {indent}" data-indent>{token}{" " * indent}'

    return _LINE.sub(mark, output)
