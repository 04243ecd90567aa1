"""The documentation site keeps its promises: its Python runs, its lists match the code, it builds.

Every fenced ``python`` block of every ``docs/**/*.md`` page runs here: the
blocks of one page in order, in one namespace, in a temporary working
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


PARSED = {page: parse_page(page) for page in PAGES}
PYTHON_PAGES = [p for p in PAGES if any(b.language in ("python", "py") for b in PARSED[p][0])]


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


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
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
    problems = [problem for page in PAGES for problem in PARSED[page][1]]
    assert not problems, "\n".join(problems)


def test_few_examples_are_skipped_and_each_says_why() -> None:
    skipped = [b for page in PAGES for b in PARSED[page][0] if b.skip_reason is not None]
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


@pytest.mark.skipif(_docs_tools_missing() is not None, reason=str(_docs_tools_missing()))
def test_the_site_builds_strictly_without_warnings(tmp_path: Path) -> None:
    started = time.monotonic()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "site" / "index.html").is_file()
    assert time.monotonic() - started < 300, "the docs build got slow; CI runs it on every push"
