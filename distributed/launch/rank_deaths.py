"""A rank that died: what the launcher says about it, and mnn-launch's one line naming the
rank, its host, its process and how it died.

When a rank dies (SIGKILL, a crash) the launcher ends the job, but neither says
plainly which rank died where. MPICH's hydra prints a box on stdout with the
process id and host (``PID 12345 RUNNING AT node2``, ``EXIT CODE: 9``; on the
machine of mpiexec also ``EXIT STRING: Killed (signal 9)``), no rank, and seven
lines of its proxies' errors on stderr. Its proxies report a rank killed by
signal N as exit code N. Open MPI's prterun names the rank, host and signal
(``process rank 1 with PID 12345 on node node2 exited on signal 9``) when it
hears of the death first; with the rank's peers on other hosts it usually hears
first from a peer that lost its connection to the dead rank and aborts
(``Peer host: node2``, then ``process rank 0 ... calling "abort"``): the wrong
rank, and no signal.

mnn-launch knows each rank's host (its plan) and process id (every rank reports
``rank-N.begun PID`` as it starts, :mod:`~mnn.distributed.launch.startup`), so
the copier of the launcher's output (:mod:`~mnn.distributed.launch.launcher_output`)
reads these notices (:class:`DeathReader`) and mnn-launch turns the first into one
line of its own at the end of the job's output (:func:`death_line`).

Not a death: an exit by mnn-train's own error handling (status 1 or 2, or an
abort with 1; it has said why) or after an interrupt (130). hydra's exit code
says no more than a number, so a code that is one of these is no death; mnn-train
never exits with another one below 65, and hydra's proxies report a signal as
its number. A code from 65 up is an exit status nobody explained, and is named
as such.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

__all__ = ["LauncherDeath", "DeathReader", "EXPLAINED_NOTICE", "RUN_ERROR_NOTICE", "death_line", "death_line_for",
           "death_cause"]

#: The copier's notice that a rank explained its end itself (mnn-train's error, or its abort).
EXPLAINED_NOTICE = b"explained\n"
# What the line about a death adds when hydra named one of a host's several ranks.
_HYDRA_NAMES_ONE = " (hydra ends a host's other ranks the same way and names only one)"
#: The copier's notice that mnn-train ended the run with an error of its own (a bad job, a run
#: that diverged, an output that cannot be written): what a restart would only repeat.
RUN_ERROR_NOTICE = b"run error\n"

# mnn-train's own exit statuses (the stall watchdog's abort and stop_all_on_error's are 1), and
# Python's for an unhandled exception (1): each of these has been explained by the rank.
_EXPLAINED_EXITS = {0, 1, 2, 130}
_SIGNALS_BELOW = 65
# hydra's box on stdout; its exit string follows the box on the machine of mpiexec.
_HYDRA_BOX = re.compile(r"=\s+PID (\d+) RUNNING AT (\S+)\s*\n=\s+EXIT CODE: (\d+)")
_HYDRA_EXIT_STRING = re.compile(r"EXIT STRING: .*\(signal (\d+)\)")
# prterun's notices on stderr.
_PRTE_SIGNAL = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+)")
_PRTE_PEER_HOST = re.compile(r"^\s*Peer host:\s+(\S+)\s*$", re.MULTILINE)
# A rank's own account of its end: a connection closed after it says nothing new.
_EXPLAINED = re.compile(r"^(mnn-train: error|rank \d+ failed; aborting all \d+ ranks)")
_RUN_ERROR = re.compile(r"^mnn-train: error")
# Lines of context a notice spans (prterun breaks its sentence across two).
_CONTEXT_LINES = 3


@dataclass(frozen=True)
class LauncherDeath:
    """What a launcher said about a rank that died; None where it said nothing."""

    pid: int | None = None
    host: str | None = None
    rank: int | None = None
    signum: int | None = None
    exit_code: int | None = None

    def encode(self) -> bytes:
        """One line for the copier's notice pipe."""
        fields = (self.pid, self.host, self.rank, self.signum, self.exit_code)
        return b"died " + " ".join("-" if value is None else str(value) for value in fields).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> LauncherDeath | None:
        parts = line.decode(errors="replace").split()
        if len(parts) != 6 or parts[0] != "died":
            return None
        pid, host, rank, signum, exit_code = (None if part == "-" else part for part in parts[1:])
        number = (lambda value: None if value is None or not value.isdigit() else int(value))
        return cls(number(pid), host, number(rank), number(signum), number(exit_code))


class DeathReader:
    """Reads one stream of the launcher's output as it comes (:meth:`feed`) and returns the
    notices for mnn-launch as they complete: each death once (``LauncherDeath.encode``), and
    :data:`EXPLAINED_NOTICE` when a rank says why it ends, and :data:`RUN_ERROR_NOTICE` when
    that is mnn-train's own error."""

    def __init__(self) -> None:
        self._partial = ""
        self._recent: list[str] = []
        self._seen: set[LauncherDeath] = set()
        self._explained = False

    def feed(self, chunk: bytes) -> list[bytes]:
        found = []
        lines = (self._partial + chunk.decode(errors="replace")).split("\n")
        self._partial = lines.pop()[-4096:]  # a line that never ends is no notice
        for line in lines:
            self._recent = [*self._recent, line][-_CONTEXT_LINES:]
            if not self._explained and _EXPLAINED.match(line):
                self._explained = True
                found.append(EXPLAINED_NOTICE)
                if _RUN_ERROR.match(line):
                    found.append(RUN_ERROR_NOTICE)
            death = _parse("\n".join(self._recent))
            if death is not None and death not in self._seen:
                self._seen.add(death)
                found.append(death.encode())
        return found


def _parse(text: str) -> LauncherDeath | None:
    """The death that the last line of ``text`` completes, if any."""
    last = text.rsplit("\n", 1)[-1]
    box = _HYDRA_BOX.search(text)
    if box is not None and "EXIT CODE" in last:
        return LauncherDeath(pid=int(box.group(1)), host=box.group(2), exit_code=int(box.group(3)))
    exit_string = _HYDRA_EXIT_STRING.search(last)
    if exit_string is not None:
        return LauncherDeath(signum=int(exit_string.group(1)))
    prte = _PRTE_SIGNAL.search(text)
    if prte is not None and "signal" in last:
        return LauncherDeath(rank=int(prte.group(1)), pid=int(prte.group(2)), host=prte.group(3),
                             signum=int(prte.group(4)))
    peer = _PRTE_PEER_HOST.search(last)
    if peer is not None:
        return LauncherDeath(host=peer.group(1))
    return None


def death_line(deaths: list[LauncherDeath], hosts: list[str | None], begun: dict[int, int],
               this_host: str, explained: bool = False) -> str | None:
    """mnn-launch's line about the rank that died first (:func:`death_cause`), or None."""
    cause = death_cause(deaths, hosts, begun, this_host, explained)
    return None if cause is None else death_line_for(cause)


def death_line_for(cause: str) -> str:
    """mnn-launch's line that says ``cause`` (a :func:`death_cause`), with hydra's doubt
    where it has one."""
    doubt = _HYDRA_NAMES_ONE if cause.startswith("one of ranks ") else ""
    return f"mnn-launch: {cause}{doubt}; the launcher ended the job"


def death_cause(deaths: list[LauncherDeath], hosts: list[str | None], begun: dict[int, int],
                this_host: str, explained: bool = False) -> str | None:
    """Which rank died first and how (``rank 1 on node2 (process 4242) was killed by signal
    9 (SIGKILL)``), from what the launcher said (``deaths``, in order), the host of each
    rank (None for this machine) and the process id each rank reported (``begun``: {rank:
    pid}); None if the launcher named no death, or none that mnn-launch can put on a rank.
    ``explained``: a rank said why it ends, so a closed connection alone (Open MPI's ``Peer
    host``) is no death of its own."""
    signum = next((death.signum for death in deaths if death.signum is not None), None)
    for death in deaths:
        rank = _rank_of(death, hosts, begun)
        if rank is None or (explained and death.signum is None and death.exit_code is None):
            continue
        how = _how(death, signum)
        if how is None:
            return None  # an exit the rank explained itself
        host = hosts[rank] if rank < len(hosts) and hosts[rank] is not None else (death.host or this_host)
        neighbours = [other for other, where in enumerate(hosts) if rank < len(hosts) and where == hosts[rank]]
        if death.rank is None and len(neighbours) > 1:
            # hydra ends a host's other ranks with SIGKILL too, and its box names one process of
            # the host, not always the first to die (seen: the rank it stopped, not the killed one).
            return f"one of ranks {', '.join(map(str, neighbours))} on {host} {how}"
        pid = begun.get(rank, death.pid)
        process = f" (process {pid})" if pid is not None else ""
        return f"rank {rank} on {host}{process} {how}"
    return None


def _rank_of(death: LauncherDeath, hosts: list[str | None], begun: dict[int, int]) -> int | None:
    """The rank of ``death``: named by the launcher, else by its process id, else the one
    rank on its host."""
    if death.rank is not None:
        return death.rank
    if death.pid is not None:
        by_pid = [rank for rank, pid in begun.items() if pid == death.pid]
        if by_pid:
            return by_pid[0]
    if death.host is not None:
        on_host = [rank for rank, host in enumerate(hosts) if host == death.host]
        if len(on_host) == 1:
            return on_host[0]
    return None


def _how(death: LauncherDeath, signum: int | None) -> str | None:
    """How the rank died, in words; None for an exit it explained itself."""
    if death.signum is not None:
        signum = death.signum
    elif death.exit_code is not None and signum is None:
        if death.exit_code in _EXPLAINED_EXITS:
            return None
        if death.exit_code < _SIGNALS_BELOW:
            signum = death.exit_code  # hydra's proxies report a signal as its number
    if signum is not None:
        return f"was killed by signal {signum}{_signal_name(signum)}"
    if death.exit_code is not None:
        return f"exited with status {death.exit_code}"
    return ("died without a word: its connections to the other ranks closed (killed, or crashed; the "
            "launcher does not say how)")


def _signal_name(signum: int) -> str:
    try:
        return f" ({signal.Signals(signum).name})"
    except ValueError:
        return ""
