"""Built-in plugin ``signals``: Ctrl-C and preemption end a fit cleanly.

While :meth:`~dltrain.Trainer.fit` runs in the main thread, this plugin
handles SIGINT and SIGTERM; the handlers that were there before come back
when ``fit`` returns or raises. Importing dltrain, building a Trainer, and
``validate``/``test``/``predict`` install nothing.

* **SIGINT** (Ctrl-C, a notebook's "interrupt kernel"), the first one: the
  current step finishes, the run stops at that step boundary (a stop inside an
  epoch skips its validation), ``on_fit_end`` runs (the ``checkpoint`` plugin
  saves, loggers flush), then ``on_teardown``, and ``fit`` raises
  ``KeyboardInterrupt``. Never ``sys.exit``: a notebook kernel survives.
* **A second SIGINT** raises ``KeyboardInterrupt`` at once, wherever the run
  is (teardown hooks still run; nothing more is saved).
* **SIGTERM** (a cluster scheduler preempting the job): the same clean stop
  and save, then ``fit`` raises ``SystemExit(143)``, so the process exits with
  status 143 (128 + 15, what schedulers expect after SIGTERM).
  ``fit(..., resume="last")`` continues from the saved step.

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

__all__ = ["DistributedSignalsPlugin", "SignalsPlugin", "make_plugin"]

#: The signals handled during fit.
HANDLED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

#: Exit status after SIGTERM: 128 + the signal number, as a shell reports it.
SIGTERM_EXIT_STATUS = 128 + int(signal.SIGTERM)

_Handler = Callable[[int, FrameType | None], Any] | int | None


def _say(text: str) -> None:
    """Write a line to file descriptor 2 directly.

    Safe inside a signal handler: ``sys.stderr`` may be in the middle of a
    write when the signal arrives, and re-entering it raises RuntimeError.
    """
    with contextlib.suppress(OSError):  # stderr closed: nothing to tell
        os.write(2, (text + "\n").encode("utf-8", "replace"))


class SignalsPlugin:
    """Turns SIGINT and SIGTERM during fit into a clean stop (see the module docs).

    Attributes:
        received: The signal that stopped (or will stop) the current fit,
            or None. SIGTERM takes precedence over SIGINT.
    """

    name = "signals"

    #: Whether the handler itself requests the stop (one process) or leaves it to hooks.
    _direct = True

    def __init__(self, checkpointing: bool = False) -> None:
        self._checkpointing = checkpointing
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
        if first or sig is signal.SIGTERM:
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
        for sig in HANDLED:
            try:
                previous = signal.getsignal(sig)
                # None: set outside Python, so it could not be put back. SIG_IGN: ignored on
                # purpose (a shell starts background jobs ignoring SIGINT); keep it that way.
                if previous is None or previous == signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main interpreter, or not supported here
                continue
            self._previous[sig] = previous

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Install the handlers, keeping the previous ones."""
        self._restore()  # a previous fit that never reached teardown
        self.received, self._sigints = None, 0
        self._trainer, self._state = trainer, state
        self._install()

    @hookimpl(wrapper=True, tryfirst=True)
    def on_fit_end(self, trainer: Trainer, state: State) -> Generator[None, None, None]:
        """After every other ``on_fit_end`` (the final checkpoint included): raise for a signal.

        Raises:
            KeyboardInterrupt: the run stopped for SIGINT.
            SystemExit: with code 143, the run stopped for SIGTERM.
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
        if received is signal.SIGTERM:
            if state.is_global_zero:
                _say(
                    f"dltrain: stopped by SIGTERM at {where}; {resume}; "
                    f"exiting with status {SIGTERM_EXIT_STATUS}"
                )
            raise SystemExit(SIGTERM_EXIT_STATUS)
        raise KeyboardInterrupt(f"dltrain: fit stopped by SIGINT at {where}; {resume}")

    def _final_signal(self, state: State) -> signal.Signals | None:
        """The signal to act on once the fit ended: the one this process received."""
        return self.received

    @hookimpl(tryfirst=True)
    def on_teardown(self) -> None:
        """Put the previous handlers back (first, so the rest of teardown behaves as usual)."""
        self._restore()
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
    also waits for rank 0's final checkpoint): when any received SIGTERM, all
    exit with status 143; else when any received SIGINT, all raise
    ``KeyboardInterrupt``. So no process leaves while rank 0 is still saving.
    """

    _direct = False

    def _final_signal(self, state: State) -> signal.Signals | None:
        """The strongest signal any process received (SIGTERM over SIGINT), agreed by all."""
        dist = torch.distributed
        if state.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        on_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        code = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = int(code.item())  # once per fit
        return signal.Signals(agreed) if agreed else None

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
        return DistributedSignalsPlugin(checkpointing)
    return SignalsPlugin(checkpointing)
