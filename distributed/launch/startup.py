"""The start-up bound: every rank must get through MPI's start-up and a first collective
within ``--start-timeout`` seconds, or mnn-launch stops the job and says which ranks did not.

Neither launcher bounds a start: hydra waits forever for a proxy whose remote
shell hangs, prterun for a daemon that never calls back, and a rank stopped
(SIGSTOP) before MPI_Init leaves the others in MPI_Init for good. mnn-launch
therefore gives the ranks a fresh directory (``MNN_START_DIR``), in which
:func:`~mnn.distributed.comm.get_communicator` writes ``rank-N.begun`` before
MPI starts and ``rank-N.ready`` after a first barrier. One ``ready`` from any
rank means that every rank got through MPI's start-up; a job in which none
appears in time is stopped, every process it started with it.

The bound holds for programs that report their start-up: ``mnn-train`` (known
by its name), or any program whose ranks write ``begun`` (everything started on
:func:`~mnn.distributed.comm.get_communicator`). Another program is never
stopped for not reporting. The directory is on this machine, so only ranks
here can report: a job with no rank here is not watched.

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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mnn.distributed.environment import START_DIR_ENV
from mnn.distributed.launch.tree import local_ranks, process_state

__all__ = ["StartWatch", "reports_start", "rank_hosts"]

#: Commands known to report their start-up before a rank has said so.
_REPORTING_PROGRAMS = ("mnn-train",)
_REPORTING_MODULES = ("mnn.scripts.train",)


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
    """The start-up of one job: its directory, its deadline, and who has reported."""

    directory: Path
    deadline: float
    timeout: float
    hosts: list[str | None]  # of each rank; None for this machine
    known: bool  # the command is known to report its start-up

    @classmethod
    def create(cls, timeout: float, hosts: list[str | None], known: bool) -> StartWatch:
        directory = Path(tempfile.mkdtemp(prefix="mnn-launch-start-"))
        return cls(directory, time.monotonic() + timeout, timeout, hosts, known)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def watched(self) -> bool:
        """Whether the job reports its start-up (known by its name, or a rank said so)."""
        return None in self.hosts and (self.known or any(self.directory.glob("rank-*.begun")))

    def ready(self) -> bool:
        """Whether a rank got through MPI's start-up and the first barrier (so every rank did)."""
        return any(self.directory.glob("rank-*.ready"))

    def overdue(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self, launcher_pid: int) -> str:
        """What the start-up of the job of ``launcher_pid`` came to, for the error once it is overdue."""
        processes = local_ranks(launcher_pid)
        begun = {int(marker.stem.split("-")[1]) for marker in self.directory.glob("rank-*.begun")}
        stopped, absent, slow, waiting, elsewhere = [], [], [], [], {}
        for rank, host in enumerate(self.hosts):
            if host is not None:
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
        elsewhere_any = bool(elsewhere)
        if stopped:
            parts.append(f"{_ranks(stopped)} on this machine {'was' if len(stopped) == 1 else 'were'} stopped "
                         "(SIGSTOP)")
        if absent:
            parts.append(f"{_ranks(absent)} on this machine {'was' if len(absent) == 1 else 'were'} not started "
                         "(the launcher waits for the other hosts first)" if elsewhere_any else
                         f"{_ranks(absent)} on this machine never started")
        if slow:
            parts.append(f"{_ranks(slow)} on this machine did not get to MPI's start-up")
        for host, ranks in elsewhere.items():
            parts.append(f"{_ranks(ranks)} on {host}: no word from that host (its remote shell or MPI daemon "
                         "never started, or hangs)")
        if waiting:
            parts.append(f"{_ranks(waiting)} on this machine waited in MPI's start-up for the others")
        return (f"the job did not start within {self.timeout:g} s (--start-timeout): " + "; ".join(parts)
                + ". mnn-launch ended every process of the job. Fix what keeps those ranks from starting, or raise "
                  "--start-timeout if the start is only slow")


def _ranks(ranks: list) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
