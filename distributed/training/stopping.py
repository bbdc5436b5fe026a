"""Stopping on request: Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 ends training after the same step on every rank.

A signal handler runs between two Python bytecodes on whatever the main thread
is doing; raising there could leave one rank inside a collective that the
others have left. :class:`StopRequests` therefore only counts signals, and the
training loop asks all ranks after each step whether any of them was asked to
stop (:meth:`StopRequests.vote`, one 16-byte all-reduce), so they all stop
after the same step, save a checkpoint there and raise
:class:`TrainingInterrupted`. The same all-reduce carries each rank's verdict
on its step's numbers (a NaN or infinite loss or gradient), so that every rank
also agrees on stopping, or skipping the step, for those.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnn.distributed.comm import Communicator

__all__ = ["StopRequests", "TrainingInterrupted", "Vote"]


class TrainingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (Ctrl-C, SIGINT) during training; its message says
    where the run stopped and which checkpoint it can resume from.

    ``ranks_agreed`` is True when all ranks stopped together after the same step
    (see :class:`StopRequests`): none of them is left inside a collective, so
    they can leave normally. It is False after an immediate stop (a second
    signal, or a KeyboardInterrupt raised outside the training loop).
    """

    def __init__(self, message: str, ranks_agreed: bool = False):
        super().__init__(message)
        self.ranks_agreed = ranks_agreed


@dataclass(frozen=True)
class Vote:
    """What all ranks agreed on after a step: ``stop`` (a rank was asked to),
    ``nonfinite`` (a rank saw a NaN or infinite loss or gradient) and ``checkpoint``
    (a rank's clock says a checkpoint is due: rank 0's, for ``--checkpoint-every-seconds``)."""

    stop: bool
    nonfinite: bool
    checkpoint: bool = False


class StopRequests:
    """Catch SIGINT, SIGTERM, SIGHUP and SIGUSR1 while in its ``with`` block and only count them.

    SIGHUP (a closed terminal, a dropped ssh session) is a request to stop like
    the others. So is SIGUSR1: Open MPI's launcher takes SIGINT and SIGTERM as an
    order to abort (SIGKILL a quarter second later) but forwards SIGUSR1 to every
    rank as it is, so mnn-launch passes a stop on as SIGUSR1 when no rank runs on
    its own machine. A signal that comes more than ``_REPEAT_AFTER_S`` after the
    first is taken as a person insisting: the previous handlers come back and
    it raises KeyboardInterrupt at once. (One Ctrl-C may arrive twice within
    milliseconds: from the terminal and forwarded by the launcher.) A signal
    ignored when the block starts (``nohup``, a shell's background job) stays
    ignored. Blocks nest: an inner one starts from the count of the outer one
    whose handler it replaces (or of the console script's, which counted the
    signals while the program loaded), so that a signal that came before
    training started stops training at its first vote. Outside the main thread nothing
    is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    _REPEAT_AFTER_S = 1.0

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._ignoring = False
        self._votes = np.zeros(3)  # [stop requests, ranks with non-finite numbers, checkpoint due], summed

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._request)
            # The holder of the count this one replaces: an outer StopRequests, or the
            # console script's (mnn.scripts.entry.HeldSignals) while the program loaded.
            outer = getattr(next(iter(self._previous.values()), None), "__self__", None)
            if hasattr(outer, "count") and hasattr(outer, "first_at"):
                self.count, self.first_at = outer.count, outer.first_at
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the handlers back that were there before, or leave the signals ignored after
        :meth:`ignore_from_now` (collective-free, idempotent)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self._ignoring else handler)
        self._previous = {}

    def ignore_from_now(self) -> None:
        """The process has done its work and only exits: a signal from now on changes
        nothing, also after the block, so that a late one cannot turn the exit status of a
        finished run (or of a stop already agreed) into death by that signal while MPI
        finalises. For a program's entry point only: the signals stay ignored."""
        self._ignoring = True

    def vote(self, comm: Communicator, nonfinite: bool = False, checkpoint: bool = False) -> Vote:
        """Whether any rank was asked to stop, whether any rank's step had a number that is
        not finite, and whether any rank finds a checkpoint due (collective: every rank
        calls it at the same point of each step)."""
        self._votes[:] = (self.count, nonfinite, checkpoint)
        comm.allreduce(self._votes)
        return Vote(stop=bool(self._votes[0]), nonfinite=bool(self._votes[1]), checkpoint=bool(self._votes[2]))

    def _request(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        elif now - self.first_at > self._REPEAT_AFTER_S and not self._ignoring:
            previous = self._previous.get(signum)
            self.restore()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.count += 1
