"""An MkDocs hook: pages with a diagram load Mermaid from the site itself, not from a CDN.

Material for MkDocs draws ```` ```mermaid ```` blocks with Mermaid.js, and
fetches it from unpkg.com when the page has not defined ``window.mermaid``
already: without a network the diagrams stay text. This hook adds a
``<script>`` tag for the copy under ``docs/assets/vendor/mermaid-<version>/``
(the single-file browser build, ``dist/mermaid.min.js`` of the npm package,
with its licence) right before Material's own bundle, on the pages that have a
diagram only (the file is 3.5 MB).

To update it: ``npm pack mermaid@11``, then replace the folder with one named
after the new version holding the package's ``dist/mermaid.min.js`` and
``LICENSE``. Material 9 expects Mermaid 11.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.utils import get_relative_url

_VENDOR = Path(__file__).resolve().parents[1] / "assets" / "vendor"
_BUNDLE = re.compile(r'<script src="[^"]*assets/javascripts/bundle\.[0-9a-f]+\.min\.js"></script>')
_DIAGRAM = 'class="mermaid"'


def mermaid_script() -> str:
    """The vendored Mermaid build's path relative to ``docs/`` (exactly one must be there)."""
    found = sorted(_VENDOR.glob("mermaid-*/mermaid.min.js"))
    if len(found) != 1:
        raise PluginError(f"expected one docs/assets/vendor/mermaid-<version>/mermaid.min.js, found {found}")
    return found[0].relative_to(_VENDOR.parent.parent).as_posix()


def on_post_page(output: str, page: Any, **kwargs: Any) -> str:
    """Load the vendored Mermaid before Material's bundle on a page that has a diagram."""
    if _DIAGRAM not in output:
        return output
    bundle = _BUNDLE.search(output)
    if bundle is None:
        raise PluginError(f"{page.file.src_uri}: Material's bundle <script> not found; the theme changed?")
    src = get_relative_url(mermaid_script(), page.url)
    return output[: bundle.start()] + f'<script src="{src}"></script>\n' + output[bundle.start() :]
