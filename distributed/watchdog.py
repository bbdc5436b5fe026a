"""The stall watchdog: a collective that some rank never reaches ends the job with a report.

A rank that is stopped (SIGSTOP), deadlocked, lost with its node, or just
sleeping leaves every other rank blocked in the next collective, forever and
silently. Horovod's stall check (``HOROVOD_STALL_CHECK_TIME_SECONDS``) is the
model: its coordinator notices tensors "submitted to be reduced ... by a subset
of ranks" and names the missing ranks. mnn has no coordinator, so every rank
watches itself:

1. The main thread marks where it is, at the cost of a tuple and one
   attribute write (no clock is read): :meth:`StallWatchdog.progress` once
   per step, and :meth:`StallWatchdog.waiting` around each blocking wait (or
   all of them at once: every blocking call through
   :attr:`StallWatchdog.watched_comm` is one).
2. A daemon thread per rank wakes every second or so. When its own rank has
   been inside one wait for longer than ``timeout_s``, it asks every other
   rank's thread where that rank is, point to point on a duplicate of the
   communicator (so nothing it sends can match the training's collectives),
   and answers the same question from others in the same loop. A rank whose
   main thread computes, sleeps or waits still answers; only a stopped or lost
   process cannot.
3. Work that rank 0 does alone while the others wait for it on purpose
   (:func:`~mnn.distributed.comm.run_on_root`: building the dataset cache,
   writing a checkpoint) is no stall: :meth:`StallWatchdog.rank0_alone` marks
   it, rank 0 answers that it works alone, and the asking rank asks again a
   timeout later. Rank 0 stopped or lost in that phase does not answer, and is
   reported as in any other wait. (Below ``MPI_THREAD_MULTIPLE``, where nobody
   can ask, the others' wait in such a phase is not timed at all.)
4. After a short grace for the answers, the asking rank writes one report
   to stderr, unless a lower rank answered that it waits too (that one
   reports when its own wait is long enough), such as::

       mnn: stall: ranks 0, 2 have waited 61 s in the gradient all-reduce of step 37;
       rank 1 has not arrived (at step 37, busy for 65 s outside any collective);
       rank 3 did not answer (stopped or lost); aborting all 4 ranks (stall timeout 60 s)

   When the ranks run on more than one host, each group names its hosts
   (``rank 3 on node2 did not answer``): a rank that is lost with its host
   is found by the host's name, which the ranks tell each other at the start.

   and aborts the job (``MPI_Abort``, exit status 1).

The thread calls MPI while the main thread is inside a collective, which MPI
allows only at ``MPI_THREAD_MULTIPLE`` (mpi4py's default). At a lower thread
level the thread makes no MPI call: a rank that waited too long writes what it
knows about itself and ends its own process, which makes the launcher end the
job. On one process, or with ``timeout_s`` None or 0, there is no thread at all.

Usage (on every rank; starting is collective, stopping is not)::

    with StallWatchdog(comm, timeout_s=300) as watchdog:
        comm = watchdog.watched_comm          # every blocking collective is watched
        for step, batch in enumerate(batches):
            watchdog.progress(step)
            ...
            with watchdog.waiting("gradient all-reduce"):
                dp.synchronize()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mnn.checks import check_float
from mnn.distributed.comm import Communicator, MPICommunicator, Request, get_communicator

__all__ = ["StallWatchdog", "RankStatus", "stall_report", "DEFAULT_STALL_TIMEOUT_S"]

#: Seconds one wait may last before the job is taken to be stalled.
DEFAULT_STALL_TIMEOUT_S = 300.0
_EXIT_STATUS = 1
# How often the thread looks at its rank and answers questions: at most every
# second (an answer never takes much longer), and often enough for short timeouts.
_CHECK_EVERY_MAX_S = 1.0
# How long the asking rank waits for answers: long enough for a thread that
# sleeps between checks and shares the GIL with a busy main thread, short next
# to the timeout.
_GRACE_MAX_S = 5.0
_POLL_S = 0.02  # between tests for answers, only while asking
_CLOSE_S = 1.0  # at most this long for the last answers to leave, on stop
_ABORT_GRACE_S = 0.2  # for the report to pass the launcher's pipes (see MPICommunicator.abort)
_ASK, _ANSWER = 1, 2  # message tags on the watchdog's own communicator
# An answer is JSON of at most 80 characters of name (12 bytes each when escaped) and a few numbers.
_WHAT_MAX_CHARS = 80
_ANSWER_BYTES = 2048


@dataclass(frozen=True)
class RankStatus:
    """Where a rank's main thread is: inside the wait ``what`` (None: outside any
    collective) at ``step`` (None: not told), and for how many seconds (``for_s``);
    ``alone``: working alone while the others wait for it on purpose."""

    what: str | None
    step: int | None
    for_s: float
    alone: bool = False

    @property
    def waiting(self) -> bool:
        return self.what is not None


class _EndWait:
    """What :meth:`StallWatchdog.waiting` returns: its exit ends the wait."""

    __slots__ = ("_watchdog",)

    def __init__(self, watchdog: StallWatchdog | None):
        self._watchdog = watchdog

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        watchdog = self._watchdog
        if watchdog is not None:  # None: a nested wait, which the outer one ends
            watchdog._state = (None, watchdog._state[1])


_NESTED = _EndWait(None)


class StallWatchdog:
    """Abort the job, with a report, when a wait on this rank lasts longer than ``timeout_s``.

    ``comm``: the job's communicator (anything :func:`get_communicator` takes).
    ``timeout_s``: seconds, or None or 0 for no watchdog. The report goes to
    stderr.

    Use it as a context manager around training on every rank: entering starts
    the thread (collective: it duplicates the communicator), leaving stops it
    (not collective: ranks may leave at different moments). Without MPI, on one
    rank or without a timeout it starts nothing, and the marks cost the same.
    A watchdog still running at interpreter exit is stopped before MPI is
    finalized.

    The main thread writes one value, ``(what, step)``, a new tuple at every
    mark, and reads no clock: the watchdog's thread times a state from the
    moment it first sees that tuple, so a wait may be reported up to
    ``check_every_s`` shorter than it was.
    """

    def __init__(self, comm: Any = None, timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S):
        self.comm: Communicator = get_communicator(comm)
        if timeout_s is not None:
            timeout_s = check_float("stall timeout", timeout_s)
            if timeout_s < 0:
                raise ValueError(f"stall timeout: expected seconds >= 0 (0: no watchdog), got {timeout_s}")
        self.timeout_s = timeout_s or None
        self.enabled = self.timeout_s is not None and self.comm.size > 1
        self.check_every_s = min(_CHECK_EVERY_MAX_S, self.timeout_s / 4) if self.timeout_s else 0.0
        self.grace_s = min(_GRACE_MAX_S, max(2 * self.check_every_s, (self.timeout_s or 0.0) / 10))
        self._state: tuple[str | None, int | None] = (None, None)  # written by the main thread only
        self._rank0_alone = False  # inside rank0_alone(); written by the main thread only
        self._seen = (self._state, monotonic())  # the state last seen, and since when
        self._end_wait = _EndWait(self)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hosts: list[str] | None = None  # of every rank, gathered at the start
        self.watched_comm: Communicator = _WatchedCommunicator(self.comm, self) if self.enabled else self.comm
        """The communicator to train with: each blocking call on it is a wait the
        watchdog watches ("all-reduce", "barrier", ...). ``comm`` itself when disabled."""

    # -- the marks (main thread; each a tuple and one attribute write) ---------------

    def progress(self, step: int) -> None:
        """Say that this rank now works on ``step``, outside any wait (call it between waits)."""
        self._state = (None, step)

    def waiting(self, what: str, step: int | None = None) -> _EndWait:
        """Mark a blocking wait: ``with watchdog.waiting("gradient all-reduce"): ...``.

        ``what`` names it in the report, ``step`` defaults to the last
        :meth:`progress`. Inside another wait nothing changes: the outer one
        keeps its name and its start (so a named wait around calls on
        :attr:`watched_comm` reports the name).
        """
        state = self._state
        if state[0] is not None:
            return _NESTED
        self._state = (what, state[1] if step is None else step)
        return self._end_wait

    @contextlib.contextmanager
    def rank0_alone(self) -> Iterator[None]:
        """Mark a phase in which rank 0 works alone and the others wait for it on purpose
        (every rank enters it: :func:`~mnn.distributed.comm.run_on_root` does, through
        :attr:`watched_comm`). While rank 0 works outside any collective, the others'
        wait is not a stall; rank 0's own waits count as always."""
        outer, self._rank0_alone = self._rank0_alone, True
        try:
            yield
        finally:
            self._rank0_alone = outer

    def status(self) -> RankStatus:
        """Where this rank's main thread is, and for how long the watchdog has seen it there."""
        state = self._state
        seen, since = self._seen
        now = monotonic()
        if state is not seen:
            since = now
            self._seen = (state, now)
        alone = self._rank0_alone and self.comm.rank == 0 and state[0] is None
        return RankStatus(state[0], state[1], now - since, alone)

    # -- starting and stopping --------------------------------------------------------

    def __enter__(self) -> StallWatchdog:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the thread (collective when enabled: every rank calls it); idempotent."""
        if not self.enabled or self._thread is not None:
            return
        # Now, while every rank answers: a lost rank cannot say where it was.
        if isinstance(self.comm, MPICommunicator):
            self._hosts = self.comm.allgather(socket.gethostname())
        mpi_comm, reason = _side_channel_comm(self.comm)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(mpi_comm, reason),
                                         name=f"mnn-stall-watchdog-{self.comm.rank}", daemon=True)
        self._thread.start()
        # Python's exit handlers run before mpi4py finalizes MPI: none of the
        # thread's MPI calls may come after that.
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the thread and finish its messages; local (no collective), idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        atexit.unregister(self.stop)

    # -- the thread ---------------------------------------------------------------------

    def _run(self, mpi_comm: Any, reason: str) -> None:
        if mpi_comm is not None:
            try:
                self._watch_with_others(_SideChannel(mpi_comm))
                return
            except Exception as error:  # an MPI error, such as a lost peer: watch on without asking
                reason = f"asking failed: {type(error).__name__}: {error}"
        self._watch_alone(reason)

    def _stalled(self) -> bool:
        status = self.status()
        return status.waiting and status.for_s > self.timeout_s

    def _waits_for_rank0_alone(self) -> bool:
        """Whether this rank waits in a phase where rank 0 works alone (not timed when
        nobody can ask rank 0 whether it does)."""
        return self._rank0_alone and self.comm.rank != 0

    def _watch_alone(self, reason: str) -> None:
        """Without MPI in this thread (MPI does not allow it here, or it failed):
        report this rank's own stall and end the process."""
        while not self._stop.wait(self.check_every_s):
            if self._stalled() and not self._waits_for_rank0_alone():
                self._write(stall_report({self.comm.rank: self.status()}, self.timeout_s, self.comm.size,
                                         not_asked_because=reason, hosts=self._hosts))
                time.sleep(_ABORT_GRACE_S)
                os._exit(_EXIT_STATUS)  # the launcher then ends the other ranks

    def _watch_with_others(self, channel: _SideChannel) -> None:
        try:
            ask_after = 0.0  # when this rank may ask again after leaving the report to a lower rank
            while not self._stop.wait(self.check_every_s):
                channel.answer(self.status)
                state = self._state
                if not self._stalled() or monotonic() < ask_after:
                    continue
                statuses = channel.ask_everyone(self.status, self.grace_s, self._stop)
                if statuses is None or self._state is not state:
                    continue  # stopping, or the wait ended meanwhile
                if any(status is not None and status.alone for status in statuses.values()):
                    # Rank 0 works alone on purpose (run_on_root) and answers: no stall; look again later.
                    ask_after = monotonic() + self.timeout_s
                    continue
                lower = [status for rank, status in statuses.items()
                         if rank < self.comm.rank and status is not None and status.waiting]
                if lower:
                    # A lower rank waits too and reports when its own wait is long enough.
                    ask_after = monotonic() + max(self.timeout_s - lower[0].for_s, 0.0) \
                        + 2 * self.grace_s + self.check_every_s
                    continue
                self._write(stall_report(statuses, self.timeout_s, self.comm.size, hosts=self._hosts))
                self.comm.abort(_EXIT_STATUS)
        finally:
            channel.close()

    @staticmethod
    def _write(report: str) -> None:
        print(report, file=sys.stderr, flush=True)


def _side_channel_comm(comm: Communicator) -> tuple[Any, str]:
    """(a duplicate of ``comm``'s MPI communicator, "") when the watchdog's thread may
    talk over it, else (None, why not)."""
    if not isinstance(comm, MPICommunicator):
        return None, f"{type(comm).__name__} is not an MPI communicator"
    from mpi4py import MPI

    level = MPI.Query_thread()
    if level < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
                 MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
        return None, f"MPI runs at {names.get(level, level)}, not MPI_THREAD_MULTIPLE"
    return comm.comm.Dup(), ""


class _SideChannel:
    """The watchdog thread's point-to-point messages on its own communicator.

    An ask (tag ``_ASK``) carries a round number; the answer (tag ``_ANSWER``)
    carries the round and the answering rank's :class:`RankStatus` as JSON, so
    a late answer to an earlier round is recognised and dropped. One receive
    for each tag is always posted, from any source; sends are non-blocking and
    kept until complete.
    """

    def __init__(self, mpi_comm: Any):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        # Round numbers unique to this channel: a communicator freed here may be
        # reused by the next watchdog's, and a late answer must not pass for a new one.
        self._round = int.from_bytes(os.urandom(5), "little") << 16
        self._ask_buffer = np.zeros(1, dtype=np.int64)
        self._answer_buffer = bytearray(_ANSWER_BYTES)
        self._asks = mpi_comm.Irecv(self._ask_buffer, source=MPI.ANY_SOURCE, tag=_ASK)
        self._answers = mpi_comm.Irecv(self._answer_buffer, source=MPI.ANY_SOURCE, tag=_ANSWER)
        self._sends: list[tuple[Any, Any]] = []  # (request, buffer): the buffer lives until sent

    def answer(self, status: Any) -> None:
        """Answer every ask that has arrived with ``status()``, this rank's status now."""
        mpi_status = self._MPI.Status()
        while self._asks.Test(mpi_status):
            asker, round_id = mpi_status.Get_source(), int(self._ask_buffer[0])
            self._asks = self.comm.Irecv(self._ask_buffer, source=self._MPI.ANY_SOURCE, tag=_ASK)
            now = status()
            what = None if now.what is None else str(now.what)[:_WHAT_MAX_CHARS]
            step = None if now.step is None else int(now.step)
            text = json.dumps({"round": round_id, "what": what, "step": step, "for_s": now.for_s,
                               "alone": now.alone})
            self._send(bytearray(text.encode()), asker, _ANSWER)
        self._sends = [(request, buffer) for request, buffer in self._sends if not request.Test()]

    def ask_everyone(self, status: Any, grace_s: float, stop: threading.Event) -> dict[int, RankStatus | None] | None:
        """Every rank's status (None for a rank that did not answer within ``grace_s``),
        this rank's own included; None when ``stop`` was set meanwhile."""
        self._round += 1
        question = np.array([self._round], dtype=np.int64)
        for rank in range(self.size):
            if rank != self.rank:
                self._send(question, rank, _ASK)
        answers: dict[int, tuple[RankStatus, float]] = {}  # rank: (its status, when it came)
        deadline = monotonic() + grace_s
        mpi_status = self._MPI.Status()
        while len(answers) < self.size - 1 and monotonic() < deadline:
            if stop.wait(_POLL_S):
                return None
            self.answer(status)  # another rank may be asking at the same moment
            while self._answers.Test(mpi_status):
                rank, count = mpi_status.Get_source(), mpi_status.Get_count(self._MPI.BYTE)
                reply = json.loads(bytes(self._answer_buffer[:count]))
                self._answers = self.comm.Irecv(self._answer_buffer, source=self._MPI.ANY_SOURCE, tag=_ANSWER)
                if reply["round"] == self._round:
                    answers[rank] = (RankStatus(reply["what"], reply["step"], reply["for_s"], reply["alone"]),
                                     monotonic())
        # Every rank's time as of now, as if it had answered now and not moved since.
        now = monotonic()
        statuses: dict[int, RankStatus | None] = {rank: None for rank in range(self.size)}
        for rank, (got, came) in answers.items():
            statuses[rank] = RankStatus(got.what, got.step, got.for_s + now - came, got.alone)
        statuses[self.rank] = status()
        return statuses

    def _send(self, buffer: Any, rank: int, tag: int) -> None:
        self._sends.append((self.comm.Isend(buffer, dest=rank, tag=tag), buffer))

    def close(self) -> None:
        """Withdraw the posted receives and let the last sends leave, so that
        MPI_Finalize finds nothing of ours pending."""
        for request in (self._asks, self._answers):
            request.Cancel()
            request.Wait()
        deadline = monotonic() + _CLOSE_S
        while self._sends and monotonic() < deadline:
            self._sends = [(request, buffer) for request, buffer in self._sends if not request.Test()]
            if self._sends:
                time.sleep(_POLL_S)
        # Messages this small leave at once (eager protocol) unless MPI is failing;
        # freeing lets one still in flight complete on its own.
        for request, _ in self._sends:
            request.Free()
        self._sends = []
        # Freeing is local in MPICH and Open MPI (the standard calls it collective, but
        # nothing waits): ranks stop their watchdogs at different moments.
        self.comm.Free()


class _WatchedCommunicator(Communicator):
    """``comm`` with each blocking call marked as a wait on ``watchdog``."""

    def __init__(self, comm: Communicator, watchdog: StallWatchdog):
        self._comm = comm
        self._watchdog = watchdog
        self.rank = comm.rank
        self.size = comm.size

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        with self._watchdog.waiting("all-reduce"):
            return self._comm.allreduce(array, op)

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> Request:
        return _WatchedRequest(self._comm.iallreduce(array, op), self._watchdog)

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        with self._watchdog.waiting("broadcast"):
            return self._comm.broadcast(array, root)

    def barrier(self) -> None:
        with self._watchdog.waiting("barrier"):
            self._comm.barrier()

    def allgather(self, value: Any) -> list[Any]:
        with self._watchdog.waiting("all-gather"):
            return self._comm.allgather(value)

    def duplicate(self) -> Communicator:
        with self._watchdog.waiting("duplicate"):
            return _WatchedCommunicator(self._comm.duplicate(), self._watchdog)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        with self._watchdog.waiting("broadcast"):
            return self._comm.broadcast_object(value, root)

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        with self._watchdog.waiting("gather"):
            return self._comm.gather(value, root)

    def sendrecv(self, send: np.ndarray, dest: int, receive: np.ndarray, source: int) -> np.ndarray:
        with self._watchdog.waiting("send-receive"):
            return self._comm.sendrecv(send, dest, receive, source)

    def abort(self, code: int = 1) -> None:
        self._comm.abort(code)

    def rank0_alone(self) -> contextlib.AbstractContextManager[None]:
        return self._watchdog.rank0_alone()


class _WatchedRequest(Request):
    """A non-blocking collective's request whose ``wait`` is marked as a wait.

    It holds the communicator's own request rather than a copy of its state,
    so Request.__init__ is not called: every method is answered by that request.
    """

    def __init__(self, request: Request, watchdog: StallWatchdog):
        self._request = request
        self._watchdog = watchdog

    def test(self) -> bool:
        return self._request.test()

    def wait(self) -> None:
        with self._watchdog.waiting("all-reduce"):
            self._request.wait()


# ------------------------------------------------------------------ the report
def stall_report(statuses: Mapping[int, RankStatus | None], timeout_s: float, world_size: int,
                 not_asked_because: str = "", hosts: Sequence[str] | None = None) -> str:
    """The one line that says who waits where and who has not arrived.

    ``statuses`` maps ranks to their :class:`RankStatus`, or None for a rank
    that did not answer; ranks of ``range(world_size)`` that are missing were
    not asked (``not_asked_because`` says why). Ranks alike are told together,
    waiting ones first. ``hosts``: the host of each rank; named when there are
    several (``rank 3 on node2``).
    """
    where = _host_namer(hosts)
    waiting: dict[tuple[str, int | None], list[int]] = {}
    busy: dict[int | None, list[int]] = {}
    silent = []
    for rank in sorted(statuses):
        status = statuses[rank]
        if status is None:
            silent.append(rank)
        elif status.waiting:
            waiting.setdefault((status.what, status.step), []).append(rank)
        else:
            busy.setdefault(status.step, []).append(rank)
    parts = []
    for (what, step), ranks in waiting.items():
        seconds = _seconds([statuses[rank].for_s for rank in ranks])
        parts.append(f"{where(ranks)} {_verb(ranks, 'has', 'have')} waited {seconds} in the {what}{_of_step(step)}")
    for step, ranks in busy.items():
        seconds = _seconds([statuses[rank].for_s for rank in ranks])
        at = "" if step is None else f"at step {step}, "
        parts.append(f"{where(ranks)} {_verb(ranks, 'has', 'have')} not arrived "
                     f"({at}busy for {seconds} outside any collective)")
    if silent:
        parts.append(f"{where(silent)} did not answer (stopped or lost)")
    not_asked = [rank for rank in range(world_size) if rank not in statuses]
    if not_asked:
        parts.append(f"{where(not_asked)} {_verb(not_asked, 'was', 'were')} not asked"
                     + (f" ({not_asked_because})" if not_asked_because else ""))
    if len(waiting) == 1 and not busy and not silent and len(statuses) == world_size:
        parts.append("every rank is inside it, so the communication itself does not progress")
    return (f"mnn: stall: {'; '.join(parts)}; aborting all {world_size} ranks "
            f"(stall timeout {_format_s(timeout_s)})")


def _host_namer(hosts: Sequence[str] | None) -> Callable[[list[int]], str]:
    """``ranks 0, 2`` or, with ranks on several hosts, ``ranks 0, 2 on node1, node3``."""
    if not hosts or len(set(hosts)) < 2:
        return _ranks

    def named(ranks: list[int]) -> str:
        names = dict.fromkeys(hosts[rank] for rank in ranks if rank < len(hosts))
        return f"{_ranks(ranks)} on {', '.join(names)}" if names else _ranks(ranks)

    return named


def _verb(ranks: list[int], one: str, several: str) -> str:
    return one if len(ranks) == 1 else several


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 0, 2`` or, for runs of three or more, ``ranks 0-5, 7``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    words = []
    for run in runs:
        words.extend([f"{run[0]}-{run[-1]}"] if len(run) > 2 else map(str, run))
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(words)}"


def _of_step(step: int | None) -> str:
    return "" if step is None else f" of step {step}"


def _seconds(values: list[float]) -> str:
    """``61 s``, or ``61-65 s`` when the ranks' times differ."""
    low, high = _format_s(min(values), unit=False), _format_s(max(values), unit=False)
    return f"{low} s" if low == high else f"{low}-{high} s"


def _format_s(seconds: float, unit: bool = True) -> str:
    text = f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"
    return f"{text} s" if unit else text
