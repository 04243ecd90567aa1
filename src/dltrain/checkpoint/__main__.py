"""``python -m dltrain.checkpoint``: inspect and verify checkpoints from a shell.

Commands:

* ``inspect PATH [--json]``: what a checkpoint holds (step, epoch, metrics,
  versions, config, contents) and whether it is intact. ``PATH`` is a
  ``.ckpt`` file, its ``.json`` manifest, or a checkpoint directory (every
  checkpoint in it). Exit status 0 when everything inspected is intact, 1 otherwise.
* ``list DIR``: the complete checkpoints in ``DIR``, oldest first, with
  ``last`` and ``best`` marked (manifests and sizes only; no checksums).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dltrain.checkpoint._inspect import format_report, inspect_checkpoint, inspect_directory
from dltrain.checkpoint._store import rank_best, scan


def _inspect(path: Path, as_json: bool) -> int:
    reports = inspect_directory(path) if path.is_dir() else [inspect_checkpoint(path)]
    if as_json:
        print(json.dumps(reports if path.is_dir() else reports[0], indent=2, sort_keys=True))
    else:
        if path.is_dir() and not reports:
            print(f"{path}: no checkpoints")
        print("\n\n".join(format_report(r) for r in reports))
    return 0 if reports and all(r["ok"] for r in reports) else 1


def _list(directory: Path) -> int:
    if not directory.is_dir():
        print(f"{directory}: not a directory", file=sys.stderr)
        return 1
    infos, problems = scan(directory)
    best = rank_best(infos)
    for info in infos:
        marks = [
            m for m, hit in (("last", info is infos[-1]), ("best", bool(best) and info is best[0])) if hit
        ]
        score = f"  {info.monitor}={info.score}" if info.monitor and info.score is not None else ""
        flag = f"  [{', '.join(marks)}]" if marks else ""
        print(f"{info.name}  step {info.global_step}  epoch {info.epoch + 1}  {info.trigger}{score}{flag}")
    for path, problem in problems:
        print(f"PROBLEM {path}: {problem}")
    if not infos:
        print(f"{directory}: no complete checkpoints")
    return 0 if not problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dltrain.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="show what a checkpoint holds and verify it")
    p_inspect.add_argument("path", type=Path, help="a .ckpt file, its .json manifest, or a directory")
    p_inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    p_list = sub.add_parser("list", help="list the checkpoints of a directory")
    p_list.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.path, args.json)
    return _list(args.directory)


if __name__ == "__main__":
    sys.exit(main())
