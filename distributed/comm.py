"""Communicators: the one interface through which mnn talks to other ranks.

Two implementations share it:

* ``MPICommunicator`` wraps an mpi4py communicator. Array collectives use the
  buffer-based uppercase calls on contiguous NumPy arrays, in place
  (``MPI.IN_PLACE``), so nothing is pickled on the hot path.
* ``SingleProcessCommunicator`` is the world of one: every collective is a
  no-op. mnn runs with it when mpi4py is missing or ``MNN_NO_MPI=1``.

``get_communicator()`` is the one place that chooses between them.

Bad input on one rank must stop every rank without a hang. ``check_all`` and
``run_all`` turn a local verdict into a collective one (every rank raises
``RankFailure`` naming the ranks that failed), and ``stop_all_on_error`` is the
guard an entry point puts around its body: rank 0 prints a ``RankFailure`` and
all ranks exit; any other exception aborts the whole job.

Usage::

    comm = get_communicator()
    grads = np.ones(10)
    comm.allreduce(grads, op="mean")           # in place
    request = comm.iallreduce(grads)           # start, compute, then
    request.wait()
    received = np.empty_like(grads)            # point to point: pass to the right, hear from the left
    comm.sendrecv(grads, (comm.rank + 1) % comm.size, received, (comm.rank - 1) % comm.size)
    data = run_all(comm, load_dataset, path)   # raises on every rank if any failed

Run on two ranks with ``mpiexec -n 2 python your_script.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from mnn.distributed.environment import NO_MPI_ENV, START_ADDR_ENV, START_DIR_ENV, install_hint

__all__ = [
    "Communicator",
    "MPICommunicator",
    "SingleProcessCommunicator",
    "Request",
    "RankFailure",
    "get_communicator",
    "check_all",
    "run_all",
    "run_on_root",
    "stop_all_on_error",
    "launcher_rank",
]

_ABORT_GRACE_S = 0.2
# How long a rank tries to reach mnn-launch with a report of its start-up (a listening port
# answers at once, a closed one refuses at once; only a host that drops packets takes this).
_REPORT_TIMEOUT_S = 3.0
_REDUCE_OPS = ("sum", "mean")
# Variables that MPI launchers set in every process they start; used to notice
# a job started on several ranks that would fall back to one process each.
_LAUNCHER_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
# ... and the rank of each process, known before MPI is initialised.
_LAUNCHER_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

Result = TypeVar("Result")


class RankFailure(RuntimeError):
    """Raised on every rank when at least one rank reported a failure.

    ``failures`` maps each failing rank to its message, in rank order. Ranks
    that failed alike are told once: ``ranks 0, 1: <message>``. ``world_size`` is
    the number of ranks of the job (None when not known): a job of one process
    has no other rank to tell apart, so its message is told without ``rank 0:``
    before it.
    """

    def __init__(self, failures: dict[int, str], world_size: int | None = None):
        self.failures = dict(sorted(failures.items()))
        self.world_size = world_size
        if world_size == 1:
            super().__init__("; ".join(self.failures.values()))
            return
        ranks_by_message: dict[str, list[int]] = {}
        for rank, message in self.failures.items():
            ranks_by_message.setdefault(message, []).append(rank)
        lines = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
                 for message, ranks in ranks_by_message.items()]
        super().__init__("; ".join(lines) if len(lines) == 1 else "\n" + "\n".join(lines))


class Request:
    """Handle of a non-blocking collective; ``wait()`` completes it.

    ``finish`` runs once after completion (e.g. dividing a sum into a mean).
    """

    def __init__(self, mpi_request: Any = None, finish: Callable[[], None] | None = None):
        self._mpi_request = mpi_request
        self._finish = finish
        self._done = mpi_request is None
        if self._done:
            self._run_finish()

    def _run_finish(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def test(self) -> bool:
        """Return whether the collective completed; lets MPI make progress."""
        if not self._done and self._mpi_request.Test():
            self._done = True
            self._run_finish()
        return self._done

    def wait(self) -> None:
        """Block until the collective completed."""
        if not self._done:
            self._mpi_request.Wait()
            self._done = True
            self._run_finish()

    @staticmethod
    def wait_all(requests: Sequence["Request"]) -> None:
        """Complete every request, in order.

        One ``wait`` each rather than one ``MPI.Request.Waitall``: the
        reductions finish in the order they started anyway, and building the
        request array for Waitall measured slower on the hot path.
        """
        for request in requests:
            request.wait()

    @staticmethod
    def test_all(requests: Sequence["Request"]) -> bool:
        """Return whether all requests completed; lets MPI make progress."""
        return all([request.test() for request in requests])


def _check_reduce_op(op: str, array: np.ndarray) -> None:
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {_REDUCE_OPS}, got {op!r}")
    if op == "mean" and not np.issubdtype(array.dtype, np.inexact):
        raise TypeError(f"op='mean' works in place, so it needs a floating array; got dtype {array.dtype}")


def _check_buffer(array: Any, what: str) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what} needs a numpy.ndarray, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} works in place on C-contiguous arrays; got a non-contiguous array "
                         f"of shape {array.shape} (pass np.ascontiguousarray(a) and copy back)")
    if not array.flags.writeable:
        raise ValueError(f"{what} works in place; got a read-only array of shape {array.shape}")


class Communicator:
    """The interface: ``rank``, ``size`` and the collectives mnn uses.

    Every method but ``sendrecv`` (point to point) is collective: all ranks call
    it, in the same order.
    """

    rank: int
    size: int

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce ``array`` over all ranks in place ("sum" or "mean"); return it."""
        raise NotImplementedError

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> Request:
        """Start an in-place reduction of ``array``; it is valid after ``wait()``."""
        raise NotImplementedError

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite ``array`` on every rank with root's values, in place; return it."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has called it."""
        raise NotImplementedError

    def allgather(self, value: Any) -> list[Any]:
        """Return every rank's ``value`` in rank order (pickled: small values only)."""
        raise NotImplementedError

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Return root's ``value`` on every rank (pickled: small values only;
        the other ranks' ``value`` is ignored)."""
        raise NotImplementedError

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        """Return every rank's ``value`` in rank order on root, None on the others
        (pickled: for what only root needs, such as records it writes)."""
        raise NotImplementedError

    def sendrecv(self, send: np.ndarray, dest: int, receive: np.ndarray, source: int) -> np.ndarray:
        """Send ``send`` to rank ``dest`` while receiving ``receive`` from rank ``source``
        (point to point, both at once, so a ring of them cannot deadlock); return ``receive``.

        Not collective: ``dest`` makes a matching call with this rank as its
        ``source`` and a ``receive`` of ``send``'s size and dtype. Buffers are
        contiguous arrays (views into a larger one are fine); nothing is pickled.
        """
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """Terminate every rank of the job at once with exit status ``code``."""
        raise NotImplementedError

    def duplicate(self) -> "Communicator":
        """A communicator of the same ranks whose collectives never match this one's
        (``MPI_Comm_dup``), so that calls on the two may interleave differently on
        different ranks: a layer's blocking all-reduce inside backward while the
        gradient buckets' non-blocking ones are in flight here. Collective."""
        raise NotImplementedError

    def rank0_alone(self) -> contextlib.AbstractContextManager[None]:
        """Mark the enclosed phase as one in which rank 0 works alone while the other ranks
        wait for it on purpose (:func:`run_on_root`). Nothing here; the stall watchdog's
        communicator does not count such a wait as a stall (mnn.distributed.watchdog)."""
        return contextlib.nullcontext()

    def _check_root(self, root: int, what: str = "root") -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"{what} must be a rank in [0, {self.size}), got {root}")

    def _check_sendrecv(self, send: np.ndarray, dest: int, receive: np.ndarray, source: int) -> None:
        self._check_root(dest, "dest")
        self._check_root(source, "source")
        if not isinstance(send, np.ndarray) or not send.flags.c_contiguous:
            raise ValueError("sendrecv sends a C-contiguous numpy.ndarray")
        _check_buffer(receive, "sendrecv")


class SingleProcessCommunicator(Communicator):
    """A world of one rank: collectives leave their arguments unchanged."""

    rank = 0
    size = 1

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        _check_buffer(array, "allreduce")
        _check_reduce_op(op, array)
        return array

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> Request:
        self.allreduce(array, op)
        return Request()

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        self._check_root(root)
        _check_buffer(array, "broadcast")
        return array

    def barrier(self) -> None:
        pass

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def duplicate(self) -> "SingleProcessCommunicator":
        return SingleProcessCommunicator()

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        self._check_root(root)
        return value

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        self._check_root(root)
        return [value]

    def sendrecv(self, send: np.ndarray, dest: int, receive: np.ndarray, source: int) -> np.ndarray:
        self._check_sendrecv(send, dest, receive, source)
        if send.size != receive.size:
            raise ValueError(f"sendrecv to itself: sends {send.size} elements into a buffer of {receive.size}")
        receive.reshape(-1)[:] = send.reshape(-1)
        return receive

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # like MPI_Abort: no cleanup handlers, no return


class MPICommunicator(Communicator):
    """Collectives through mpi4py on ``comm`` (default ``MPI.COMM_WORLD``)."""

    def __init__(self, comm: Any = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        _check_buffer(array, "allreduce")
        _check_reduce_op(op, array)
        self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        if op == "mean":
            np.divide(array, self.size, out=array)
        return array

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> Request:
        _check_buffer(array, "iallreduce")
        _check_reduce_op(op, array)
        mpi_request = self.comm.Iallreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        finish = None
        if op == "mean":
            def finish() -> None:
                np.divide(array, self.size, out=array)
        return Request(mpi_request, finish)

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        self._check_root(root)
        _check_buffer(array, "broadcast")
        self.comm.Bcast(array, root=root)
        return array

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather(self, value: Any) -> list[Any]:
        return self.comm.allgather(value)

    def duplicate(self) -> "MPICommunicator":
        return MPICommunicator(self.comm.Dup())

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        self._check_root(root)
        return self.comm.bcast(value, root=root)

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        self._check_root(root)
        return self.comm.gather(value, root=root)

    def sendrecv(self, send: np.ndarray, dest: int, receive: np.ndarray, source: int) -> np.ndarray:
        self._check_sendrecv(send, dest, receive, source)
        self.comm.Sendrecv(send, dest, 0, receive, source, 0)
        return receive

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards a rank's output through pipes and stops reading
        # them once the job is aborted: give it a moment to pass on the error
        # this rank just printed, or the user may never see why the job ended.
        time.sleep(_ABORT_GRACE_S)
        self.comm.Abort(code)


def _launcher_world_size() -> int:
    """World size announced by an MPI launcher's environment, 1 if none."""
    return _launcher_number(_LAUNCHER_SIZE_ENV, default=1)


def launcher_rank() -> int:
    """This process's rank as the launcher's environment announces it (0 without a
    launcher), readable before MPI starts: e.g. to let one rank print a usage error."""
    return _launcher_number(_LAUNCHER_RANK_ENV, default=0)


def _launcher_number(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def get_communicator(comm: Any = None) -> Communicator:
    """Return the communicator mnn should use; the only place that decides.

    * a ``Communicator`` is returned as is; an mpi4py communicator is wrapped
      in ``MPICommunicator`` (the way tests pass ``MPI.COMM_SELF``);
    * ``MNN_NO_MPI=1`` in the environment, or mpi4py failing to import, gives
      ``SingleProcessCommunicator``;
    * otherwise ``MPICommunicator(MPI.COMM_WORLD)`` when the world has more
      than one rank, else ``SingleProcessCommunicator``.

    Falling back to one process while a launcher started several would train
    independent copies, so that case raises ``RuntimeError`` instead.

    Started by mnn-launch (``MNN_START_ADDR`` or ``MNN_START_DIR`` set), the
    first call reports this rank's start-up to it: ``rank-N.begun`` before MPI
    starts, ``rank-N.ready`` once MPI has started and a first barrier has
    joined every rank (:func:`_report_start`). mnn-launch stops a job whose
    ranks are not all ready within ``--start-timeout``, and passes on a signal
    only to ranks that are ready to take it.
    """
    if isinstance(comm, Communicator):
        return comm
    if comm is not None:
        if not hasattr(comm, "Get_rank"):
            raise TypeError(f"comm: expected a Communicator, an mpi4py communicator or None, got {type(comm).__name__}")
        return MPICommunicator(comm)
    launched_ranks = _launcher_world_size()
    _report_start("begun")
    if os.environ.get(NO_MPI_ENV, "") not in ("", "0"):
        reason = f"{NO_MPI_ENV}={os.environ[NO_MPI_ENV]}"
        fix = f"unset {NO_MPI_ENV}, or run one process"
    else:
        try:
            from mpi4py import MPI  # starts MPI
        except ImportError as error:
            reason = f"mpi4py cannot be imported ({error})"
            fix = f"install mpi4py ({install_hint('mpi')}), or run one process"
        else:
            if MPI.COMM_WORLD.Get_size() > 1:
                world = MPICommunicator(MPI.COMM_WORLD)
                _report_start("ready", before=world.barrier)
                return world
            _report_start("ready")
            return SingleProcessCommunicator()
    if launched_ranks > 1:
        raise RuntimeError(f"the launcher started {launched_ranks} ranks but {reason}: each rank "
                           f"would train alone; {fix}")
    _report_start("ready")
    return SingleProcessCommunicator()


_start_reported: set[str] = set()


def _report_start(stage: str, before: Callable[[], None] | None = None) -> None:
    """Once per process, and only under mnn-launch: call ``before`` (a first collective),
    then report ``rank-N.<stage>`` with this process's id: as one line to the port in
    ``MNN_START_ADDR`` (a job with a rank on another host), else as a file in
    ``MNN_START_DIR`` (mnn.distributed.launch.startup). A report that does not arrive (the
    port closed because another rank was ready first, a directory not on this host) is no
    error: one rank ready means that every rank started."""
    address = os.environ.get(START_ADDR_ENV, "")
    directory = os.environ.get(START_DIR_ENV, "")
    if not (address or directory) or stage in _start_reported:
        return
    _start_reported.add(stage)
    if before is not None:
        before()
    marker = f"rank-{launcher_rank()}.{stage}"
    if address:
        _send_report(address, f"{marker} {os.getpid()}\n")
        return
    try:
        with open(os.path.join(directory, marker), "w") as file:
            file.write(str(os.getpid()))
    except OSError:
        pass


def _send_report(address: str, line: str) -> None:
    """Send ``line`` to ``address`` (``host:port``; an IPv6 host without brackets), if it can."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_REPORT_TIMEOUT_S) as connection:
            connection.sendall(line.encode())
    except (OSError, ValueError):
        pass


def check_all(comm: Communicator, ok: bool, message: str = "") -> None:
    """Collective verdict: raise ``RankFailure`` on every rank if any rank is not ``ok``.

    Every rank calls it with its own ``ok`` and, when not ok, a message saying
    what went wrong; every rank learns every failing rank's message.
    """
    verdicts = comm.allgather((bool(ok), "" if ok else str(message)))
    failures = {rank: message for rank, (rank_ok, message) in enumerate(verdicts) if not rank_ok}
    if failures:
        raise RankFailure(failures, comm.size)


def run_all(comm: Communicator, fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """Call ``fn(*args, **kwargs)`` on every rank; if it raised anywhere, raise everywhere.

    Returns ``fn``'s result. If ``fn`` raised on any rank, every rank raises
    ``RankFailure`` (chained to the local exception where there is one).
    ``fn`` must be local work only (reading files, validating a config): a
    collective inside it would wait forever for a rank that already failed.
    """
    try:
        result = fn(*args, **kwargs)
    except Exception as error:
        # A plain ValueError or TypeError is a bad job told in words (what was expected,
        # what came): its type adds nothing. Any other exception is named by its type.
        told = str(error) if type(error) in (ValueError, TypeError) and str(error) \
            else f"{type(error).__name__}: {error}"
        try:
            check_all(comm, False, told)
        except RankFailure as failure:
            raise failure from error
        raise AssertionError("check_all returned although this rank failed")  # pragma: no cover
    check_all(comm, True)
    return result


def run_on_root(comm: Communicator, fn: Callable[[], Result]) -> Result | None:
    """``fn()`` on rank 0 only (None elsewhere); if it raised there, every rank raises
    ``RankFailure``. For work that is rank 0's alone: its files, its checks (the others'
    wait for it is no stall: see :meth:`Communicator.rank0_alone`)."""
    with comm.rank0_alone():
        return run_all(comm, lambda: fn() if comm.rank == 0 else None)


@contextlib.contextmanager
def stop_all_on_error(comm: Communicator, exit_code: int = 1) -> Iterator[None]:
    """Guard for an entry point's body: any failure stops every rank, never a hang.

    * ``RankFailure`` (raised on every rank alike): rank 0 prints it to stderr
      and every rank exits with ``exit_code``.
    * Any other exception (raised on some ranks only, others may be blocked in
      a collective): the traceback is printed and, on several ranks, the job is
      aborted; on one rank the exception propagates as usual.
    """
    try:
        yield
    except RankFailure as failure:
        if comm.rank == 0:
            print(f"error: {failure}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code) from None
    except Exception:
        if comm.size == 1:
            raise
        print(f"rank {comm.rank} failed; aborting all {comm.size} ranks", file=sys.stderr)
        traceback.print_exc()
        comm.abort(exit_code)
        raise  # pragma: no cover (abort does not return)
