"""The launch plan: the exact command line (srun, MPICH's or Open MPI's mpiexec, or none)
and the environment variables mnn-launch adds, built as a pure function of the arguments.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Mapping

from mnn.distributed.launch.hosts import local_host_names, place_ranks, usable_cores
from mnn.distributed.launch.mpi import MpiSetup
from mnn.distributed.reporting import PROGRESS_ENV

__all__ = ["THREAD_VARIABLES", "LaunchPlan", "build_command", "format_plan"]

#: Thread-count variables of OpenMP, OpenBLAS and MKL, set per rank unless the user set them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Open MPI hands remote ranks only the variables named with -x; these make a
# virtual environment and its libraries visible there.
_OPENMPI_FORWARDED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", PROGRESS_ENV)


@dataclass(frozen=True)
class LaunchPlan:
    """The exact command line and the variables mnn-launch adds to the environment."""

    argv: list[str]
    env_updates: dict[str, str]
    launcher: str            # "srun", "mpiexec" or "none" (one process without MPI)
    ranks: int
    threads_per_rank: int
    warnings: list[str] = field(default_factory=list)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").split("(")[0]  # SLURM writes repeated counts as "2(x3)"
    return int(value) if value.isdigit() and int(value) > 0 else None


def build_command(args: argparse.Namespace, env: Mapping[str, str], mpi: MpiSetup,
                  cores: int | None = None, terminal: bool = False) -> LaunchPlan:
    """The command line and environment additions for ``args``, mnn-launch's parsed arguments.

    ``args`` needs ``command`` (a list), ``ranks`` (int or None), ``hosts``
    (``[(host, slots), ...]`` or None) and ``mpiexec`` (the ``--mpiexec`` given,
    or None), as ``mnn.scripts.launch.parse_args`` returns them. ``terminal``
    says that mnn-launch's stderr is a terminal: the plan then sets
    ``MNN_PROGRESS=bar`` unless ``env`` has it. Pure apart from ``cores``
    (default: the cores this process may use). Raises ValueError when the
    arguments do not make a job.
    """
    cores = usable_cores() if cores is None else cores
    command = list(args.command)
    if not command:
        raise ValueError("no command to run: put it after '--', e.g. mnn-launch -n 2 -- mnn-train")
    hosts = args.hosts
    warnings = list(mpi.warnings)
    job_id = env.get("SLURM_JOB_ID")

    if job_id and not args.mpiexec:
        if hosts is not None:
            raise ValueError(f"--hosts/--hostfile do not apply inside SLURM job {job_id}: srun places ranks on "
                             "the allocation's nodes. Leave them out, or pass --mpiexec to use mpiexec instead")
        ranks = args.ranks or _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS")
        if ranks is None:
            raise ValueError(f"inside SLURM job {job_id} SLURM_NTASKS is not set: pass -n N")
        threads = _env_int(env, "SLURM_CPUS_PER_TASK")
        if threads is None:
            nodes = _env_int(env, "SLURM_JOB_NUM_NODES") or _env_int(env, "SLURM_NNODES") or 1
            per_node = -(-ranks // nodes)
            threads = max(1, (_env_int(env, "SLURM_CPUS_ON_NODE") or cores) // per_node)
        env_updates = _env_updates(env, threads, terminal)
        return LaunchPlan(["srun", "-n", str(ranks), *command], env_updates, "srun", ranks, threads, warnings)

    if mpi.mpiexec is None:
        if mpi.error:
            raise ValueError(mpi.error)
        ignored = f"; -n {args.ranks} is ignored" if args.ranks and args.ranks > 1 else ""
        warnings.append(f"no MPI ({mpi.library or 'no mpiexec found'}): running one process without MPI{ignored}")
        return LaunchPlan(command, _env_updates(env, cores, terminal), "none", 1, cores, warnings)
    if hosts is not None:
        ranks = args.ranks or sum(slots for _, slots in hosts)
        placement = place_ranks(hosts, ranks)
        local_ranks = sum(count for host, count in placement.items() if host in local_host_names())
        busiest = max(placement.values())
    else:
        if args.ranks is None:
            raise ValueError("how many ranks? pass -n N (or --hosts/--hostfile, whose slots give the count)")
        ranks = local_ranks = busiest = args.ranks
    threads = max(1, cores // busiest)
    env_updates = _env_updates(env, threads, terminal)

    if local_ranks > cores:
        warnings.append(f"{local_ranks} ranks on the {cores} cores of this host: ranks will share cores "
                        "(slower; results are the same)")
    argv = [mpi.mpiexec, "-n", str(ranks)]
    host_list = ",".join(f"{host}:{slots}" for host, slots in hosts) if hosts else None
    if mpi.launcher_family == "openmpi":
        if host_list:
            argv += ["--host", host_list]
        # Open MPI refuses to start more ranks than slots (cores, locally) unless told.
        slots = sum(slots for _, slots in hosts) if hosts else cores
        if ranks > slots:
            argv.append("--oversubscribe")
        exported = [name for name in (*THREAD_VARIABLES, *_OPENMPI_FORWARDED) if name in env or name in env_updates]
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
    return LaunchPlan(argv + command, env_updates, "mpiexec", ranks, threads, warnings)


def _env_updates(env: Mapping[str, str], threads: int, terminal: bool) -> dict[str, str]:
    """The thread counts, and the progress bar on a terminal, wherever the user has not chosen."""
    updates = {name: str(threads) for name in THREAD_VARIABLES if name not in env}
    if terminal and PROGRESS_ENV not in env:
        updates[PROGRESS_ENV] = "bar"
    return updates


def format_plan(plan: LaunchPlan) -> str:
    """What ``--dry-run`` prints: the variables set and the exact command, shell-quoted."""
    settings = " ".join(f"{name}={value}" for name, value in plan.env_updates.items())
    return (f"environment: {settings or '(nothing: the thread variables are already set)'}\n"
            f"command: {shlex.join(plan.argv)}")

