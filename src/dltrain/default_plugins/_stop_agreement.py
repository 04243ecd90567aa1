"""Stop agreement under torchrun: every process leaves the fit at the same step.

A stop may be requested in one process only (a signal, early stopping,
``on_nonfinite="stop"``, a plugin's ``request_stop``). At a *check point* the
processes all-reduce, without waiting, whether any of them wants to stop, and
read the all-reduce started at the check point before (finished long since):
when it says yes, every process stops at this step. Between check points
nothing is exchanged, so the cost of the exchange (a Gloo all-reduce of a CPU
tensor: under NCCL no GPU synchronisation) is spread over several steps.

The *cadence* (optimizer steps from one check point to the next) is either
fixed (``stop_check_every_n_steps``: a stop then lands at a step that depends
only on when it was asked) or chosen from the step time, so that check points
come about every :data:`CHECK_SECONDS` of training: every step when a step
takes longer than that. Each process proposes a cadence in the exchange and
all take the smallest proposal, at the same step, so they always agree. At
epoch boundaries and at fit start the count is exact (a blocking all-reduce).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dltrain.state import State

__all__ = ["CHECK_SECONDS", "MAX_CHECK_STEPS", "StopAgreement"]

#: With an adaptive cadence: about how much training time passes between two check points.
CHECK_SECONDS = 0.05

#: With an adaptive cadence: the most optimizer steps between two check points.
MAX_CHECK_STEPS = 1024


class StopAgreement:
    """The stop exchange of one run on one process group (see the module docs).

    Args:
        group: The process group the exchange runs on (a Gloo one).
        every: A fixed cadence in optimizer steps; None: chosen from the step time.
    """

    def __init__(self, group: Any, every: int | None) -> None:
        self.group = group
        self.fixed = every
        self.every = every or 1
        self.next_check = 1
        # Two buffers, used in turn: one may be in an all-reduce still in flight. Each holds
        # [wants to stop (0 or 1), minus the proposed cadence], all-reduced with MAX: any
        # process's request, and the smallest proposal.
        self.buffers = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
        self._next_buffer = 0
        self.in_flight: tuple[Any, torch.Tensor] | None = None
        self._last_step, self._last_time = 0, time.perf_counter()

    @property
    def delay_steps(self) -> int:
        """The most optimizer steps after the one where a stop is requested until every process stops.

        A request waits for the next check point (up to ``every - 1`` steps),
        whose exchange is read at the one after (``every`` steps, or up to
        twice as many when the cadence grows there).
        """
        return 2 * self.every - 1 if self.fixed else 3 * self.every - 1

    def count_at_check(self, state: State) -> int:
        """At a check point: read the exchange started at the previous one; start the next one.

        Returns the number of ranks (0 or 1: any) that wanted to stop at the previous check point.
        """
        wanting, proposed = self.finish()
        if proposed:  # agreed by every process: the same cadence everywhere from here on
            self.every = proposed
        buffer = self.buffers[self._next_buffer]
        self._next_buffer ^= 1
        buffer.copy_(torch.tensor((int(state.stop_requested), -self._proposal(state.global_step))))
        self.in_flight = (
            dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
            buffer,
        )
        self.next_check = state.global_step + self.every
        return wanting

    def count_now(self, state: State) -> int:
        """Whether any rank wants to stop now (a blocking all-reduce, once any in flight ended)."""
        self.finish()
        buffer = self.buffers[0]
        buffer.copy_(torch.tensor((int(state.stop_requested), -self.every)))
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group)
        self._last_step, self._last_time = state.global_step, time.perf_counter()
        self.next_check = state.global_step + self.every
        return int(buffer[0])  # a CPU tensor: no device sync

    def finish(self) -> tuple[int, int]:
        """Wait for the exchange in flight, if any (started a check point ago: done by now).

        Returns whether any rank wanted to stop (0 or 1) and the agreed cadence (0 with nothing in flight).
        """
        if self.in_flight is None:
            return 0, 0
        work, buffer = self.in_flight
        self.in_flight = None
        work.wait()
        wanting, minus_every = buffer.tolist()
        return wanting, -minus_every

    def _proposal(self, global_step: int) -> int:
        """This process's cadence for the interval after next: steps that take about CHECK_SECONDS."""
        if self.fixed:
            return self.fixed
        now = time.perf_counter()
        steps, seconds = global_step - self._last_step, now - self._last_time
        self._last_step, self._last_time = global_step, now
        if steps <= 0 or seconds <= 0:
            return self.every
        # At most doubling per check point: delay_steps bounds the interval after next from this one.
        return max(1, min(round(CHECK_SECONDS * steps / seconds), 2 * self.every, MAX_CHECK_STEPS))
