"""Distributed data-parallel training under torchrun: 2 processes, Gloo, on the CPU.

The runs of ``tests/_dist_scripts/ddp_runs.py`` go through real ``torchrun``
(``python -m torch.distributed.run --standalone``), as users start them, and
are compared with the same runs in this process. Each torchrun job has a hard
timeout. NCCL and GPUs are not tested here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dltrain
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.data import InMemoryLoader
from dltrain.default_plugins import distributed
from dltrain.default_plugins.distributed import DistributedPlugin, ShardSampler
from dltrain.state import Phase, RunKind, State

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "_dist_scripts"
JOB_TIMEOUT_S = 120

if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import ddp_runs as runs  # noqa: E402  (needs SCRIPTS on sys.path)

needs_distributed = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)


def torchrun(script: Path, *args: str, nproc: int = 2) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``script`` under torchrun with ``nproc`` CPU processes; the result and its wall time."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",  # a hung collective fails the job before the test's timeout
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    return proc, time.perf_counter() - start


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"weights differ in {key!r}")


def _metrics_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (key, a[key], b[key])


# -- the runs, once for the whole file --------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The runs in this one process, with the global batch; and a checkpoint after epoch 1."""
    directory = tmp_path_factory.mktemp("single")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs.fit_sequential(epochs=1, checkpoint_dir=str(directory / "checkpoints"))
    return {
        "sequential": runs.fit_sequential(),
        "in_memory": runs.fit_in_memory_shuffled(),
        "accumulating": runs.fit_accumulating(),
        "rolling_back": runs.fit_rolling_back(str(directory / "rollback")),
        "checkpoint": list_checkpoints(directory / "checkpoints")[-1].payload_path,
    }


@pytest.fixture(scope="module")
def ddp(single: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same runs under torchrun, 2 processes; the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("ddp")
    proc, seconds = torchrun(
        SCRIPTS / "ddp_runs.py", "--out", str(out), "--resume-from", str(single["checkpoint"])
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"ranks": ranks, "out": out, "seconds": seconds, "stderr": proc.stderr}


# -- what users see ----------------------------------------------------------------------


@needs_distributed
def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    for run in ("sequential", "in_memory"):
        rank0, rank1 = (r[run]["weights"] for r in ddp["ranks"])
        _close(rank0, rank1, atol=0)  # DDP keeps the replicas identical
        _close(rank0, single[run]["weights"])


@needs_distributed
def test_each_sample_is_trained_on_once_per_epoch_across_the_ranks(ddp: dict[str, Any]) -> None:
    for run in ("sequential", "in_memory", "loader_shuffled"):
        ids0, ids1 = (r[run]["ids"] for r in ddp["ranks"])
        for epoch in (0, 1):
            assert len(ids0[epoch]) == len(ids1[epoch]) == runs.N_TRAIN // 2
            assert sorted(ids0[epoch] + ids1[epoch]) == list(range(runs.N_TRAIN)), (run, epoch)


@needs_distributed
def test_a_shuffling_data_loader_gets_a_distributed_sampler_seeded_from_the_config(
    ddp: dict[str, Any],
) -> None:
    for rank, result in enumerate(ddp["ranks"]):
        ids = result["loader_shuffled"]["ids"]
        for epoch in (0, 1):
            sampler = DistributedSampler(range(runs.N_TRAIN), num_replicas=2, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            assert ids[epoch] == list(sampler)
        assert ids[0] != ids[1], "set_epoch must change the order every epoch"


@needs_distributed
def test_metrics_are_those_of_one_process_on_every_rank(ddp: dict[str, Any], single: dict[str, Any]) -> None:
    for run in ("sequential", "in_memory"):
        expected = single[run]["history"]
        for result in ddp["ranks"]:
            got = result[run]["history"]
            assert len(got) == len(expected) == 2
            for row, row_expected in zip(got, expected, strict=True):
                _metrics_close(row, row_expected)
    for result in ddp["ranks"]:  # test data: 29 samples, shards of 15 and 14
        _metrics_close(result["sequential"]["test"], single["sequential"]["test"])


@needs_distributed
def test_an_lr_schedule_counts_optimizer_steps_not_processes(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    # 2 epochs of 6 steps, halved every 4 steps: 0.05 * 0.5**3.
    assert single["sequential"]["lr"] == pytest.approx([0.05 * 0.5**3])
    for result in ddp["ranks"]:
        assert result["sequential"]["lr"] == single["sequential"]["lr"]


@needs_distributed
def test_each_process_knows_its_rank_and_gets_its_plain_model_back(ddp: dict[str, Any]) -> None:
    for rank, result in enumerate(ddp["ranks"]):
        assert result["sequential"]["world"] == (2, rank)
        assert result["sequential"]["model_after_fit"] == "Sequential"  # unwrapped from DDP


@needs_distributed
@pytest.mark.parametrize(
    ("run", "step", "reason"),
    [
        # Checked every step: asked after step 3 (the NaN check at step 2), agreed without
        # waiting, so one step later.
        ("stop_at_step", 4, "asked on rank 1 only"),
        # Checked every 2 steps (at 2, 4, ...): asked after step 1, exchanged at 2, read at 4.
        ("stop_every_2_steps", 4, "asked on rank 1 only"),
        ("stop_at_epoch_end", 6, "asked on rank 0 only, at an epoch's end"),
        ("stop_nonfinite", 3, "non-finite"),
    ],
)
def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(
    ddp: dict[str, Any], run: str, step: int, reason: str
) -> None:
    results = [r[run] for r in ddp["ranks"]]
    assert [r["global_step"] for r in results] == [step, step]
    assert results[0]["epochs"] == results[1]["epochs"]
    assert all(r["stop_reason"].startswith(reason) for r in results)


@needs_distributed
def test_with_the_cadence_chosen_from_the_step_time_every_rank_still_stops_at_the_same_step(
    ddp: dict[str, Any],
) -> None:
    # Asked after step 3; the checks come every 1, 2, 4, ... steps as fast as these are, or every
    # step when slow. At the latest the epoch's end (step 6) stops all.
    results = [r["stop_adaptive"] for r in ddp["ranks"]]
    assert results[0]["global_step"] == results[1]["global_step"]
    assert 4 <= results[0]["global_step"] <= 6
    assert all(r["stop_reason"].startswith("asked on rank 1 only") for r in results)


@needs_distributed
def test_accumulation_skips_the_all_reduce_of_micro_batches_that_do_not_step(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    for result in ddp["ranks"]:
        acc = result["accumulating"]
        assert acc["steps"] == 12 and len(acc["by_batch"]) == 24  # 2 epochs of 12 micro-batches
        # The first micro-batch of each pair accumulates under no_sync: no all-reduce; the second
        # all-reduces the pair's gradients (one call per DDP bucket).
        assert [calls for micro_step, calls in acc["by_batch"] if micro_step == 1] == [0] * 12
        assert all(calls > 0 for micro_step, calls in acc["by_batch"] if micro_step == 0)
        _close(acc["weights"], single["accumulating"]["weights"])


@needs_distributed
def test_a_nan_on_one_rank_rolls_every_rank_back_together_with_one_process_result(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    rank0, rank1 = (r["rolling_back"] for r in ddp["ranks"])
    assert rank0["rollbacks"] == rank1["rollbacks"] == single["rolling_back"]["rollbacks"] == 1
    # 2 epochs of 6 steps, the poisoned batch skipped once: 11 steps, everywhere.
    assert rank0["steps"] == rank1["steps"] == single["rolling_back"]["steps"] == 11
    _close(rank0["weights"], rank1["weights"], atol=0)
    assert all(bool(torch.isfinite(w).all()) for w in rank0["weights"].values())
    _close(rank0["weights"], single["rolling_back"]["weights"])


@needs_distributed
def test_a_step_skipped_for_a_nan_loss_on_one_rank_is_skipped_on_every_rank(ddp: dict[str, Any]) -> None:
    rank0, rank1 = (r["skip_nonfinite"] for r in ddp["ranks"])
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1
    _close(rank0["weights"], rank1["weights"], atol=0)
    assert all(bool(torch.isfinite(w).all()) for w in rank0["weights"].values())


@needs_distributed
def test_only_rank_0_writes_checkpoints_and_they_hold_the_plain_model(ddp: dict[str, Any]) -> None:
    directory = ddp["out"] / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == [
        "step-000000006.ckpt",
        "step-000000006.json",
        "step-000000012.ckpt",
        "step-000000012.json",
    ]
    payload = load_checkpoint(directory / "step-000000012.ckpt")
    assert payload["world_size"] == 2
    assert not any(key.startswith("module.") for key in payload["model"])
    _close(payload["model"], ddp["ranks"][0]["sequential"]["weights"], atol=0)


@needs_distributed
def test_a_checkpoint_written_under_ddp_resumes_in_one_process(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    checkpoint = ddp["out"] / "checkpoints" / "step-000000006.ckpt"
    with pytest.warns(UserWarning, match="world_size: 2 in the checkpoint, 1 now"):
        resumed = runs.fit_sequential(resume=str(checkpoint))
    _close(resumed["weights"], single["sequential"]["weights"])
    _metrics_close(resumed["history"][1], single["sequential"]["history"][1])


@needs_distributed
def test_a_checkpoint_written_by_one_process_resumes_under_ddp(
    ddp: dict[str, Any], single: dict[str, Any]
) -> None:
    assert "world_size: 1 in the checkpoint, 2 now" in ddp["stderr"]
    for result in ddp["ranks"]:
        _close(result["resumed_from_single"]["weights"], single["sequential"]["weights"])


@needs_distributed
def test_an_epoch_resumed_mid_way_under_ddp_reports_the_metrics_of_the_uninterrupted_epoch(
    ddp: dict[str, Any],
) -> None:
    for result in ddp["ranks"]:
        run = result["resumed_mid_epoch"]
        _metrics_close(run["resumed"][0], run["uninterrupted"][0])


@needs_distributed
def test_a_rank_that_raises_fails_the_whole_job_promptly(tmp_path: Path) -> None:
    proc, seconds = torchrun(SCRIPTS / "ddp_runs.py", "--out", str(tmp_path), "--scenario", "fail")
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr
    assert seconds < 60, f"the job took {seconds:.0f} s to fail"


@needs_distributed
@pytest.mark.slow
def test_the_mnist_example_runs_under_torchrun_unchanged(mnist_real_dir: Path) -> None:
    script = ROOT / "examples" / "mnist" / "train.py"
    if not script.is_file():
        pytest.skip("examples/mnist/train.py is not there")
    args = ("--epochs", "1", "--loader", "memory", "--device", "cpu", "--data-dir", str(mnist_real_dir))
    proc, _ = torchrun(script, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Printed once (by rank 0), with the batches of one process: 60000 / 2 / 100.
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch 1: [300/300], Loss: "), proc.stdout
    assert lines[1].startswith("Accuracy of the network on the 10000 test images: "), proc.stdout


# -- the plugin's parts, in this process ---------------------------------------------------


def test_a_single_process_run_has_no_distributed_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    names = [p.name for p in dltrain.Trainer(run_dir=None).plugin_manager.plugins()]
    assert "distributed" not in names


@needs_distributed
def test_the_torchrun_environment_registers_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(distributed.TORCHRUN_ENV, ("2", "1", "1", "localhost"), strict=True):
        monkeypatch.setenv(name, value)
    trainer = dltrain.Trainer(run_dir=None)
    assert isinstance(trainer.plugin_manager.get_plugin("distributed"), DistributedPlugin)
    assert (
        dltrain.Trainer(run_dir=None, disable_plugins=["distributed"]).plugin_manager.get_plugin(
            "distributed"
        )
        is None
    )


def _state(rank: int, run: RunKind = RunKind.FIT) -> State:
    return State(run=run, world_size=2, rank=rank)


def test_a_plain_data_loader_is_rebuilt_with_a_distributed_sampler_and_its_settings() -> None:
    dataset = TensorDataset(torch.arange(10.0), torch.arange(10))

    def collate(batch: list[Any]) -> Any:
        return torch.utils.data.default_collate(batch)

    loader = DataLoader(dataset, batch_size=3, shuffle=True, collate_fn=collate, drop_last=True)
    plugin = DistributedPlugin(seed=7)
    plugin._run_seed = 7
    sharded = plugin.prepare_data(state=_state(1), data=loader, phase=Phase.TRAIN)
    assert isinstance(sharded, DataLoader) and isinstance(sharded.sampler, DistributedSampler)
    assert (sharded.sampler.rank, sharded.sampler.num_replicas) == (1, 2)
    assert sharded.sampler.shuffle and sharded.sampler.seed == 7
    assert sharded.dataset is dataset and sharded.batch_size == 3
    assert sharded.collate_fn is collate and sharded.drop_last
    unshuffled = DataLoader(dataset, batch_size=3)
    assert not plugin.prepare_data(state=_state(0), data=unshuffled, phase=Phase.TRAIN).sampler.shuffle
    # Already sharded, or one process: left alone.
    assert plugin.prepare_data(state=_state(0), data=sharded, phase=Phase.TRAIN) is None
    one = State(run=RunKind.FIT)
    assert plugin.prepare_data(state=one, data=loader, phase=Phase.TRAIN) is None


def test_evaluation_shards_are_not_padded_so_metrics_stay_exact() -> None:
    dataset = TensorDataset(torch.arange(5.0), torch.arange(5))
    plugin = DistributedPlugin()
    shards = [
        plugin.prepare_data(state=_state(r), data=DataLoader(dataset, batch_size=2), phase=Phase.VALIDATE)
        for r in (0, 1)
    ]
    assert [list(s.sampler) for s in shards] == [[0, 2, 4], [1, 3]]
    assert all(isinstance(s.sampler, ShardSampler) for s in shards)
    loader = InMemoryLoader(torch.arange(5.0), batch_size=2)
    memory = [plugin.prepare_data(state=_state(r), data=loader, phase=Phase.TEST) for r in (0, 1)]
    assert [torch.cat([b[0] for b in m]).tolist() for m in memory] == [[0, 2, 4], [1, 3]]
    # Predict keeps all data in every process.
    assert plugin.prepare_data(state=_state(1), data=loader, phase=Phase.PREDICT) is None


def test_an_in_memory_loader_made_before_the_group_is_sharded_like_it_shards_itself() -> None:
    loader = InMemoryLoader(torch.arange(10.0), batch_size=2, shuffle=True, seed=4)
    loader.set_epoch(3)
    plugin = DistributedPlugin()
    for rank in (0, 1):
        sharded = plugin.prepare_data(state=_state(rank), data=loader, phase=Phase.TRAIN)
        expected = InMemoryLoader(
            torch.arange(10.0), batch_size=2, shuffle=True, seed=4, rank=rank, world_size=2
        )
        assert sharded.epoch == 3
        assert torch.equal(sharded.indices(), expected.indices(3))


def test_data_that_cannot_be_sharded_is_used_whole_with_a_warning_on_rank_0() -> None:
    batches = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
    plugin = DistributedPlugin()
    with pytest.warns(UserWarning, match="cannot be sharded automatically"):
        assert plugin.prepare_data(state=_state(0), data=batches, phase=Phase.TRAIN) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugin.prepare_data(state=_state(1), data=batches, phase=Phase.TRAIN) is None


def test_evaluation_data_smaller_than_the_world_is_an_error_naming_both() -> None:
    one_sample = DataLoader(TensorDataset(torch.zeros(1), torch.zeros(1)), batch_size=1)
    with pytest.raises(dltrain.DataError, match="1 sample"):
        DistributedPlugin().prepare_data(state=_state(0), data=one_sample, phase=Phase.VALIDATE)


def test_a_bad_timeout_setting_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(dltrain.DeviceError, match="DLTRAIN_DIST_TIMEOUT='soon'"):
        distributed._timeout_from_env()
