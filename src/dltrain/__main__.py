"""``python -m dltrain``: the same as the ``dltrain`` command."""

from __future__ import annotations

import sys

from dltrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
