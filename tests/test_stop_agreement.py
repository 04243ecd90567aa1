"""The stop-check cadence under torchrun, driven step by step on a one-process Gloo group.

The all-ranks behaviour (every rank stops at the same step) is tested under
torchrun in ``test_distributed.py``; here: where the check points fall, when a
request is seen, and how the cadence follows the step time.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import pytest
import torch.distributed as dist

from dltrain.default_plugins import _stop_agreement
from dltrain.default_plugins._stop_agreement import CHECK_SECONDS, MAX_CHECK_STEPS, StopAgreement
from dltrain.state import RunKind, State

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A one-process Gloo group; the agreements made on it are finished, as the plugin's teardown
    does, and kept alive until the group is destroyed (a Gloo worker releasing the last reference
    to a buffer while the group is destroyed deadlocks on the GIL under torch 2.4)."""
    made: list[StopAgreement] = []
    make = StopAgreement.__init__

    def init(self: StopAgreement, *args: object, **kwargs: object) -> None:
        make(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(StopAgreement, "__init__", init)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        for agreement in made:
            agreement.finish()
        dist.destroy_process_group()
        made.clear()


class Clock:
    """A stand-in for ``time.perf_counter`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drive(agreement: StopAgreement, steps: int, step_seconds: float, clock: Clock, ask_at: int | None = None):
    """Train ``steps`` steps as the loop does; the check points and the step where the stop was agreed."""
    state = State(run=RunKind.FIT)
    agreement.count_now(state)  # fit start
    checks, stopped = [], None
    for step in range(1, steps + 1):
        clock.now += step_seconds
        state.global_step = step
        if ask_at is not None and step >= ask_at:
            state.stop_requested = True
        if step >= agreement.next_check:
            checks.append(step)
            if agreement.count_at_check(state) and stopped is None:
                stopped = step
    return checks, stopped


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_stop_agreement.time, "perf_counter", fake)
    return fake


def test_a_fixed_cadence_checks_every_n_steps_and_a_stop_lands_within_2n_minus_1(group, clock) -> None:
    agreement = StopAgreement(group, every=3)
    checks, stopped = drive(agreement, 12, 0.001, clock, ask_at=4)
    assert checks == [3, 6, 9, 12]
    assert stopped == 9  # asked at 4, exchanged at 6, read at 9
    assert agreement.delay_steps == 5 and stopped - 4 <= agreement.delay_steps


def test_a_request_at_a_check_point_is_exchanged_there(group, clock) -> None:
    _, stopped = drive(StopAgreement(group, every=3), 12, 0.001, clock, ask_at=3)
    assert stopped == 6


def test_fast_steps_double_the_cadence_up_to_about_check_seconds_of_training(group, clock) -> None:
    step_seconds = CHECK_SECONDS / 20  # 20 steps make one interval
    agreement = StopAgreement(group, every=None)
    checks, _ = drive(agreement, 200, step_seconds, clock)
    assert checks[:6] == [1, 2, 4, 8, 16, 32]  # a proposal takes effect one check point later
    assert agreement.every == 20
    assert all(b - a == 20 for a, b in pairwise(checks[6:]))


def test_steps_slower_than_check_seconds_are_checked_every_step(group, clock) -> None:
    agreement = StopAgreement(group, every=None)
    checks, stopped = drive(agreement, 10, CHECK_SECONDS * 2, clock, ask_at=5)
    assert checks == list(range(1, 11))
    assert stopped == 6 and agreement.delay_steps == 2


def test_the_cadence_never_exceeds_its_cap(group, clock) -> None:
    agreement = StopAgreement(group, every=None)
    drive(agreement, 20_000, 1e-9, clock)
    assert agreement.every == MAX_CHECK_STEPS


def test_an_adaptive_stop_lands_within_the_delay_it_announces(group, clock) -> None:
    for ask_at in range(30, 70):
        agreement = StopAgreement(group, every=None)
        _, stopped = drive(agreement, 200, CHECK_SECONDS / 20, clock, ask_at=ask_at)
        assert stopped is not None and stopped - ask_at <= agreement.delay_steps


def test_count_now_is_exact_and_restarts_the_interval(group, clock) -> None:
    agreement = StopAgreement(group, every=4)
    state = State(run=RunKind.FIT, global_step=10)
    assert agreement.count_now(state) == 0
    assert agreement.next_check == 14
    state.stop_requested = True
    assert agreement.count_now(state) == 1
