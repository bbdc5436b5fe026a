"""What a job is asked to be: the command, its ranks and hosts, the launcher and the start-up bound.

A :class:`LaunchSettings` is the parsed state of mnn-launch's command line
(``mnn.scripts.launch`` builds it in one place) and what every other starter of
jobs (mnn-scaling's driver, ``--check``'s hello) gives the launch plan: one
small frozen value instead of copies of an argparse Namespace, so that the plan
reads only what a job is, never what a command line happened to hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

__all__ = ["DEFAULT_START_TIMEOUT_S", "LaunchSettings"]

#: Seconds every other host has to answer ssh, a job to start (every rank through MPI's start-up
#: and a first collective) and --check's hello to finish, unless --start-timeout says.
DEFAULT_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LaunchSettings:
    """One job to start.

    ``command``: the program every rank runs and its arguments (empty for
    ``--check``, which runs its own). ``ranks``: how many, or None for the
    allocation's tasks (SLURM) or the total slots of ``hosts``. ``hosts``:
    ``((host, slots), ...)`` as :func:`~mnn.distributed.launch.hosts.parse_hosts`
    reads them, or None for this machine alone. ``mpiexec``: the launcher to
    use instead of the one found for mpi4py (also inside SLURM). ``ssh``: the
    remote shell for other hosts (None: ssh). ``start_timeout``: seconds other
    hosts have to answer ssh and every rank to start. Lists given are kept as
    tuples, so that the value cannot change once made.
    """

    command: tuple[str, ...] = ()
    ranks: int | None = None
    hosts: tuple[tuple[str, int], ...] | None = None
    mpiexec: str | None = None
    ssh: str | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", _strings(self.command, "command"))
        if self.hosts is not None:
            object.__setattr__(self, "hosts", tuple((host, slots) for host, slots in self.hosts))
        if self.ranks is not None and (isinstance(self.ranks, bool) or not isinstance(self.ranks, int)
                                       or self.ranks < 1):
            raise ValueError(f"ranks: expected a positive integer or None, got {self.ranks!r}")
        if isinstance(self.start_timeout, bool) or not isinstance(self.start_timeout, (int, float)) \
                or not (math.isfinite(self.start_timeout) and self.start_timeout > 0):
            raise ValueError(f"start_timeout: expected a positive number of seconds, got {self.start_timeout!r}")


def _strings(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):  # a command given as one string would run letter by letter
        raise TypeError(f"{what}: expected a list of strings (program and arguments), got the string {values!r}")
    values = tuple(values)
    wrong = [value for value in values if not isinstance(value, str)]
    if wrong:
        raise TypeError(f"{what}: expected strings, got {wrong[0]!r}")
    return values
