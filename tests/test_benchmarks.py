"""The benchmark scripts run and end with a parseable RESULT line (``--quick``; no timing is judged).

They read real MNIST from ``$DLTRAIN_MNIST_DIR`` when it is set, and use
synthetic MNIST-shaped data otherwise.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> tuple[str, dict[str, float]]:
    """Run a benchmark with ``--quick``; its output and the values of its RESULT line."""
    data_dir = os.environ.get("DLTRAIN_MNIST_DIR")
    extra = ["--data-dir", data_dir] if data_dir and script in ("overhead.py", "mnist.py") else []
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *extra, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"RESULT((?: \w+=\S+)+)", last)
    assert match, f"the last line of {script} is not a RESULT line: {last!r}"
    values = {k: float(v) for k, v in (pair.split("=") for pair in match.group(1).split())}
    return result.stdout, values


def test_overhead_benchmark_reports_both_ratios() -> None:
    out, values = _run("overhead.py")
    assert set(values) == {"overhead_ratio", "bare_ratio"}
    assert all(v > 0 and math.isfinite(v) for v in values.values())
    assert "plain loop" in out and ("real MNIST" in out or "synthetic" in out)
    assert re.search(r"Lightning\s+(not installed|\d)", out)
    assert re.search(r"Ignite\s+(not installed|\d)", out)


def test_mnist_benchmark_reports_speedup_ratio_and_accuracy() -> None:
    out, values = _run("mnist.py")
    assert set(values) == {"speedup_vs_torchvision", "ratio_vs_plain", "accuracy"}
    assert values["ratio_vs_plain"] > 0 and 0 <= values["accuracy"] <= 100
    if "torchvision not installed" not in out:
        assert values["speedup_vs_torchvision"] > 0
    setting = os.environ.get("DLTRAIN_MNIST_DIR")
    if setting and (Path(setting) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        assert "real MNIST" in out


def test_import_time_benchmark_reports_the_overhead() -> None:
    _, values = _run("import_time.py")
    assert set(values) == {"import_overhead_s"} and math.isfinite(values["import_overhead_s"])


def test_ddp_benchmark_runs_under_torchrun_and_reports_the_ratio() -> None:
    out, values = _run("ddp.py")
    assert set(values) == {"ddp_overhead_ratio"} and values["ddp_overhead_ratio"] > 0
    assert "plain DDP loop" in out and "processes: 2 (torchrun, gloo" in out


def test_instruction_benchmark_runs_its_variants() -> None:
    """The counting itself needs valgrind and minutes; here each variant's body runs once."""
    for variant in ("plain", "dltrain", "bare", "manual"):
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "instructions.py"), "--run", variant, "--steps", "2"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_checkpoint_benchmark_reports_the_stall_and_memory_ratios() -> None:
    out, values = _run("checkpoint.py")
    assert set(values) == {"stall_ratio", "memory_ratio"}
    assert all(v > 0 and math.isfinite(v) for v in values.values())
    assert "bare torch.save s" in out and "verify s (read+sha256)" in out


def test_resume_benchmark_reports_fast_forward_against_replay() -> None:
    out, values = _run("resume.py")
    assert set(values) == {
        "resume_10_s",
        "resume_90_s",
        "replay_90_s",
        "ratio_90_vs_replay",
        "ratio_90_vs_plain",
    }
    assert all(v > 0 and math.isfinite(v) for v in values.values())
    assert "DataLoader (fast-forward)" in out and "any iterable (replay)" in out
