"""How long ``import dltrain`` takes beyond ``import torch``.

Each sample is a fresh interpreter that imports torch, then dltrain, and
reports the time of each import (interpreter start-up excluded). What
dltrain adds is measured directly, as the second import, rather than as a
difference of two noisy totals. The medians over samples are reported,
after one unmeasured interpreter that warms the file-system cache.

    python benchmarks/import_time.py            # 7 samples
    python benchmarks/import_time.py --quick    # 1 sample, no warm-up (a smoke test)

The last line is ``RESULT import_overhead_s=<median time of import dltrain after torch>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

from _common import median, table

_TIMED = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import dltrain
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "dltrain": t2 - t1}))
"""


def import_seconds() -> dict[str, float]:
    """Seconds of ``import torch`` and of ``import dltrain`` after it, in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _TIMED], capture_output=True, text=True, check=True, timeout=300
    )
    times: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=7, help="interpreters to time")
    parser.add_argument("--quick", action="store_true", help="1 sample, no warm-up: seconds")
    args = parser.parse_args(argv)
    samples = 1 if args.quick else args.samples
    if samples < 1:
        parser.error("--samples must be at least 1")
    if not args.quick:
        import_seconds()  # warm the file-system cache
    runs = [import_seconds() for _ in range(samples)]
    torch_s = [r["torch"] for r in runs]
    dltrain_s = [r["dltrain"] for r in runs]
    total_s = [r["torch"] + r["dltrain"] for r in runs]
    rows = [
        [name, f"{median(values):.3f}", f"{min(values):.3f}-{max(values):.3f}"]
        for name, values in (
            ("import torch", torch_s),
            ("import dltrain, after torch", dltrain_s),
            ("both", total_s),
        )
    ]
    print(f"python {sys.version.split()[0]}; {samples} fresh interpreters")
    print()
    print(table(["", "median s", "range s"], rows))
    print()
    print(f"RESULT import_overhead_s={median(dltrain_s):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
