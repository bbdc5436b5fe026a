"""Restarts (``--max-restarts N``): a job that failed in a way a restart can fix is started
again, on the hosts that still answer, and continues from its newest checkpoint.

What a restart can fix (:func:`restart_cause`): a rank killed (SIGKILL, out of
memory) or crashed, a stall report (a rank frozen, a host lost), any exit status
but those below. What it cannot, and so never restarts: success (0), a bad job
(2: a wrong option, data that does not load), an interrupt (130, or any end
after a stop signal: the user asked to stop), and an error mnn-train reported
itself (a run that diverged, an output it cannot write): a restart would only
repeat it. Nor does a job whose start-up failed (``--start-timeout``) restart:
that is exit status 2 too.

Before each restart the hosts are taken again (:func:`hosts_for_restart`): the
hostfile is read again, as horovodrun's elastic mode runs its host discovery
script again, and every other host is asked ``ssh HOST true`` (as before the
first start) with at most :data:`ASK_AGAIN_S` seconds to answer. Hosts that do
not answer are left out; one that answers again is taken back at the next
restart. The ranks shrink by the slots of the hosts left out, beyond any slots
the job did not use; a job that would have fewer than ``--min-ranks`` ranks is
not restarted. Inside SLURM the allocation decides: srun runs the same ranks again.

What the ranks are told (:mod:`mnn.distributed.environment`): every start gets
``MNN_RESTART_COUNT`` (0 the first time), ``MNN_MAX_RESTARTS`` and
``MNN_LAUNCH_ID``; a restart also ``MNN_RESTART_CAUSE``,
``MNN_RESTART_RANKS_BEFORE`` and ``MNN_RESTART_SEEN_AT``. mnn-train continues
from OUTPUT's newest checkpoint that loads (``--resume``) when the count is above
0, and from the start when there is none yet. Its global batches do not depend
on the number of ranks, so the run ends with the model an uninterrupted run
makes: bitwise on the same ranks, up to the order of floating-point sums on fewer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from mnn.distributed.environment import (LAUNCH_ID_ENV, MAX_RESTARTS_ENV, RESTART_CAUSE_ENV, RESTART_COUNT_ENV,
                                         RESTART_RANKS_ENV, RESTART_SEEN_AT_ENV)
from mnn.distributed.launch.hosts import remote_hosts
from mnn.distributed.launch.process import JobEnd
from mnn.distributed.launch.remote import check_remote_hosts, find_ssh
from mnn.distributed.launch.settings import LaunchSettings

__all__ = ["ASK_AGAIN_S", "RestartPolicy", "restart_cause", "hosts_for_restart", "run_restarting", "new_launch_id"]

#: The most seconds a host that answered before has to answer ``ssh HOST true`` again
#: before a restart (--start-timeout when that is shorter): a lost host is left out
#: after this long, not after the first start's 120 s.
ASK_AGAIN_S = 15.0
# Exit statuses that a restart never follows: success, a bad job, an interrupt.
_FINAL_STATUSES = (0, 2, 130)


@dataclass(frozen=True)
class RestartPolicy:
    """How often a job may be started again (``max_restarts``), on how few ranks at the least
    (``min_ranks``), and the hostfile read again before each restart (None: the hosts given)."""

    max_restarts: int = 0
    min_ranks: int = 1
    hostfile: str | None = None


def restart_cause(end: JobEnd) -> str | None:
    """Why the job that ended so failed, in words, when a restart can fix it; None when not
    (see the module docstring)."""
    if end.status in _FINAL_STATUSES or end.interrupted or end.run_error:
        return None
    if end.death is not None:
        return end.death
    if end.stalled:
        return "a rank's stall report (above)"
    return f"the launcher's exit status {end.status}"


def hosts_for_restart(settings: LaunchSettings, policy: RestartPolicy, env: Mapping[str, str],
                      parse_hostfile: Callable[[str], list[tuple[str, int]]]) -> tuple[LaunchSettings, list[str]]:
    """The settings of the next start of the job that ``settings`` first asked for, and for
    each host left out ``"HOST: why"``: the hostfile read again (if any), every other host
    asked again, and the ranks lowered by the slots that are gone, beyond those the job did
    not use (see the module docstring). ValueError when the hostfile cannot be read or no
    host answers."""
    hosts = parse_hostfile(policy.hostfile) if policy.hostfile is not None else settings.hosts
    if hosts is None:
        return settings, []
    remote = remote_hosts(hosts)
    answers = {}
    if remote:
        timeout = min(settings.start_timeout, ASK_AGAIN_S)
        answers = check_remote_hosts(remote, find_ssh(settings.ssh, env), timeout, env)
    left_out = [f"{host}: {problem}" for host, problem in answers.items() if problem]
    kept = [(host, slots) for host, slots in hosts if not answers.get(host)]
    if not kept:
        raise ValueError("no host answers any more: " + "; ".join(left_out))
    ranks = settings.ranks
    if ranks is not None:
        first_slots = sum(slots for _, slots in settings.hosts or hosts)
        gone = first_slots - sum(slots for _, slots in kept)
        ranks -= max(0, gone - max(0, first_slots - ranks))
    return replace(settings, hosts=tuple(kept), ranks=ranks), left_out


def run_restarting(settings: LaunchSettings, policy: RestartPolicy, env: Mapping[str, str],
                   start: Callable[[LaunchSettings, Mapping[str, str], bool], tuple[int, JobEnd]],
                   parse_hostfile: Callable[[str], list[tuple[str, int]]], launch_id: str) -> int:
    """Start the job of ``settings`` and restart it as ``policy`` allows; the exit status.

    ``start(settings, env, first)`` runs one start of the job with those variables and
    returns its ranks and how it ended (``first``: the first start, which asks the hosts
    itself). Each restart is one line on stderr: its cause, the ranks before and after, the
    hosts left out.
    """
    if policy.max_restarts:
        env = {**env, RESTART_COUNT_ENV: "0", MAX_RESTARTS_ENV: str(policy.max_restarts), LAUNCH_ID_ENV: launch_id}
    restarts = 0
    asked = settings
    while True:
        ranks, end = start(settings, env, restarts == 0)
        cause = restart_cause(end)
        if cause is None or not policy.max_restarts:
            return end.status
        if restarts == policy.max_restarts:
            _say(f"{policy.max_restarts} restart{'s' if policy.max_restarts != 1 else ''} used up (--max-restarts): "
                 f"the job ends with the status of its last failure, {end.status} ({cause})")
            return end.status
        try:
            settings, left_out = hosts_for_restart(asked, policy, env, parse_hostfile)
        except ValueError as error:
            _say(f"cannot restart the job after {cause}: {error}; it ends with exit status {end.status}")
            return end.status
        after = _ranks_of(settings, ranks)
        without = f" ({'; '.join(left_out)}: left out)" if left_out else ""
        if after < policy.min_ranks:
            _say(f"cannot restart the job after {cause}: {after} rank{'s' if after != 1 else ''} left{without}, "
                 f"fewer than --min-ranks {policy.min_ranks}; it ends with exit status {end.status}")
            return end.status
        restarts += 1
        _say(f"restart {restarts} of {policy.max_restarts} after {cause}: {ranks} rank{'s' if ranks != 1 else ''} "
             f"-> {after}{without}; the job continues from its newest checkpoint")
        env = {**env, RESTART_COUNT_ENV: str(restarts), RESTART_CAUSE_ENV: cause, RESTART_RANKS_ENV: str(ranks),
               RESTART_SEEN_AT_ENV: f"{end.failed_at:.3f}"}


def _ranks_of(settings: LaunchSettings, before: int) -> int:
    """The ranks ``settings`` start: ``-n``, else the slots of its hosts, else (inside SLURM,
    where the allocation decides) as many as ``before``."""
    if settings.ranks is not None:
        return settings.ranks
    return sum(slots for _, slots in settings.hosts) if settings.hosts else before


def _say(line: str) -> None:
    print(f"mnn-launch: {line}", file=sys.stderr, flush=True)


def new_launch_id() -> str:
    """A fresh id for one mnn-launch run (see ``MNN_LAUNCH_ID``)."""
    return os.urandom(8).hex()
