"""Built-in plugin ``signals``: Ctrl-C and preemption end a fit cleanly.

While :meth:`~dltrain.Trainer.fit` runs in the main thread, this plugin
handles SIGINT and the preemption signals (SIGTERM unless configured otherwise);
the handlers that were there before come back
when ``fit`` returns or raises. Importing dltrain, building a Trainer, and
``validate``/``test``/``predict`` install nothing.

* **SIGINT** (Ctrl-C, a notebook's "interrupt kernel"), the first one: the
  current step finishes, the run stops at that step boundary (a stop inside an
  epoch skips its validation), ``on_fit_end`` runs (the ``checkpoint`` plugin
  saves, loggers flush), then ``on_teardown``, and ``fit`` raises
  ``KeyboardInterrupt``. Never ``sys.exit``: a notebook kernel survives.
* **A second SIGINT** raises ``KeyboardInterrupt`` at once, wherever the run
  is (teardown hooks still run; nothing more is saved).
* **SIGTERM** (a cluster scheduler preempting the job), and every other
  signal of ``TrainerConfig.preemption_signals`` (``("SIGTERM",)`` by default;
  add ``"SIGUSR1"`` for SLURM's ``--signal=USR1@90``): the same clean stop and
  save, then ``fit`` raises ``SystemExit(128 + N)`` for signal number N, so the
  process exits with the status a shell reports for a process that signal
  killed: 143 after SIGTERM (128 + 15), 138 after SIGUSR1 on Linux. Schedulers
  and scripts that tell a preempted job by its status see what they expect.
  ``fit(..., resume="auto")`` continues from the saved step.
* **The same signal again** (a scheduler and ``torchrun`` may each send it,
  or a job is cancelled twice) changes nothing while fit runs, and after
  the final save it cannot turn the exit into a death by signal: when the
  handler found at fit start was the default one, fit leaves a handler that
  ignores a repeat (it says so on stderr), and at interpreter exit the signal
  is ignored outright. A program that catches this ``SystemExit`` and goes on
  should put its own handler back (``signal.signal(signal.SIGTERM, signal.SIG_DFL)``).

A signal ignored when fit starts (``SIG_IGN``, as a shell sets SIGINT for
background jobs) stays ignored. A handler of your own is replaced during fit
and put back after; keep it with ``disable_plugins=["signals"]``.

The handlers only record the signal and ask the loop to stop
(:meth:`~dltrain.Trainer.request_stop` sets a flag the loop reads between
steps); nothing is saved or printed through Python's buffered streams
inside a handler.

Order: the exception is raised from an ``on_fit_end`` *wrapper* marked
``tryfirst``. Pluggy runs every plain implementation, and the tail of every
wrapper not marked ``tryfirst`` (the ``checkpoint`` plugin's save is one),
inside it; this plugin is registered last of the built-ins, so among their
``tryfirst`` wrappers it is the outermost too. The raise comes after all of them.

Distributed training: every process must leave the loop at the same step,
or the next collective hangs, and a signal handler may not communicate. So
under ``torchrun`` (or with a process group initialized before the Trainer
is built) the factory makes :class:`DistributedSignalsPlugin`: its handlers
only record the signal, its hooks request the stop in the main line of the
loop, and the ``distributed`` plugin agrees on that request across processes.
When the fit ends, the processes also agree on the signal to act on, after
rank 0's final save, so none leaves while rank 0 is still writing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from dltrain._markers import hookimpl

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["DistributedSignalsPlugin", "SignalsPlugin", "exit_status", "make_plugin"]

#: The signals handled during fit by default: Ctrl-C and the default preemption signal.
HANDLED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

#: Exit status after SIGTERM: 128 + the signal number, as a shell reports it.
SIGTERM_EXIT_STATUS = 128 + int(signal.SIGTERM)


def exit_status(sig: signal.Signals) -> int:
    """The exit status after a stop for preemption signal ``sig``: 128 + its number, as a shell
    reports a process that the signal killed (143 for SIGTERM)."""
    return 128 + int(sig)


def _already_exiting(signum: int, frame: FrameType | None) -> None:
    """Left installed after a stop for a preemption signal, when the handler before fit was the
    default: the process is exiting with 128 + N already, and a repeat of the signal must not
    turn that exit into a death by signal."""
    name = signal.Signals(signum).name
    _say(f"dltrain: {name} received again after the final checkpoint: ignored, the process is exiting")


def _ignore_at_exit(signums: tuple[int, ...]) -> None:
    """At interpreter exit: ignore those signals outright. Python resets its handlers to the
    default late in its shutdown, where a repeat would still kill the process."""
    for signum in signums:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is _already_exiting:
                signal.signal(signum, signal.SIG_IGN)


_Handler = Callable[[int, FrameType | None], Any] | int | None


def _say(text: str) -> None:
    """Write a line to file descriptor 2 directly.

    Safe inside a signal handler: ``sys.stderr`` may be in the middle of a
    write when the signal arrives, and re-entering it raises RuntimeError.
    """
    with contextlib.suppress(OSError):  # stderr closed: nothing to tell
        os.write(2, (text + "\n").encode("utf-8", "replace"))


class SignalsPlugin:
    """Turns SIGINT and the preemption signals during fit into a clean stop (see the module docs).

    Args:
        checkpointing: Whether a checkpoint is saved at the stop (only changes what is said).
        preemption_signals: The signals handled like SIGTERM, by name.

    Attributes:
        received: The signal that stopped (or will stop) the current fit,
            or None. A preemption signal takes precedence over SIGINT.
    """

    name = "signals"

    #: Whether the handler itself requests the stop (one process) or leaves it to hooks.
    _direct = True

    def __init__(
        self, checkpointing: bool = False, preemption_signals: tuple[str, ...] = ("SIGTERM",)
    ) -> None:
        self._checkpointing = checkpointing
        self._preemption = tuple(signal.Signals[name] for name in preemption_signals)
        self._exiting = False  # on_fit_end raised SystemExit for a preemption signal
        self.received: signal.Signals | None = None
        self._sigints = 0
        self._previous: dict[signal.Signals, _Handler] = {}
        self._trainer: Trainer | None = None
        self._state: State | None = None

    # -- the handler ---------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The handler: record the signal and ask for a stop; a second SIGINT aborts."""
        sig = signal.Signals(signum)
        if sig is signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt("second SIGINT: aborted at once, without a final save")
        first = self.received is None
        if first or sig is not signal.SIGINT:
            self.received = sig
        state = self._state
        loud = first and (state is None or state.is_global_zero)
        if loud:
            then = "press Ctrl-C again to abort at once" if sig is signal.SIGINT else "then exiting"
            save = " and saving a checkpoint" if self._checkpointing else ""
            _say(f"dltrain: {sig.name} received: stopping after the current step{save}; {then}")
        self._request_stop(sig)

    def _request_stop(self, sig: signal.Signals) -> None:
        """Ask the loop to stop at its next step boundary: ``request_stop`` only sets two fields."""
        if self._direct and self._trainer is not None:
            self._trainer.request_stop(f"{sig.name} received")

    # -- install and restore ----------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; leave Python's behaviour
        for sig in dict.fromkeys((signal.SIGINT, *self._preemption)):
            try:
                previous = signal.getsignal(sig)
                if previous is _already_exiting:  # left by an earlier fit's preemption stop
                    previous = signal.SIG_DFL
                # None: set outside Python, so it could not be put back. SIG_IGN: ignored on
                # purpose (a shell starts background jobs ignoring SIGINT); keep it that way.
                if previous is None or previous == signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main interpreter, or not supported here
                continue
            self._previous[sig] = previous

    def _restore(self, exiting: bool = False) -> None:
        """Put the previous handlers back; ``exiting`` after a preemption stop: a preemption
        signal whose previous handler was the default gets :func:`_already_exiting` instead."""
        previous, self._previous = self._previous, {}
        late: list[int] = []
        for sig, handler in previous.items():
            if exiting and sig in self._preemption and handler == signal.SIG_DFL:
                signal.signal(sig, _already_exiting)
                late.append(int(sig))
            else:
                signal.signal(sig, handler)
        if late:
            atexit.register(_ignore_at_exit, tuple(late))

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Install the handlers, keeping the previous ones."""
        self._restore()  # a previous fit that never reached teardown
        self.received, self._sigints, self._exiting = None, 0, False
        self._trainer, self._state = trainer, state
        self._install()

    @hookimpl(wrapper=True, tryfirst=True)
    def on_fit_end(self, trainer: Trainer, state: State) -> Generator[None, None, None]:
        """After every other ``on_fit_end`` (the final checkpoint included): raise for a signal.

        Raises:
            KeyboardInterrupt: the run stopped for SIGINT.
            SystemExit: with code 128 + N, the run stopped for preemption signal N
                (143 for SIGTERM).
        """
        result = yield
        received = self._final_signal(state)
        if received is None:
            return result
        where = f"epoch {state.epoch + 1}, global step {state.global_step}"
        resume = (
            "continue with fit(..., resume='last')"
            if self._checkpointing
            else "checkpointing is off, so nothing was saved"
        )
        if received is not signal.SIGINT:
            status = exit_status(received)
            if state.is_global_zero:
                _say(
                    f"dltrain: stopped by {received.name} at {where}; {resume}; exiting with status {status}"
                )
            self._exiting = True
            raise SystemExit(status)
        raise KeyboardInterrupt(f"dltrain: fit stopped by SIGINT at {where}; {resume}")

    def _final_signal(self, state: State) -> signal.Signals | None:
        """The signal to act on once the fit ended: the one this process received."""
        return self.received

    @hookimpl(tryfirst=True)
    def on_teardown(self) -> None:
        """Put the previous handlers back (first, so the rest of teardown behaves as usual); after
        a preemption stop, keep ignoring a repeat of the signal (see the module docs)."""
        exiting, self._exiting = self._exiting, False
        self._restore(exiting)
        self._trainer, self._state = None, None


class DistributedSignalsPlugin(SignalsPlugin):
    """:class:`SignalsPlugin` for a process group, where all processes must stop at the same step.

    Its handlers only record the signal; the stop is requested from hooks,
    in the main line of the loop: after each training batch and after each
    epoch's training and validation. The built-in ``distributed`` plugin then
    agrees on it across processes (its wrappers around those hooks run after
    this plugin's implementations), so every process leaves at the same step.
    A request made inside the handler could land between that agreement and
    the loop's own check, and one process would leave alone.

    When the fit ends, the processes agree once more (one all-reduce, which
    also waits for rank 0's final checkpoint): when any received a preemption
    signal, all exit with its status (143 for SIGTERM); else when any received
    SIGINT, all raise ``KeyboardInterrupt``. So no process leaves while rank 0
    is still saving.
    """

    _direct = False

    def _final_signal(self, state: State) -> signal.Signals | None:
        """The strongest signal any process received (a preemption signal over SIGINT), agreed by all."""
        dist = torch.distributed
        if state.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        on_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        # 0: none; the signal's number for SIGINT; 1000 + its number for a preemption signal.
        received = self.received
        number = 0 if received is None else int(received) + (0 if received is signal.SIGINT else 1000)
        code = torch.tensor([number], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = int(code.item())  # once per fit
        return signal.Signals(agreed % 1000) if agreed else None

    def _convert(self, trainer: Trainer) -> None:
        if self.received is not None and self._trainer is not None:  # during fit only
            trainer.request_stop(f"{self.received.name} received")

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """Request the stop for a signal received during this batch."""
        self._convert(trainer)

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        """Request the stop for a signal received at the epoch's end."""
        self._convert(trainer)

    @hookimpl
    def on_eval_epoch_end(self, trainer: Trainer) -> None:
        """Request the stop for a signal received during validation."""
        self._convert(trainer)


def make_plugin(config: TrainerConfig) -> SignalsPlugin:
    """The factory the plugin manager calls.

    A :class:`DistributedSignalsPlugin` when the ``distributed`` plugin will
    run (under ``torchrun``, or with a process group already initialized),
    else a :class:`SignalsPlugin`.
    """
    from dltrain.default_plugins.distributed import launched_by_torchrun

    checkpointing = config.checkpoint is not None
    dist = torch.distributed
    if dist.is_available() and (dist.is_initialized() or launched_by_torchrun()):
        return DistributedSignalsPlugin(checkpointing, config.preemption_signals)
    return SignalsPlugin(checkpointing, config.preemption_signals)
