"""The launch plan: the exact command line (srun, MPICH's or Open MPI's mpiexec, or none)
and the environment variables mnn-launch adds, built as a pure function of the job's settings
(:class:`~mnn.distributed.launch.settings.LaunchSettings`).
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mnn.distributed.launch.hosts import local_host_names, place_ranks, usable_cores
from mnn.distributed.launch.mpi import MpiSetup
from mnn.distributed.launch.settings import LaunchSettings
from mnn.distributed.launch.startup import rank_hosts, reports_start
from mnn.distributed.environment import (LAUNCH_ID_ENV, MAX_RESTARTS_ENV, PROGRESS_ENV, RESTART_CAUSE_ENV,
                                         RESTART_COUNT_ENV, RESTART_RANKS_ENV, RESTART_SEEN_AT_ENV, START_ADDR_ENV,
                                         THREAD_VARIABLES)

__all__ = ["LaunchPlan", "build_command", "as_rank", "ssh_options", "format_plan"]

# The script that every rank starts through (run by path: it imports nothing of mnn).
_RANK_VARIABLES = Path(__file__).with_name("rank_variables.py")
# torchrun's variables of a job of one process, run without a launcher.
_ONE_PROCESS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}

# Open MPI hands remote ranks only the variables named with -x; these make a
# virtual environment and its libraries visible there, and tell the ranks of a restart.
_OPENMPI_FORWARDED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", PROGRESS_ENV, RESTART_COUNT_ENV,
                      MAX_RESTARTS_ENV, RESTART_CAUSE_ENV, RESTART_RANKS_ENV, RESTART_SEEN_AT_ENV, LAUNCH_ID_ENV)


@dataclass(frozen=True)
class LaunchPlan:
    """The exact command line and the variables mnn-launch adds to the environment.

    ``env_updates`` reach the ranks; ``launcher_env`` is for the launcher alone
    (how it starts its remote shells). ``family`` is the MPI family whose
    ``mpiexec`` runs the job (None for srun and for one process without MPI);
    ``notes`` are what ``--dry-run`` adds below the command. ``rank_hosts``
    and ``reports_start`` are for the start-up bound
    (:mod:`~mnn.distributed.launch.startup`); an srun plan has none.
    """

    argv: list[str]
    env_updates: dict[str, str]
    launcher: str            # "srun", "mpiexec" or "none" (one process without MPI)
    ranks: int
    threads_per_rank: int
    warnings: list[str] = field(default_factory=list)
    family: str | None = None
    launcher_env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rank_hosts: list[str | None] = field(default_factory=list)  # of each rank; None for this machine
    reports_start: bool = False  # the command is known to report its start-up (mnn-train)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").split("(")[0]  # SLURM writes repeated counts as "2(x3)"
    return int(value) if value.isdigit() and int(value) > 0 else None


def build_command(settings: LaunchSettings, env: Mapping[str, str], mpi: MpiSetup,
                  cores: int | None = None, terminal: bool = False, as_root: bool | None = None) -> LaunchPlan:
    """The command line and environment additions that start the job of ``settings``.

    ``terminal`` says that mnn-launch's stderr is a terminal: the plan then
    sets ``MNN_PROGRESS=bar`` unless ``env`` has it. ``as_root``: whether the
    job runs as root (default: whether this process does); Open MPI then needs
    ``--allow-run-as-root``. Pure apart from ``cores`` (default: the cores this
    process may use) and ``as_root``. Raises ValueError when the settings do
    not make a job here.
    """
    if not isinstance(settings, LaunchSettings):
        raise TypeError(f"settings: expected a LaunchSettings, got {type(settings).__name__}")
    cores = usable_cores() if cores is None else cores
    as_root = os.geteuid() == 0 if as_root is None else as_root
    command = list(settings.command)
    if not command:
        raise ValueError("no command to run: give it after mnn-launch's options, e.g. mnn-launch -n 2 mnn-train")
    hosts = settings.hosts
    warnings = list(mpi.warnings)
    job_id = env.get("SLURM_JOB_ID")

    if job_id and not settings.mpiexec:
        return _srun_plan(settings, env, job_id, cores, terminal, warnings)

    if mpi.mpiexec is None:
        if mpi.error:
            raise ValueError(mpi.error)
        ignored = f"; -n {settings.ranks} is ignored" if settings.ranks and settings.ranks > 1 else ""
        warnings.append(f"no MPI ({mpi.library or 'no mpiexec found'}): running one process without MPI{ignored}")
        return LaunchPlan(command, {**_env_updates(env, cores, terminal), **_ONE_PROCESS}, "none", 1, cores, warnings)
    if hosts is not None:
        ranks = settings.ranks or sum(slots for _, slots in hosts)
        placement = place_ranks(hosts, ranks)
        local_ranks = sum(count for host, count in placement.items() if host in local_host_names())
        busiest = max(placement.values())
    else:
        if settings.ranks is None:
            raise ValueError("how many ranks? pass -n N (or --hosts/--hostfile, whose slots give the count)")
        ranks = local_ranks = busiest = settings.ranks
    threads = max(1, cores // busiest)
    env_updates = _env_updates(env, threads, terminal)

    if local_ranks > cores:
        warnings.append(f"{local_ranks} ranks on the {cores} cores of this host: ranks will share cores "
                        "(slower; results are the same)")
    argv = [mpi.mpiexec, "-n", str(ranks)]
    notes = []
    placed = rank_hosts(hosts, ranks, local_host_names())
    host_list = ",".join(f"{host}:{slots}" for host, slots in hosts) if hosts else None
    if mpi.launcher_family == "openmpi":
        if as_root:
            # What horovodrun does too: in containers and CI jobs root is the only user.
            argv.append("--allow-run-as-root")
            notes.append("running as root: --allow-run-as-root, or Open MPI refuses to start")
        if host_list:
            argv += ["--host", host_list]
        # Open MPI refuses to start more ranks than slots (cores, locally) unless told.
        slots = sum(slots for _, slots in hosts) if hosts else cores
        if ranks > slots:
            argv.append("--oversubscribe")
        if threads > 1 or local_ranks > cores:
            # Open MPI binds each rank to one core by default, where the BLAS (which
            # counts the cores it may use) would run one thread instead of `threads`;
            # and it refuses to start more ranks here than cores when the hosts' slots allow them.
            argv += ["--bind-to", "none"]
        exported = [name for name in (*THREAD_VARIABLES, *_OPENMPI_FORWARDED) if name in env or name in env_updates]
        if any(host is not None for host in placed):
            exported.append(START_ADDR_ENV)  # where the ranks report their start-up (set when the job starts)
        for name in exported:
            argv += ["-x", name]
    else:
        if host_list:
            if mpi.launcher_family is None:
                raise ValueError(f"{mpi.mpiexec} is not MPICH or Open MPI: mnn-launch does not know how to pass "
                                 "it hosts; run it by hand")
            argv += ["-hosts", host_list]
        if mpi.launcher_family == "mpich":
            for name, value in env_updates.items():
                argv += ["-genv", name, value]
    launcher_env = _remote_shell_env(settings, env, mpi.launcher_family) \
        if any(host not in local_host_names() for host, _ in hosts or []) else {}
    return LaunchPlan(argv + as_rank(command), env_updates, "mpiexec", ranks, threads, warnings,
                      mpi.launcher_family, launcher_env, notes, placed, reports_start(command))


def _srun_plan(settings: LaunchSettings, env: Mapping[str, str], job_id: str, cores: int, terminal: bool,
               warnings: list[str]) -> LaunchPlan:
    """Inside SLURM job ``job_id``: ``srun -n N``, N and the threads per rank from the allocation."""
    if settings.hosts is not None:
        raise ValueError(f"--hosts/--hostfile do not apply inside SLURM job {job_id}: srun places ranks on "
                         "the allocation's nodes. Leave them out, or pass --mpiexec to use mpiexec instead")
    ranks = settings.ranks or _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS")
    if ranks is None:
        raise ValueError(f"inside SLURM job {job_id} SLURM_NTASKS is not set: pass -n N")
    threads = _env_int(env, "SLURM_CPUS_PER_TASK")
    if threads is None:
        nodes = _env_int(env, "SLURM_JOB_NUM_NODES") or _env_int(env, "SLURM_NNODES") or 1
        per_node = -(-ranks // nodes)
        threads = max(1, (_env_int(env, "SLURM_CPUS_ON_NODE") or cores) // per_node)
    env_updates = _env_updates(env, threads, terminal)
    return LaunchPlan(["srun", "-n", str(ranks), *as_rank(settings.command)], env_updates, "srun", ranks, threads,
                      warnings)


def as_rank(command: list[str] | tuple[str, ...]) -> list[str]:
    """``command`` as the launcher starts it on every rank: through
    :mod:`~mnn.distributed.launch.rank_variables`, which sets torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK and LOCAL_WORLD_SIZE from the launcher's own names, then becomes the command."""
    return [sys.executable, "-I", str(_RANK_VARIABLES), *command]


def ssh_options(timeout: float) -> list[str]:
    """Options that bound a remote start: ssh fails instead of waiting for a password that
    nobody can type behind the launcher, or for a host that is down (minutes of TCP timeout)."""
    return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, math.ceil(timeout))}"]


def _remote_shell_env(settings: LaunchSettings, env: Mapping[str, str], family: str | None) -> dict[str, str]:
    """How the launcher starts its remote shells: with :func:`ssh_options` and ``--ssh``.

    Set in the launcher's environment, where the user has not set them: on the
    command line Open MPI 5 passes ``plm_ssh_args`` on to its remote daemons cut
    at the first ``=``. Open MPI also starts every daemon from here (no tree
    spawn), through the ssh that mnn-launch checked before the start.
    """
    options = " ".join(ssh_options(settings.start_timeout))
    if family == "mpich":
        wanted = {"HYDRA_LAUNCHER_EXTRA_ARGS": options}
        if settings.ssh:
            wanted.update(HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=settings.ssh)
    elif family == "openmpi":
        wanted = {"PRTE_MCA_plm_ssh_args": options, "PRTE_MCA_plm_ssh_no_tree_spawn": "1"}
        if settings.ssh:
            wanted["PRTE_MCA_plm_ssh_agent"] = settings.ssh
    else:
        return {}
    return {name: value for name, value in wanted.items() if name not in env}


def _env_updates(env: Mapping[str, str], threads: int, terminal: bool) -> dict[str, str]:
    """The thread counts, and the progress bar on a terminal, wherever the user has not chosen."""
    updates = {name: str(threads) for name in THREAD_VARIABLES if name not in env}
    if terminal and PROGRESS_ENV not in env:
        updates[PROGRESS_ENV] = "bar"
    return updates


def format_plan(plan: LaunchPlan) -> str:
    """What ``--dry-run`` prints: the variables set, the exact command, shell-quoted, and notes."""
    settings = " ".join(f"{name}={value}" for name, value in plan.env_updates.items())
    lines = [f"environment: {settings or '(nothing: the thread variables are already set)'}"]
    if plan.launcher_env:
        lines.append("launcher environment: " + " ".join(f"{name}={shlex.quote(value)}"
                                                         for name, value in plan.launcher_env.items()))
    lines.append(f"command: {shlex.join(plan.argv)}")
    return "\n".join(lines + [f"note: {note}" for note in plan.notes])

