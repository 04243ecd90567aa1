"""Print shell exports that hand pip's configuration on this machine to uv.

uv reads no pip.conf: without these, a machine whose pip takes torch from a local wheel folder or
index, or caps versions with a constraints file, would resolve differently under uv.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip's setting -> uv's environment variable (both take space-separated lists).
FORWARDED = {
    "index-url": "UV_INDEX_URL",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "constraint": "UV_CONSTRAINT",
}


def pip_settings() -> dict[str, str]:
    """pip's effective settings (files and PIP_* variables), later sources overriding earlier ones."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        if name in FORWARDED and value:
            settings[name] = value.strip().strip("'\"")
    return settings


def main() -> None:
    for name, value in pip_settings().items():
        print(f"export {FORWARDED[name]}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
