"""The opt-in ``Profiler`` plugin: Chrome traces of the scheduled optimizer steps of a fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain.callbacks import Profiler
from dltrain.errors import ConfigError
from dltrain.state import RunKind, State
from dltrain.testing import tiny_loader, tiny_model


def _fit(profiler: Profiler, loss_fn: Any = None, **config: Any) -> dltrain.Trainer:
    model = tiny_model()
    trainer = dltrain.Trainer(**{"device": "cpu", "progress": "off", **config}, plugins=[profiler])
    trainer.fit(
        model,
        tiny_loader(),  # 4 batches an epoch
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=loss_fn or torch.nn.CrossEntropyLoss(),
    )
    return trainer


def _profiled_steps(trace: Path) -> list[int]:
    """The ``ProfilerStep#k`` numbers in a Chrome trace (which must be valid JSON with events)."""
    events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)  # operators were recorded
    names = {str(e.get("name", "")) for e in events}
    return sorted(int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#"))


def test_a_fit_writes_a_trace_of_the_active_steps_into_its_run_folder() -> None:
    profiler = Profiler(wait=1, warmup=1, active=3)
    trainer = _fit(profiler, max_steps=8)  # two epochs: the schedule spans them
    run_path = trainer.get_plugin("metric_log").run_path
    assert profiler.traces == [run_path / "profiler" / "trace_step5.pt.trace.json"]
    assert _profiled_steps(profiler.traces[0]) == [2, 3, 4]  # optimizer steps 3, 4 and 5
    assert trainer.get_plugin("profiler") is profiler


def test_each_repeat_writes_its_own_trace() -> None:
    profiler = Profiler(wait=2, warmup=1, active=2, repeat=2, out_dir="traces")
    _fit(profiler, max_steps=12, run_dir=None)
    assert [p.name for p in profiler.traces] == ["trace_step5.pt.trace.json", "trace_step10.pt.trace.json"]
    assert all(p.parent == Path("traces") for p in profiler.traces)
    assert [_profiled_steps(p) for p in profiler.traces] == [[3, 4], [8, 9]]


def test_without_a_run_folder_traces_go_to_a_new_folder_under_profiler() -> None:
    profiler = Profiler(wait=0, warmup=1, active=1)
    _fit(profiler, max_steps=3, run_dir=None)
    (trace,) = profiler.traces
    assert trace.parent.parent == Path("profiler") and trace.is_file()
    assert _profiled_steps(trace) == [1]


class _Broken(Exception):
    pass


def test_an_exception_mid_cycle_still_stops_the_profiler_and_writes_what_it_recorded() -> None:
    calls = 0

    def failing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:  # the fifth step: the third of the active ones
            raise _Broken("loss broke")
        return torch.nn.functional.cross_entropy(outputs, targets)

    profiler = Profiler(wait=1, warmup=1, active=3)
    with pytest.raises(_Broken):
        _fit(profiler, loss_fn=failing_loss, max_steps=8)
    (trace,) = profiler.traces
    assert _profiled_steps(trace) == [2, 3, 4]  # step 4 is the one that raised
    assert not torch.autograd.profiler._is_profiler_enabled  # no profiler left running
    # The next fit profiles as usual.
    again = Profiler(wait=0, warmup=1, active=1, out_dir="again")
    _fit(again, max_steps=2)
    assert [_profiled_steps(p) for p in again.traces] == [[1]]


def test_a_fit_shorter_than_the_cycle_writes_the_steps_it_recorded() -> None:
    profiler = Profiler(wait=1, warmup=1, active=3, out_dir="short")
    _fit(profiler, max_steps=4)
    (trace,) = profiler.traces
    assert trace.name == "trace_step4.pt.trace.json"
    assert _profiled_steps(trace) == [2, 3, 4]  # #4: what ran after the last step, up to teardown


def test_only_rank_zero_profiles(tmp_path: Path) -> None:
    profiler = Profiler(wait=0, warmup=1, active=1, out_dir="ranks")
    trainer = dltrain.Trainer(device="cpu", run_dir=None)
    profiler.on_fit_start(trainer=trainer, state=State(run=RunKind.FIT, rank=1, world_size=2))
    profiler.on_train_batch_end(state=State(run=RunKind.FIT, rank=1, world_size=2, global_step=1))
    profiler.on_teardown()
    assert profiler.traces == [] and not (tmp_path / "ranks").exists()


@pytest.mark.parametrize(
    "kwargs", [{"active": 0}, {"wait": -1}, {"warmup": 1.5}, {"repeat": True}], ids=lambda k: str(k)
)
def test_a_bad_schedule_is_refused_when_the_plugin_is_made(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(ConfigError, match=f"Profiler {name}="):
        Profiler(**kwargs)


def test_neither_import_dltrain_nor_the_callbacks_package_loads_the_profiler_module() -> None:
    code = (
        "import sys, dltrain, dltrain.callbacks\n"
        "assert 'dltrain.callbacks.profiler' not in sys.modules\n"
        "dltrain.callbacks.Profiler\n"
        "assert 'dltrain.callbacks.profiler' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_trace_holds_the_gpu_kernels() -> None:
    profiler = Profiler(wait=0, warmup=1, active=2, out_dir="cuda")
    _fit(profiler, max_steps=4, device="cuda")
    (trace,) = profiler.traces
    events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
