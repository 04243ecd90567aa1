"""The callbacks under torchrun (2 processes, Gloo, CPU): the same results as one process, one printer,
stops agreed at the same step and saved.

The runs are in ``tests/_dist_scripts/callbacks_runs.py``; the job goes through real
``torchrun`` with a hard timeout, as in ``test_distributed.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import SCRIPTS, needs_distributed, torchrun

if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import callbacks_runs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("callbacks_ddp")
    proc, _ = torchrun(SCRIPTS / "callbacks_runs.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@needs_distributed
def test_the_average_and_the_gradient_norms_are_those_of_one_process(
    ranks: list[dict[str, Any]], tmp_path: Path
) -> None:
    single = callbacks_runs.fit_ema_and_monitors(str(tmp_path / "runs"))
    for result in ranks:
        torch.testing.assert_close(result["ema"]["average"], single["average"], rtol=0, atol=1e-5)
        for row, expected in zip(result["ema"]["history"], single["history"], strict=True):
            assert row["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)  # of the average
    steps = ranks[0]["ema"]["steps"]
    assert [r["step"] for r in steps] == [r["step"] for r in single["steps"]] == [2, 4, 6, 8, 10, 12]
    for row, expected in zip(steps, single["steps"], strict=True):
        for name in ("grad_norm", "grad_norm_layer/0", "grad_norm_layer/4", "lr-default/group0"):
            assert row[name] == pytest.approx(expected[name], rel=1e-4), (row["step"], name)


@needs_distributed
def test_only_rank_0_prints(ranks: list[dict[str, Any]]) -> None:
    assert "total parameters" in ranks[0]["ema"]["printed"]
    assert ranks[1]["ema"]["printed"] == ""


@needs_distributed
def test_early_stopping_stops_every_rank_after_the_same_validation(ranks: list[dict[str, Any]]) -> None:
    results = [r["early_stopping"] for r in ranks]
    assert results[0] == results[1]
    assert results[0]["global_step"] == 12 and len(results[0]["epochs"]) == 2
    assert results[0]["stop_reason"].startswith("val_loss did not improve for 1 validation")


@needs_distributed
@pytest.mark.parametrize("run", ["time_limit", "time_limit_rank_1"])
def test_a_time_limit_stops_every_rank_at_the_same_step_within_the_limit(
    ranks: list[dict[str, Any]], run: str
) -> None:
    results = [r[run] for r in ranks]
    assert results[0]["global_step"] == results[1]["global_step"] == results[0]["saved_step"]
    limits = (40.0, 40.0) if run == "time_limit" else (40.0, 20.0)
    assert all(r["clock"] <= limit for r, limit in zip(results, limits, strict=True))
    if run == "time_limit_rank_1":  # rank 1 asked; rank 0 stopped with it, a step later at most
        assert results[0]["stop_reason"].endswith("(on rank 1)")
        assert results[1]["stop_reason"].startswith("time limit 20.0s")
