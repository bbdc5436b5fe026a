"""The start-up bound: every rank must get through MPI's start-up and a first collective
within ``--start-timeout`` seconds, or mnn-launch stops the job and says which ranks did not.

Neither launcher bounds a start: hydra waits forever for a proxy whose remote
shell hangs, prterun for a daemon that never calls back, and a rank stopped
(SIGSTOP) before MPI_Init leaves the others in MPI_Init for good. So each rank
reports how far its start got: :func:`~mnn.distributed.comm.get_communicator`
sends ``rank-N.begun`` before MPI starts and ``rank-N.ready`` after a first
barrier. One ``ready`` from any rank means that every rank got through MPI's
start-up; a job in which none comes in time is stopped, every process it
started with it.

Where the reports go. A job whose ranks all run on this machine gets a fresh
directory (``MNN_START_DIR``) in which each rank writes its markers. A job with
a rank on another host cannot count on a directory that every host sees, so
mnn-launch then listens on a TCP port while the job starts (``MNN_START_ADDR``,
``address:port``) and every rank, here or there, sends its marker's name in one
line; mnn-launch writes what it hears into the directory, so the rest reads as
for one machine. The address is the one this machine reaches the first other
host from (its host name may resolve to a loopback address, as Debian's
``127.0.1.1``). This asks nothing new of the network: both launchers already
need the hosts to connect back to this machine on a port of its choosing
(hydra's proxies to mpiexec, prted to prterun). The port is closed once a rank
is ready and every rank has said that it began (each rank's process id names
the rank in what a launcher says when a rank dies:
:mod:`~mnn.distributed.launch.rank_deaths`), or once mnn-launch stops watching
or the job ends; a report that finds it closed is dropped by the rank. A rank
reports ``begun`` before MPI starts and ``ready`` only after a barrier, so every
``begun`` normally comes first. If no address is found (the host's name
resolves only in ssh's configuration), only the ranks on this machine report,
in the directory, and a job with none here is not watched.

The bound holds for programs that report their start-up: ``mnn-train`` (known
by its name), or any program whose ranks report ``begun`` (everything started on
:func:`~mnn.distributed.comm.get_communicator`). Another program is never
stopped for not reporting.

Until the job is ready, a signal to mnn-launch is held back: a rank that is
still importing Python has no handler yet, and would die of it, or print a
traceback. Once ready, the held signal is passed on and mnn-train stops before
training with its one line. A job that is not ready within a few seconds of the
signal, or a signal repeated more than a second later (a person insisting), is
stopped at once, every process with it: a rank writes nothing before it is
ready, so nothing is lost.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mnn.distributed.environment import START_ADDR_ENV, START_DIR_ENV
from mnn.distributed.launch.tree import local_ranks, process_state

__all__ = ["StartWatch", "reports_start", "rank_hosts"]

#: Commands known to report their start-up before a rank has said so.
_REPORTING_PROGRAMS = ("mnn-train",)
_REPORTING_MODULES = ("mnn.scripts.train",)
# A rank's report: the name of its marker and its process id, one line.
_REPORT = re.compile(rb"(rank-\d{1,9}\.(?:begun|ready)) (\d{1,10})\n")
_REPORT_MAX_BYTES = 64
# How long the listener waits for a connection's line (a rank sends it at once), and between
# looks at whether it should stop.
_REPORT_READ_S = 1.0
_ACCEPT_POLL_S = 0.1


def reports_start(command: list[str]) -> bool:
    """Whether ``command`` is a program known to report its start-up (see the module docstring)."""
    for position, word in enumerate(command[:3]):
        if os.path.basename(word) in _REPORTING_PROGRAMS:
            return True
        if word == "-m" and command[position + 1:position + 2] and command[position + 1] in _REPORTING_MODULES:
            return True
    return False


def rank_hosts(hosts: list[tuple[str, int]] | None, ranks: int, local: set[str]) -> list[str | None]:
    """The host of each rank, as both launchers fill the hosts slot by slot (wrapping
    around); None for this machine (``local``: the hosts that are this machine)."""
    if not hosts:
        return [None] * ranks
    order = []
    while len(order) < ranks:
        for host, slots in hosts:
            order += [None if host in local else host] * slots
    return order[:ranks]


@dataclass
class StartWatch:
    """The start-up of one job: where its ranks report, its deadline, and who has reported."""

    directory: Path
    deadline: float
    timeout: float
    hosts: list[str | None]  # of each rank; None for this machine
    known: bool  # the command is known to report its start-up
    listener: _ReportListener | None = None  # when a rank runs on another host

    @classmethod
    def create(cls, timeout: float, hosts: list[str | None], known: bool) -> StartWatch:
        directory = Path(tempfile.mkdtemp(prefix="mnn-launch-start-"))
        listener = None
        remote = next((host for host in hosts if host is not None), None)
        if remote is not None:
            address = _address_towards(remote)
            if address is not None:
                try:
                    listener = _ReportListener(address, directory, len(hosts))
                except OSError:
                    listener = None
        return cls(directory, time.monotonic() + timeout, timeout, hosts, known, listener)

    def environment(self) -> dict[str, str]:
        """The variables that tell the ranks where to report. MNN_START_ADDR is set (empty
        when nobody listens) whenever a rank runs elsewhere: Open MPI is told to pass it on."""
        variables = {START_DIR_ENV: str(self.directory)}
        if any(host is not None for host in self.hosts):
            variables[START_ADDR_ENV] = self.listener.address if self.listener is not None else ""
        return variables

    def stop_listening(self) -> None:
        """Close the port (the job is no longer watched, or has ended)."""
        if self.listener is not None:
            self.listener.close()

    def remove(self) -> None:
        self.stop_listening()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def watched(self) -> bool:
        """Whether the job reports its start-up (known by its name, or a rank said so) to us."""
        reaches_us = self.listener is not None or None in self.hosts
        return reaches_us and (self.known or any(self.directory.glob("rank-*.begun")))

    def begun(self) -> dict[int, int]:
        """{rank: process id} of the ranks that said they began."""
        ranks = {}
        for marker in self.directory.glob("rank-*.begun"):
            try:
                ranks[int(marker.stem.split("-")[1])] = int(marker.read_text())
            except (OSError, ValueError):
                continue  # a marker being written, or not ours
        return ranks

    def ready(self) -> bool:
        """Whether a rank got through MPI's start-up and the first barrier (so every rank did)."""
        return any(self.directory.glob("rank-*.ready"))

    def overdue(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self, launcher_pid: int) -> str:
        """What the start-up of the job of ``launcher_pid`` came to, for the error once it is overdue."""
        processes = local_ranks(launcher_pid)
        begun = {int(marker.stem.split("-")[1]) for marker in self.directory.glob("rank-*.begun")}
        stopped, absent, slow, waiting, elsewhere, waiting_elsewhere = [], [], [], [], {}, {}
        for rank, host in enumerate(self.hosts):
            if host is not None and rank in begun:
                waiting_elsewhere.setdefault(host, []).append(rank)
            elif host is not None:
                elsewhere.setdefault(host, []).append(rank)
            elif rank not in processes:
                absent.append(rank)
            elif process_state(processes[rank]) == "T":
                stopped.append(f"{rank} (process {processes[rank]})")
            elif rank not in begun:
                slow.append(rank)
            else:
                waiting.append(rank)
        parts = []
        elsewhere_any = bool(elsewhere or waiting_elsewhere)
        if stopped:
            parts.append(f"{_ranks(stopped)} on this machine {'was' if len(stopped) == 1 else 'were'} stopped "
                         "(SIGSTOP)")
        if absent:
            parts.append(f"{_ranks(absent)} on this machine {'was' if len(absent) == 1 else 'were'} not started "
                         "(the launcher waits for the other hosts first)" if elsewhere_any else
                         f"{_ranks(absent)} on this machine never started")
        if slow:
            parts.append(f"{_ranks(slow)} on this machine did not get to MPI's start-up")
        # Its ranks may also have started but found no way back to the port they report to (a firewall).
        unreachable = f", or its ranks cannot connect back to {self.listener.host}" if self.listener else ""
        for host, ranks in elsewhere.items():
            parts.append(f"{_ranks(ranks)} on {host}: no word from that host (its remote shell or MPI daemon "
                         f"never started, or hangs{unreachable})")
        if waiting:
            parts.append(f"{_ranks(waiting)} on this machine waited in MPI's start-up for the others")
        for host, ranks in waiting_elsewhere.items():
            parts.append(f"{_ranks(ranks)} on {host} waited in MPI's start-up for the others")
        return (f"the job did not start within {self.timeout:g} s (--start-timeout): " + "; ".join(parts)
                + ". mnn-launch ended every process of the job. Fix what keeps those ranks from starting, or raise "
                  "--start-timeout if the start is only slow")


def _ranks(ranks: list) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _address_towards(host: str) -> str | None:
    """The address of this machine that ``host`` is reached from (so the address it can reach
    us at), or None if ``host`` does not resolve. Sends nothing: connecting a UDP socket only
    makes the kernel choose the route and its source address."""
    try:
        candidates = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, protocol, _, destination in candidates:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.connect(destination)
                return probe.getsockname()[0]
        except OSError:
            continue
    return None


class _ReportListener:
    """A TCP port on ``address`` on which the ranks report their start-up: each connection
    brings one line, the name of a rank's marker and its process id, which is written as that
    marker into ``directory``. Anything else is ignored. Listens in a thread of its own until
    a rank is ready and each of the ``ranks`` has said it began, or :meth:`close` is called."""

    def __init__(self, address: str, directory: Path, ranks: int):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._socket = socket.create_server((address, 0), family=family)
        self._socket.settimeout(_ACCEPT_POLL_S)
        self.host = address
        self.address = f"{address}:{self._socket.getsockname()[1]}"
        self._directory = directory
        self._waiting = {f"rank-{rank}.begun" for rank in range(ranks)}
        self._ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="mnn-launch start reports", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    connection, _ = self._socket.accept()
                except socket.timeout:
                    continue
                with connection:
                    marker = self._read_report(connection)
                if marker is not None:
                    (self._directory / marker[0]).write_text(marker[1])
                    self._ready = self._ready or marker[0].endswith(".ready")
                    self._waiting.discard(marker[0])
                if self._ready and not self._waiting:
                    return  # every rank started, and we know each one's process
        except OSError:
            return  # the directory is gone: the job has ended
        finally:
            self._socket.close()

    @staticmethod
    def _read_report(connection: socket.socket) -> tuple[str, str] | None:
        """(marker name, process id) from a rank's line, None for anything else."""
        connection.settimeout(_REPORT_READ_S)
        received = b""
        try:
            while not received.endswith(b"\n") and len(received) < _REPORT_MAX_BYTES:
                chunk = connection.recv(_REPORT_MAX_BYTES - len(received))
                if not chunk:
                    break
                received += chunk
        except OSError:
            return None
        match = _REPORT.fullmatch(received)
        return None if match is None else (match.group(1).decode(), match.group(2).decode())
