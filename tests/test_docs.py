"""The documentation site keeps its promises: its Python runs, its lists match the code, it builds.

Every fenced ``python`` block of every ``docs/**/*.md`` page, and of the
README, runs here: the blocks of one page in order, in one namespace, in a temporary working
directory, with entry-point plugins off (``DLTRAIN_DISABLE_PLUGIN_AUTOLOAD=1``)
so what is installed does not change the examples. Directives in HTML comments,
on their own line before a block:

- ``<!-- docs-test: skip (reason) -->`` before a ``python`` block: do not run it
  (it needs torchrun, a GPU, a download). Skips are counted and capped.
- ``<!-- docs-test: output -->`` before a ``text`` block: it must match what the
  page's previous ``python`` block printed (``...`` matches anything, as in doctest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import html.parser
import importlib.util
import io
import os
import random
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
README = ROOT / "README.md"

#: The most blocks the site may leave untested. Raise it only with a reason.
MAX_SKIPPED = 10

_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>[^)]*\S[^)]*)\)$")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_OUTPUT_CHECKER = doctest.OutputChecker()
_OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclasses.dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the first line of code
    language: str
    code: str
    directive: str | None  # the docs-test directive right before it, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = _SKIP.match(self.directive or "")
        return match.group("reason").strip() if match else None


def parse_page(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, and the problems found with its directives."""
    lines = page.read_text(encoding="utf-8").splitlines()
    rel = page.relative_to(ROOT)
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[str, int] | None = None  # (directive, line) waiting for its block
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        directive = _DIRECTIVE.match(stripped)
        fence = _FENCE.match(lines[i])
        if directive:
            if pending:
                problems.append(f"{rel}:{pending[1]}: directive without a block after it")
            pending = (directive.group("body"), i + 1)
        elif fence:
            indent, marker = fence.group("indent"), fence.group("fence")
            info = fence.group("info").strip()
            language = info.split()[0].strip("{}.").lower() if info else ""
            body: list[str] = []
            i += 1
            while i < len(lines):
                close = lines[i].strip()
                if close.startswith(marker) and set(close) == {marker[0]}:
                    break
                text = lines[i]
                body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
                i += 1
            start = i - len(body) + 1
            blocks.append(Block(page, start, language, "\n".join(body) + "\n", pending and pending[0]))
            pending = None
        elif stripped and pending:
            problems.append(f"{rel}:{pending[1]}: directive not followed by a fenced block")
            pending = None
        i += 1
    if pending:
        problems.append(f"{rel}:{pending[1]}: directive at the end of the page")
    for block in blocks:
        d = block.directive
        if d is None:
            continue
        if d == "output":
            if block.language != "text":
                problems.append(f"{block.where}: 'output' must come before a text block")
        elif block.skip_reason is not None:
            if block.language not in ("python", "py"):
                problems.append(f"{block.where}: 'skip' must come before a python block")
        else:
            problems.append(f"{block.where}: unknown directive {d!r}; use 'skip (reason)' or 'output'")
    return blocks, problems


PARSED = {page: parse_page(page) for page in [*PAGES, README]}
PYTHON_PAGES = [p for p in PARSED if any(b.language in ("python", "py") for b in PARSED[p][0])]


def _run_block(block: Block, namespace: dict[str, Any]) -> str:
    """Run one block in ``namespace``; return what it printed. Tracebacks point into the page."""
    code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    out = io.StringIO()
    error = None
    with contextlib.redirect_stdout(out):
        try:
            exec(code, namespace)
        except BaseException:
            error = traceback.format_exc()
    if error is not None:
        pytest.fail(
            f"the Python block at {block.where} raised:\n{error}\nit printed:\n{out.getvalue()}",
            pytrace=False,
        )
    return out.getvalue()


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Isolate examples from each other and from the suite: env, RNGs, default dtype, threads."""
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    modules = set(sys.modules)
    yield
    torch.set_rng_state(torch_rng)
    random.setstate(py_rng)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    for name in set(sys.modules) - modules:  # modules an example wrote and imported
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if module_file and not module_file.startswith((sys.prefix, str(ROOT))):
            del sys.modules[name]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_examples_run(page: Path, sandbox: None) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    last_output: str | None = None
    for block in PARSED[page][0]:
        if block.language in ("python", "py"):
            if block.skip_reason is None:
                last_output = _run_block(block, namespace)
        elif block.directive == "output":
            assert last_output is not None, f"{block.where}: no Python block ran before this output"
            if not _OUTPUT_CHECKER.check_output(block.code, last_output, _OUTPUT_FLAGS):
                pytest.fail(
                    f"the output shown at {block.where} is not what the block before it prints.\n"
                    f"shown:\n{block.code}\nprinted:\n{last_output}",
                    pytrace=False,
                )


def test_directives_are_well_formed() -> None:
    problems = [problem for page in PARSED for problem in PARSED[page][1]]
    assert not problems, "\n".join(problems)


def test_few_examples_are_skipped_and_each_says_why() -> None:
    skipped = [b for page in PARSED for b in PARSED[page][0] if b.skip_reason is not None]
    listing = "\n".join(f"  {b.where}: {b.skip_reason}" for b in skipped)
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped blocks (at most {MAX_SKIPPED}):\n{listing}"


# -- the pages that restate the code ---------------------------------------------------


def test_the_loop_page_shows_every_hook_in_the_order_fit_calls_them() -> None:
    from dltrain._plugin_manager import hookspecs_in_order
    from dltrain.testing import HookRecorder, tiny_loader, tiny_model

    page = DOCS / "concepts" / "loop.md"
    pseudocode = next(b.code for b in PARSED[page][0] if b.language == "text")
    hooks = set(hookspecs_in_order())
    shown = list(dict.fromkeys(w for w in re.findall(r"\b[a-z_]+\b", pseudocode) if w in hooks))
    assert set(shown) == hooks, f"hooks missing from the pseudocode: {sorted(hooks - set(shown))}"

    recorder = HookRecorder()
    model = tiny_model()
    dltrain.Trainer(plugins=[recorder], max_epochs=1, progress="off", run_dir=None, device="cpu").fit(
        model,
        tiny_loader(samples=32),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=16),
    )
    called = list(dict.fromkeys(recorder.calls))
    order = [h for h in shown if h in called]
    assert order == called, (
        f"the page shows the hooks of a fit in this order:\n{order}\na fit calls:\n{called}"
    )


def test_every_builtin_plugin_has_a_section() -> None:
    text = (DOCS / "plugins" / "builtin.md").read_text(encoding="utf-8")
    documented = re.findall(r"^## `(\w+)`", text, re.M)
    missing = [name for name in dltrain.BUILTIN_PLUGINS if name not in documented]
    assert not missing, f"built-in plugins without a section in plugins/builtin.md: {missing}"


def test_the_state_page_describes_every_field() -> None:
    text = (DOCS / "concepts" / "state.md").read_text(encoding="utf-8")
    fields = [f.name for f in dataclasses.fields(dltrain.State)] + ["is_global_zero"]
    missing = [name for name in fields if f"`{name}`" not in text]
    assert not missing, f"State fields not described in concepts/state.md: {missing}"


_NUMBER = r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|\d+)"
_HOOK_COUNT = re.compile(rf"\b{_NUMBER}\s+(?:[\w-]+\s+)?\**(?:hooks|first[ -]result)\b", re.I)


def test_no_page_states_a_hook_count_by_hand() -> None:
    """Counts of hooks drift as hooks are added; pages ask the build for them instead."""
    found = []
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        found += [f"{page.relative_to(ROOT)}: {m.group(0)!r}" for m in _HOOK_COUNT.finditer(prose)]
    assert not found, (
        "write <!-- dltrain: count GROUP --> and <!-- dltrain: list GROUP --> (docs/_hooks/tables.py) "
        "instead of:\n" + "\n".join(found)
    )


def _tables_hook() -> Any:
    if _docs_tools_missing():
        pytest.skip(str(_docs_tools_missing()))
    spec = importlib.util.spec_from_file_location("docs_tables_hook", DOCS / "_hooks" / "tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_groups_in_the_pages_come_from_the_hook_specifications() -> None:
    from dltrain import hookspecs
    from dltrain._plugin_manager import PER_PLUGIN_HOOKS, hookspecs_in_order

    tables = _tables_hook()
    first = [h for h in hookspecs_in_order() if getattr(hookspecs, h).dltrain_spec["firstresult"]]
    page = "**First result wins** for <!-- dltrain: count firstresult --> hooks: <!-- dltrain: list firstresult -->."
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    count = words[len(first)] if len(first) < len(words) else str(len(first))
    listed = ", ".join(f"`{h}`" for h in first[:-1]) + f" and `{first[-1]}`"
    assert tables.on_page_markdown(page) == f"**First result wins** for {count} hooks: {listed}."
    assert set(tables.hook_group("per-plugin")) == PER_PLUGIN_HOOKS
    assert "training_step" in tables.hook_group("batch") and "on_fit_start" not in tables.hook_group("batch")
    with pytest.raises(Exception, match="unknown directive"):
        tables.on_page_markdown("<!-- dltrain: lsit batch -->")


# -- the site builds ---------------------------------------------------------------------


def _docs_tools_missing() -> str | None:
    for module, package in (
        ("mkdocs", "mkdocs"),
        ("material", "mkdocs-material"),
        ("mkdocstrings_handlers.python", "mkdocstrings[python]"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{package} is not installed (pip install -e '.[docs]')"
    return None


@dataclasses.dataclass
class BuiltSite:
    """One ``mkdocs build --strict`` of the site, shared by the tests that read the result."""

    path: Path
    returncode: int
    log: str
    seconds: float


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> BuiltSite:
    """The site, built once for this module (skipped where the docs tools are not installed)."""
    missing = _docs_tools_missing()
    if missing:
        pytest.skip(missing)
    site = tmp_path_factory.mktemp("site") / "site"
    started = time.monotonic()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return BuiltSite(site, result.returncode, result.stdout + result.stderr, time.monotonic() - started)


def _site(built_site: BuiltSite) -> Path:
    if built_site.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{built_site.log}", pytrace=False)
    return built_site.path


def test_the_site_builds_strictly_without_warnings(built_site: BuiltSite) -> None:
    assert built_site.returncode == 0, f"mkdocs build --strict failed:\n{built_site.log}"
    warnings = [line for line in built_site.log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (built_site.path / "index.html").is_file()
    assert built_site.seconds < 300, "the docs build got slow; CI runs it on every push"


# -- the site works offline --------------------------------------------------------------

#: ``<link rel=...>`` values that make a browser fetch the link's target.
_FETCHING_RELS = {
    "stylesheet", "preload", "modulepreload", "prefetch", "preconnect", "dns-prefetch",
    "icon", "apple-touch-icon", "mask-icon", "manifest",
}  # fmt: skip
_REMOTE = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://host, https://host, //host
_CSS_REMOTE = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:[a-z][a-z0-9+.-]*:)?//[^'")\s]+)""", re.I)


class _RemoteLoads(html.parser.HTMLParser):
    """Collects the URLs on other hosts that an HTML page makes a browser load."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        urls = []
        if tag in ("script", "img", "iframe", "audio", "video", "source", "track", "embed", "input"):
            urls.append(values.get("src", ""))
        if tag in ("img", "source"):
            urls += [
                candidate.split()[0] for candidate in values.get("srcset", "").split(",") if candidate.strip()
            ]
        if tag == "link" and _FETCHING_RELS & set(values.get("rel", "").lower().split()):
            urls.append(values.get("href", ""))
        if tag == "object":
            urls.append(values.get("data", ""))
        if tag == "video":
            urls.append(values.get("poster", ""))
        self.found += [f"<{tag}> {url}" for url in urls if _REMOTE.match(url)]
        self.found += [f"<{tag} style> {url}" for url in _CSS_REMOTE.findall(values.get("style", ""))]
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.found += [f"<style> {url}" for url in _CSS_REMOTE.findall(data)]


def test_no_page_loads_anything_from_another_host(built_site: BuiltSite) -> None:
    """Scripts, stylesheets, fonts and images come with the site: it works without a network."""
    site = _site(built_site)
    problems = []
    for page in sorted(site.rglob("*.html")):
        parser = _RemoteLoads()
        parser.feed(page.read_text(encoding="utf-8"))
        problems += [f"{page.relative_to(site)}: {found}" for found in parser.found]
    for sheet in sorted(site.rglob("*.css")):
        for url in _CSS_REMOTE.findall(sheet.read_text(encoding="utf-8")):
            problems.append(f"{sheet.relative_to(site)}: {url}")
    assert not problems, "the site loads these from other hosts:\n" + "\n".join(problems)
    loop = (site / "concepts" / "loop" / "index.html").read_text(encoding="utf-8")
    assert "mermaid.min.js" in loop, "the loop page has a diagram but does not load the site's own Mermaid"


def test_the_remote_load_check_finds_what_it_looks_for() -> None:
    parser = _RemoteLoads()
    parser.feed(
        '<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href="//fonts.example/f.css">'
        '<link rel="canonical" href="https://docs.example/"><img src="../img/local.png">'
        '<img srcset="a.png 1x, https://img.example/b.png 2x"><style>@import "https://x.example/y.css";</style>'
        '<div style="background: url(http://bg.example/z.png)"></div><a href="https://pluggy.example/">pluggy</a>'
    )
    assert parser.found == [
        "<script> https://cdn.example/x.js",
        "<link> //fonts.example/f.css",
        "<img> https://img.example/b.png",
        "<style> https://x.example/y.css",
        "<div style> http://bg.example/z.png",
    ]


# -- the site, in a browser without a network -------------------------------------------

#: The window width the layout is checked at: a laptop, with both of Material's sidebars shown.
WIDTH = 1280


@pytest.fixture(scope="module")
def browser(built_site: BuiltSite) -> Any:
    """A headless Chromium that resolves no host but 127.0.0.1, and the built site served there."""
    from headless_chromium import Browser, find_chromium, serve

    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium to look at the site with (apt-get install chromium, or set $CHROMIUM)")
    site = _site(built_site)
    with serve(site) as base_url, Browser(executable) as chromium:
        yield chromium, base_url, site


def _offsite(requests: list[str], base_url: str) -> list[str]:
    return [url for url in requests if not url.startswith((base_url, "data:", "blob:", "about:"))]


def test_the_loop_diagram_is_drawn_without_a_network(browser: Any) -> None:
    chromium, base_url, site = browser
    page = "concepts/loop/"
    expected = (site / page / "index.html").read_text(encoding="utf-8").count('class="mermaid"')
    assert expected >= 1, "the loop page has no diagram any more"
    session = chromium.open(base_url + page, width=WIDTH)
    drawings = chromium.diagrams(session, expected)
    requests = chromium.requests(session)
    chromium.close(session)
    assert len(drawings) == expected, f"{len(drawings)} of {expected} diagrams drawn on /{page}"
    assert "on_before_optimizer_step" in drawings[0], f"the diagram's text: {drawings[0]}"
    assert not _offsite(requests, base_url), f"/{page} asked other hosts for {_offsite(requests, base_url)}"


def test_every_page_fits_a_1280_pixel_window(browser: Any) -> None:
    """No code line is cut off, no inline code breaks inside a word, no table needs a sideways scroll."""
    from headless_chromium import measure_site

    chromium, base_url, site = browser
    problems = []
    for page, found in measure_site(chromium, base_url, site, width=WIDTH).items():
        problems += [f"/{page}: code line cut off: {line!r}" for line in found["cutLines"]]
        problems += [f"/{page}: inline code split mid-word: {text!r}" for text in found["inlineMidWord"]]
        problems += [f"/{page}: table wider than the page: {row!r}" for row in found["wideTables"]]
        problems += [f"/{page}: loads {url}" for url in _offsite(found["requests"], base_url)]
    assert not problems, f"at {WIDTH} px:\n" + "\n".join(problems)
