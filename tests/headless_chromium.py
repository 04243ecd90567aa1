"""Look at the built documentation site the way a reader does: in a browser, with no network.

A test helper and a command-line script. It serves a built site from
``127.0.0.1``, drives a headless Chromium over the DevTools protocol (on a
pipe: no port, no extra package) with every host but ``127.0.0.1`` made
unresolvable, and measures each page at a given width: code lines that do not
fit their box, inline code broken across lines, and whether diagrams were
drawn.

    python tests/headless_chromium.py SITE_DIR [--width 1280] [--screenshot PAGE OUT.png]

prints one line per page with a problem, then the totals.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Chromium's executable names, in the order they are looked for (``$CHROMIUM`` first).
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

#: Flags for a quiet, offline browser: no sandbox (containers), no GPU, no background traffic,
#: and no name resolution for any host but 127.0.0.1, so a page that needs the network shows it.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable: ``$CHROMIUM``, else the first on ``PATH``."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return shutil.which(configured)
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) while the block runs; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Browser:
    """One headless Chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out).

    Use as a context manager. :meth:`open` loads a page in a new tab of the given
    width; :meth:`evaluate` runs JavaScript there and returns its (JSON) result.
    """

    def __init__(self, executable: str, *, timeout: float = 30.0) -> None:
        self.executable = executable
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_on_fd_3_and_4() -> None:  # in the child, before exec
            r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # above 3 and 4 first: no clash
            w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._process = subprocess.Popen(
            [
                self.executable,
                *FLAGS,
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=pipes_on_fd_3_and_4,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    # -- the protocol ----------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        result: dict[str, Any] = json.loads(message)
        return result

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; raise on a protocol error."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self._events.append(reply)

    def _wait_for_event(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method and event.get("sessionId") == session:
                    del self._events[i]
                    return
            reply = self._read_message(deadline)
            if "method" in reply:
                self._events.append(reply)

    # -- pages -----------------------------------------------------------------------

    def open(self, url: str, *, width: int, height: int = 900) -> str:
        """Load ``url`` in a new tab ``width`` CSS pixels wide; return the tab's session id."""
        return self.open_all([url], width=width, height=height)[0]

    def open_all(self, urls: list[str], *, width: int, height: int = 900) -> list[str]:
        """Load each URL in a tab of its own, all at once; the tabs' session ids, in order."""
        sessions = []
        for url in urls:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            self.call("Network.enable", session)
            self.call("Page.enable", session)
            self.call("Page.navigate", session, url=url)
            sessions.append(session)
        for session in sessions:
            self._wait_for_event("Page.loadEventFired", session)
        return sessions

    def requests(self, session: str) -> list[str]:
        """The URLs the tab has asked for so far (each request once, redirects included)."""
        return [
            event["params"]["request"]["url"]
            for event in self._events
            if event["method"] == "Network.requestWillBeSent" and event.get("sessionId") == session
        ]

    def close(self, session: str) -> None:
        """Close the tab of ``session``."""
        target = self.call("Target.getTargetInfo", session)["targetInfo"]["targetId"]
        self.call("Target.closeTarget", targetId=target)
        self._events = [event for event in self._events if event.get("sessionId") != session]

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the tab (a promise is awaited)."""
        reply = self.call(
            "Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"JavaScript error: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def diagrams(self, session: str, expected: int, *, wait_ms: int = 10_000) -> list[list[str]]:
        """Wait for ``expected`` Mermaid diagrams; the text of each drawn ``<svg>``, one list per diagram.

        Material draws into a closed shadow root, out of reach of page scripts and
        ``--dump-dom``; the DevTools DOM (``pierce``) sees into it.
        """
        self.evaluate(session, WAIT_FOR_DIAGRAMS % (expected, wait_ms))
        root = self.call("DOM.getDocument", session, depth=-1, pierce=True)["root"]
        drawings: list[list[str]] = []

        def texts(node: dict[str, Any]) -> Iterator[str]:
            if node.get("nodeType") == 3 and node["nodeValue"].strip():
                yield node["nodeValue"].strip()
            for child in node.get("children", []) + node.get("shadowRoots", []):
                yield from texts(child)

        def visit(node: dict[str, Any]) -> None:
            attributes = node.get("attributes", [])
            classes = dict(zip(attributes[::2], attributes[1::2], strict=True)).get("class", "").split()
            if node.get("nodeName") == "DIV" and "mermaid" in classes:
                for shadow in node.get("shadowRoots", []):
                    for child in shadow.get("children", []):
                        if child.get("nodeName", "").lower() == "svg":
                            drawings.append(list(texts(child)))
            for child in node.get("children", []) + node.get("shadowRoots", []):
                visit(child)

        visit(root)
        return drawings

    def screenshot(self, session: str, path: Path) -> None:
        """Save the whole page (not only the window) as a PNG."""
        data = self.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))


#: Resolves when Material has drawn ``%d`` diagrams (or after ``%d`` ms): how many it drew. It
#: replaces each ``pre.mermaid`` with a ``div.mermaid`` whose drawing is in a closed shadow root.
WAIT_FOR_DIAGRAMS = """
new Promise(resolve => {
  const started = performance.now();
  (function poll() {
    const drawn = document.querySelectorAll('div.mermaid').length;
    if (drawn >= %d || performance.now() - started > %d) resolve(drawn);
    else setTimeout(poll, 50);
  })();
})
"""


#: Measures the open page. Code lines: each line of each ``pre > code`` whose text reaches
#: past the box it scrolls in (what a reader cannot see without scrolling sideways), and the
#: number of lines wrapped onto more than one line of the page. Inline
#: code: each ``code`` outside ``pre`` laid out on more than one line, and those split
#: inside a word (between two letters, digits or underscores), with the text around the break.
#: Wide tables: those wider than the box they scroll in (their header row's text).
MEASURE_LAYOUT = r"""
(() => {
  const result = {
    codeLines: 0, cutLines: [], wrappedLines: 0, inlineCode: 0, inlineSplit: [], inlineMidWord: [],
    wideTables: [],
  };
  for (const table of document.querySelectorAll('article table')) {
    const box = table.parentElement;  // Material's scrolling wrapper
    if (box.scrollWidth > box.clientWidth + 1) result.wideTables.push(table.rows[0].textContent.trim().slice(0, 60));
  }
  const range = document.createRange();
  for (const code of document.querySelectorAll('article pre:not(.mermaid) > code')) {
    const right = code.getBoundingClientRect().left + code.clientLeft + code.clientWidth + 1;
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    let line = '', start = null;
    const finish = (node, offset) => {
      if (line.trim()) {
        result.codeLines += 1;
        range.setStart(start[0], start[1]);
        range.setEnd(node, offset);
        const rects = [...range.getClientRects()];
        if (Math.max(...rects.map(r => r.right)) > right) result.cutLines.push(line.slice(0, 100));
        const tops = rects.filter(r => r.width > 0).map(r => r.top);
        if (Math.max(...tops) - Math.min(...tops) > 5) result.wrappedLines += 1;
      }
      line = ''; start = null;
    };
    let last = null;
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (let i = 0; i < node.data.length; i++) {
        if (node.data[i] === '\n') { finish(node, i); continue; }
        if (start === null) start = [node, i];
        line += node.data[i];
      }
      last = node;
    }
    if (last) finish(last, last.data.length);
  }
  for (const code of document.querySelectorAll('article code')) {
    if (code.closest('pre')) continue;
    result.inlineCode += 1;
    if (code.getClientRects().length < 2) continue;
    const chars = [];
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (let i = 0; i < node.data.length; i++) {
        range.setStart(node, i); range.setEnd(node, i + 1);
        const r = range.getClientRects()[0];
        chars.push([node.data[i], r ? r.top : null]);
      }
    }
    const text = chars.map(c => c[0]).join('');
    let split = false;
    for (let i = 1; i < chars.length; i++) {
      const [prev, prevTop] = chars[i - 1], [ch, top] = chars[i];
      if (top === null || prevTop === null || top <= prevTop + 2) continue;
      split = true;
      if (/\w/.test(prev) && /\w/.test(ch)) result.inlineMidWord.push(text.slice(0, i) + '|' + text.slice(i));
    }
    if (split) result.inlineSplit.push(text.slice(0, 80));
  }
  return result;
})()
"""


def pages(site: Path) -> list[str]:
    """The site's pages, as paths relative to its root (``concepts/loop/``), the 404 page left out."""
    found = []
    for html in sorted(site.rglob("index.html")):
        relative = html.parent.relative_to(site).as_posix()
        found.append("" if relative == "." else relative + "/")
    return found


def measure_site(
    browser: Browser, base_url: str, site: Path, *, width: int, tabs: int = 4
) -> dict[str, dict[str, Any]]:
    """:data:`MEASURE_LAYOUT` of every page of ``site`` at ``width`` pixels, by page, with
    ``requests``: the URLs the page asked for. Loads ``tabs`` pages at a time."""
    results = {}
    todo = pages(site)
    for first in range(0, len(todo), tabs):
        batch = todo[first : first + tabs]
        sessions = browser.open_all([base_url + page for page in batch], width=width)
        for page, session in zip(batch, sessions, strict=True):
            results[page] = browser.evaluate(session, MEASURE_LAYOUT)
            results[page]["requests"] = browser.requests(session)
            browser.close(session)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("site", type=Path, help="a built site (mkdocs build --site-dir SITE)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--screenshot", nargs=2, metavar=("PAGE", "PNG"), help="e.g. concepts/loop/ loop.png")
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        print("no Chromium found: install one or set $CHROMIUM", file=sys.stderr)
        return 2
    with serve(args.site) as base_url, Browser(executable) as browser:
        if args.screenshot:
            page, png = args.screenshot
            session = browser.open(base_url + page, width=args.width)
            expected = (args.site / page / "index.html").read_text(encoding="utf-8").count('class="mermaid"')
            drawn = browser.diagrams(session, expected)
            print(f"{page}: {len(drawn)} of {expected} diagrams drawn")
            browser.screenshot(session, Path(png))
            browser.close(session)
        results = measure_site(browser, base_url, args.site, width=args.width)
    keys = (
        "codeLines",
        "cutLines",
        "wrappedLines",
        "inlineCode",
        "inlineSplit",
        "inlineMidWord",
        "wideTables",
    )
    totals = dict.fromkeys(keys, 0)
    for page, found in results.items():
        for key in keys:
            totals[key] += found[key] if isinstance(found[key], int) else len(found[key])
        if found["cutLines"] or found["inlineMidWord"] or found["wideTables"]:
            print(
                f"/{page}: {len(found['cutLines'])}/{found['codeLines']} code lines cut off; "
                f"inline code split mid-word: {found['inlineMidWord']}; wide tables: {found['wideTables']}"
            )
    print(
        f"{len(results)} pages at {args.width} px: "
        f"{totals['cutLines']} of {totals['codeLines']} code lines cut off "
        f"({100 * totals['cutLines'] / max(totals['codeLines'], 1):.1f} %), {totals['wrappedLines']} wrapped; "
        f"{totals['inlineSplit']} of {totals['inlineCode']} inline code spans split across lines, "
        f"{totals['inlineMidWord']} of them mid-word; {totals['wideTables']} tables wider than the page"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
