"""Elastic and multi-node jobs under real torchrun: 2 CPU processes, Gloo, c10d rendezvous on 127.0.0.1.

- A worker lost mid-epoch (SIGKILL, as a machine that dies): torchrun
  ``--max-restarts=1`` restarts the group, which resumes by itself from the
  newest checkpoint (``resume="auto"``) and ends with the weights of the
  uninterrupted job, bit for bit.
- Two torchrun agents as two nodes of one process each, meeting through c10d
  rendezvous, train exactly as one node with two processes.
- A checkpoint saved by hand from a hook (``trainer.state_dict()`` on every
  rank, a collective; ``save_checkpoint`` on rank 0) resumes exactly.

The jobs are ``tests/_dist_scripts/elastic_runs.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "_dist_scripts" / "elastic_runs.py"
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    sys.platform == "win32"
    or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs POSIX signals and torch.distributed with Gloo",
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",  # a hung collective fails the job before the test's timeout
    }


def _torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--monitor-interval=0.1", *options, str(SCRIPT)]


def _results(out: Path, name: str = "rank") -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}{r}.pt", weights_only=True) for r in (0, 1)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ in {key!r}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_killed_worker_is_restarted_and_the_group_resumes_by_itself(tmp_path: Path) -> None:
    command = _torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1")
    job = subprocess.run(
        [*command, "--out", str(tmp_path), "--scenario", "restart", "--kill-rank", "1", "--kill-step", "5"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert job.returncode == 0, job.stderr[-6000:]
    # The first attempt started fresh; rank 1 died at step 5 (SIGKILL); the second attempt
    # found the checkpoint of step 4, mid-epoch, and went on from there.
    assert f"dltrain: no checkpoint in {str(tmp_path / 'ckpt')!r}: starting fresh" in job.stderr
    assert "exitcode: -9" in job.stderr
    ckpt = tmp_path / "ckpt" / "step-000000004.ckpt"
    assert job.stderr.count(f"dltrain: resuming from {str(ckpt)!r} (step 4)") == 1  # rank 0 says it
    ranks, references = _results(tmp_path), _results(tmp_path, "reference")
    for rank, reference in zip(ranks, references, strict=True):
        assert rank["attempt"] == 1 and rank["steps"] == list(range(5, 13))
        _same(rank["weights"], reference["weights"])


def test_two_nodes_of_one_process_train_like_one_node_of_two_and_save_by_hand(tmp_path: Path) -> None:
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    one_node.mkdir()
    two_nodes.mkdir()
    port = _free_port()
    agents = [
        subprocess.Popen(
            [
                *_torchrun(
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=dltrain-two-nodes",
                ),
                "--out",
                str(two_nodes),
                "--scenario",
                "plain",
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=JOB_TIMEOUT_S))
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang
            for other in agents:
                other.kill()
            pytest.fail("a node of the two-node job hung")
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-6000:]
    # The reference job only now: run beside the two nodes, its launcher could pick the same free
    # port as theirs for a store (torch before 2.5 lets rank 0 host one on a port chosen early).
    single = subprocess.run(
        [*_torchrun("--standalone", "--nproc-per-node=2"), "--out", str(one_node), "--scenario", "plain"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-6000:]
    nodes, reference = _results(two_nodes), _results(one_node)
    assert sorted(r["node"] for r in nodes) == [(0, 0), (1, 0)]  # two agents, one process each
    assert sorted(r["node"] for r in reference) == [(0, 0), (0, 1)]
    for result in (*nodes, *reference):
        assert result["world"][0] == 2
        _same(result["weights"], reference[0]["weights"])
        _same(result["resumed"], reference[0]["weights"])  # from the checkpoint saved by hand at step 3
