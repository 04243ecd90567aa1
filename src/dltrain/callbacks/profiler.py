"""An opt-in plugin that profiles training steps with ``torch.profiler`` and writes Chrome traces.

Register it to profile a fit: ``Trainer(plugins=[Profiler()])``. Nothing of it
runs in a run without it, and ``import dltrain`` does not import this module.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.profiler

from dltrain._markers import hookimpl
from dltrain.errors import ConfigError

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["Profiler"]

_ACTION = torch.profiler.ProfilerAction
_OUTSIDE_CYCLE = (_ACTION.NONE, _ACTION.RECORD_AND_SAVE)  # waiting, or the last step of a cycle
_IN_CYCLE = (_ACTION.WARMUP, _ACTION.RECORD, _ACTION.RECORD_AND_SAVE)
_CLEARS_EVENTS = r"Warning: Profiler clears events at the end of each cycle"

#: The folder under the working directory that holds the traces when no other is known.
DEFAULT_DIR = Path("profiler")


class Profiler:
    """Profile optimizer steps of a fit with ``torch.profiler``; write each cycle as a Chrome trace.

    The profiler starts at ``on_fit_start`` and advances one profiler step per
    optimizer step (``state.global_step``; with gradient accumulation a step
    holds all its micro-batches). Over those steps it follows
    ``torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
    repeat=repeat)``: it skips ``wait`` steps, warms up for ``warmup`` (traced,
    then discarded), records ``active`` steps and writes them as one trace; then
    the cycle starts again, ``repeat`` times in all (0: until the fit ends). A
    validation that runs while steps are recorded lands in the current step.
    The profiler is stopped at ``on_teardown``, after a fit that ended or
    raised alike; a cycle cut short is written with the steps it recorded, the
    last of which then holds what ran after the fit's last optimizer step.

    Each trace is a Chrome trace file (open it at https://ui.perfetto.dev or
    ``chrome://tracing``) named ``trace_step<N>.pt.trace.json`` after the
    optimizer step ``N`` at which it was written; in it, ``ProfilerStep#k`` is
    the fit's ``k + 1``-th optimizer step (counted from where a resumed fit
    continued). Traces go to ``out_dir`` when given; else to the
    ``profiler`` folder of the run folder (``<run_dir>/<run>/profiler``) when
    the ``metric_log`` plugin keeps one; else to a new folder under
    ``./profiler`` named after the local time. Under torchrun only rank 0
    profiles and writes; the other ranks run as without the plugin.

    Profiling slows the recorded steps (``profile_memory`` and ``with_stack``
    much more). The first profiled fit of a process also waits while torch
    imports its compiler's configuration (once, a few seconds).

    Args:
        wait: Steps of each cycle that are not profiled, before the warm-up.
        warmup: Steps traced but discarded (the profiler's own start-up cost).
        active: Steps recorded and written in each trace.
        repeat: The number of cycles; 0 repeats them until the fit ends.
        record_shapes: Record the input shapes of each operator.
        profile_memory: Record tensor memory allocations and frees.
        with_stack: Record the Python source location of each operator.
        out_dir: The folder for the traces (created; files of the same name
            are overwritten); default: see above.
        name: The plugin's name (``trainer.get_plugin("profiler")``).

    Attributes:
        traces: The trace files written by the latest fit, in order.

    Raises:
        ConfigError: a schedule number is out of range.
    """

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        *,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        out_dir: str | Path | None = None,
        name: str = "profiler",
    ) -> None:
        for label, value, least in (
            ("wait", wait, 0),
            ("warmup", warmup, 0),
            ("active", active, 1),
            ("repeat", repeat, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"Profiler {label}={value!r} is not an integer >= {least}; e.g. "
                    f"Profiler(wait=1, warmup=1, active=3, repeat=1)"
                )
        self.name = name
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.record_shapes, self.profile_memory, self.with_stack = record_shapes, profile_memory, with_stack
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.traces: list[Path] = []
        self._profile: Any = None  # the torch.profiler.profile of the current fit (rank 0)
        self._directory = DEFAULT_DIR
        self._step = 0

    def _folder(self, trainer: Trainer) -> Path:
        if self.out_dir is not None:
            return self.out_dir
        metric_log = trainer.get_plugin("metric_log")
        run_path = getattr(metric_log, "run_path", None)
        if run_path is not None:
            return Path(run_path) / "profiler"
        from dltrain.default_plugins.metric_log import new_run_path

        return new_run_path(DEFAULT_DIR)

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Start the profiler (rank 0), after the ``metric_log`` plugin made the run folder."""
        self.traces = []
        if not state.is_global_zero:
            return
        self._directory = self._folder(trainer)
        self._directory.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if state.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._step = state.global_step
        self._profile = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat
            ),
            on_trace_ready=self._write,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._profile.start()

    def _write(self, profile: Any) -> None:
        path = self._directory / f"trace_step{self._step}.pt.trace.json"
        profile.export_chrome_trace(str(path))
        self.traces.append(path)

    @hookimpl
    def on_train_batch_end(self, state: State) -> None:
        """After each optimizer step: the profiler's next step."""
        profile = self._profile
        if profile is None or state.global_step == self._step:
            return
        self._step = state.global_step
        starts_cycle = (
            profile.current_action in _OUTSIDE_CYCLE and profile.schedule(profile.step_num + 1) in _IN_CYCLE
        )
        if not starts_cycle:
            profile.step()
            return
        with warnings.catch_warnings():  # torch warns that a new cycle starts afresh: here each has its file
            warnings.filterwarnings("ignore", message=_CLEARS_EVENTS)
            profile.step()

    @hookimpl
    def on_teardown(self) -> None:
        """Stop the profiler (writing a cycle cut short), whether the fit ended or raised."""
        profile, self._profile = self._profile, None
        if profile is not None:
            profile.stop()
