"""Print one of the README's two set-up commands: ``example`` (the first) or ``test`` (the second)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def setup_commands() -> list[str]:
    """The non-empty lines of the README's first ``bash`` block."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    if block is None:
        raise SystemExit("README.md has no ```bash block of set-up commands")
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "test"
    print(setup_commands()[{"example": 0, "test": 1}[which]])
