"""The weak- and strong-scaling driver: runs each rank count as a child job through the launcher's plan.

:func:`run_experiment` runs the experiment of a
:class:`~mnn.distributed.experiments.scaling.settings.ScalingSettings`:

1. each rank count is one child job, started as ``mnn-launch -n N`` starts
   jobs (:class:`ChildJobs`, through :func:`mnn.distributed.launch.build_command`:
   ``srun`` inside a SLURM allocation, else the ``mpiexec`` that belongs to
   mpi4py, with ``--hosts``/``--hostfile`` when given, ``--allow-run-as-root``
   and ``--oversubscribe`` where Open MPI needs them). Its ranks run the
   worker (:mod:`mnn.distributed.experiments.scaling.worker`), which trains
   the MLP for a number of steps and prints one result line on rank 0;
2. rank counts take turns, ``--repeats`` times (1, 2, 1, 2, ...: :func:`turns`),
   so a machine that slows down for a while slows every count alike;
3. the all-reduce micro-benchmark (:mod:`mnn.distributed.experiments.collectives`)
   runs on the largest rank count that fits the cores, and α and β are
   fitted to it for the cost model.

``mnn-bench --scaling`` starts its runs with the same :class:`ChildJobs` and
:func:`turns`: there is one way here to start a job on N ranks. Nothing is
written here: :mod:`mnn.distributed.experiments.scaling.report` writes the
experiment out.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mnn.distributed.environment import DISTRIBUTION, THREAD_VARIABLES
from mnn.distributed.experiments.scaling import worker as scaling_worker
from mnn.distributed.experiments.collectives import ALLREDUCE_NAMES, available_allreduces
from mnn.distributed.experiments.scaling.settings import (
    DEFAULT_RUN_TIMEOUT_S,
    Experiment,
    Point,
    ScalingSettings,
    build_workload,
    fit_collectives,
    summarise,
)
from mnn.distributed.launch import LaunchPlan, LaunchSettings, MpiSetup, build_command, detect_mpi, require_answers
from mnn.distributed.launch.hosts import usable_cores
from mnn.distributed.launch.process import run_with_timeout

__all__ = ["ChildJobs", "turns", "worker_command", "capacity", "machine_description",
           "run_experiment"]


def child_environment(env: Mapping[str, str], threads_per_rank: int) -> dict[str, str]:
    """``env`` with the BLAS/OpenMP thread variables set to ``threads_per_rank`` (the launcher
    passes variables that are set on unchanged)."""
    return {**env, **{name: str(threads_per_rank) for name in THREAD_VARIABLES}}


@dataclass(frozen=True)
class ChildJobs:
    """How an experiment starts its jobs: each is what ``mnn-launch -n N -- command`` would
    run with the hosts, mpiexec, ssh and start timeout of ``launch``, in ``env``, and is
    stopped after ``run_timeout`` seconds. Make one with :meth:`prepare`."""

    launch: LaunchSettings
    env: Mapping[str, str]
    mpi: MpiSetup
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S

    @classmethod
    def prepare(cls, launch: LaunchSettings, env: Mapping[str, str], threads_per_rank: int = 1,
                run_timeout: float = DEFAULT_RUN_TIMEOUT_S) -> "ChildJobs":
        """Find the MPI of this Python and check that other hosts answer, once for every job.

        Each rank gets ``threads_per_rank`` BLAS/OpenMP threads. RuntimeError when
        there is no MPI to start jobs with; ValueError naming hosts that do not answer.
        """
        env = child_environment(env, threads_per_rank)
        mpi = detect_mpi(env, mpiexec=launch.mpiexec)
        if mpi.error:
            raise RuntimeError(mpi.error)
        require_answers(launch.hosts, launch.ssh, launch.start_timeout, env)
        return cls(launch, env, mpi, run_timeout)

    def plan(self, ranks: int, command: Sequence[str]) -> LaunchPlan:
        """The launcher's plan for ``command`` on ``ranks``; RuntimeError where it would not
        start that many (without MPI the launcher runs one process)."""
        plan = build_command(replace(self.launch, command=tuple(command), ranks=ranks), self.env, self.mpi)
        if plan.ranks != ranks:
            raise RuntimeError(f"cannot start {ranks} ranks: {'; '.join(plan.warnings) or plan.launcher}")
        return plan

    def run(self, ranks: int, command: Sequence[str], what: str) -> tuple[str, LaunchPlan]:
        """Run ``command`` on ``ranks`` and return its standard output and the plan.

        RuntimeError naming ``what`` failed, the command line and the end of its
        output when the job exits with a status other than 0 or runs out of time.
        """
        plan = self.plan(ranks, command)
        code, stdout, stderr = run_with_timeout(plan.argv, {**self.env, **plan.env_updates, **plan.launcher_env},
                                                self.run_timeout, family=plan.family)
        if code != 0:
            why = f"no answer within {self.run_timeout:g} s" if code is None else f"exit status {code}"
            tail = "\n".join((stderr.strip() or stdout.strip() or "(no output)").splitlines()[-15:])
            raise RuntimeError(f"{what} on {ranks} rank(s) failed ({why}): {shlex.join(plan.argv)}\n{tail}")
        return stdout, plan


def turns(rank_counts: Sequence[int], repeats: int) -> Iterator[tuple[int, int]]:
    """(turn, ranks) of every run in the order they are made: each rank count once per turn
    (1, 2, 1, 2, ...), so that a machine that slows down for a while slows every count alike
    and each turn's runs can be compared with each other."""
    for turn in range(repeats):
        for ranks in rank_counts:
            yield turn, ranks


def worker_command(kind: str, spec: Mapping[str, Any]) -> list[str]:
    """The command every rank of a child job runs: the worker, ``kind`` ("point" or "collectives")."""
    return [sys.executable, "-m", scaling_worker.__name__, kind, json.dumps(dict(spec), separators=(",", ":"))]


def _run_worker(jobs: ChildJobs, kind: str, ranks: int, spec: dict) -> tuple[dict, LaunchPlan]:
    """Start one child job of the worker and return rank 0's result; RuntimeError naming what failed."""
    stdout, plan = jobs.run(ranks, worker_command(kind, spec), f"the {kind} job")
    marker = scaling_worker.RESULT_MARKER
    results = [line.split(marker, 1)[1] for line in stdout.splitlines() if marker in line]
    if not results:
        tail = "\n".join((stdout.strip() or "(no output)").splitlines()[-15:])
        raise RuntimeError(f"the {kind} job on {ranks} rank(s) printed no result: {shlex.join(plan.argv)}\n{tail}")
    return json.loads(results[-1]), plan


def capacity(settings: ScalingSettings, env: Mapping[str, str], cores: int | None = None) -> int:
    """How many ranks fit without sharing cores: the slots of the hosts, the SLURM
    allocation's tasks, or this machine's cores, divided by the threads per rank."""
    if settings.hosts:
        return sum(slots for _, slots in settings.hosts)
    tasks = env.get("SLURM_NTASKS", "").split("(")[0]
    if env.get("SLURM_JOB_ID") and tasks.isdigit() and not settings.mpiexec:
        return int(tasks)
    return max(1, (usable_cores() if cores is None else cores) // settings.threads_per_rank)


def machine_description(mpi: MpiSetup, fitting: int,
                        hosts: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """The machine, MPI, BLAS and versions an experiment ran on, as report.md states them
    (``hosts``: the hosts and slots the ranks were placed on, None for this machine alone)."""
    from importlib.metadata import PackageNotFoundError, version

    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mnn_version = version(DISTRIBUTION)
    except PackageNotFoundError:
        mnn_version = "not installed"
    blas = ", ".join(f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture')})"
                     for info in threadpool_info() if info.get("user_api") == "blas") or "none found"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "ranks_that_fit": fitting,
            "mpi_library": mpi.library, "mpi4py": mpi.mpi4py_version, "mpiexec": mpi.mpiexec,
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "blas": blas,
            "python": platform.python_version(), "numpy": np.__version__, "mnn": mnn_version,
            "platform": platform.platform(), "command": shlex.join(["mnn-scaling", *sys.argv[1:]]),
            "hosts": [f"{host}:{slots}" for host, slots in hosts] if hosts else None}


def run_experiment(settings: ScalingSettings, env: Mapping[str, str],
                   log: Callable[[str], None] = print) -> Experiment:
    """Run the experiment of ``settings`` (see the module docstring); RuntimeError if a job fails,
    ValueError if other hosts do not answer.

    ``log`` gets one progress line per run. Nothing is written here.
    """
    jobs = ChildJobs.prepare(settings.launch_settings(), env, settings.threads_per_rank, settings.run_timeout)
    fitting = capacity(settings, jobs.env)
    experiment = Experiment(settings, machine_description(jobs.mpi, fitting, settings.hosts),
                            notes=list(settings.notes))
    if not settings.collectives_only:
        _measure_points(settings, experiment, jobs, fitting, log)
    if settings.collectives or settings.collectives_only:
        _measure_collectives(settings, experiment, jobs, fitting, log)
    build_workload(experiment)
    return experiment


def _measure_points(settings: ScalingSettings, experiment: Experiment, jobs: ChildJobs, fitting: int,
                    log: Callable[[str], None]) -> None:
    points = {ranks: Point(ranks, ranks > fitting) for ranks in settings.ranks}
    experiment.points = list(points.values())
    total = settings.repeats * len(settings.ranks)
    for done, (turn, ranks) in enumerate(turns(settings.ranks, settings.repeats), start=1):
        point = points[ranks]
        spec = {"layers": list(settings.layers), "dtype": settings.dtype,
                "per_rank_batches": settings.per_rank_batches(ranks), "steps": settings.steps,
                "warmup": settings.warmup_steps, "target_seconds": settings.target_seconds,
                "dataset": settings.dataset, "threads_per_rank": settings.threads_per_rank,
                "allreduce": settings.train_allreduce, "grad_compression": settings.grad_compression}
        result, plan = _run_worker(jobs, "point", ranks, spec)
        if turn == 0:
            experiment.commands.append(shlex.join(plan.argv))
        result.update(turn=turn, oversubscribed=point.oversubscribed, launcher=plan.launcher)
        point.runs.append(result)
        marker = " (oversubscribed)" if point.oversubscribed else ""
        log(f"[{done}/{total}] turn {turn + 1}/{settings.repeats}: {ranks} rank(s){marker}: "
            f"{result['ms_per_step']:.2f} ms/step, {result['samples_per_s']:,.0f} samples/s "
            f"({result['steps']} steps via {plan.launcher})")
    summarise(experiment.points)


def _collective_ranks(settings: ScalingSettings, fitting: int) -> int | None:
    if settings.collective_ranks is not None:
        return settings.collective_ranks
    real = [ranks for ranks in settings.ranks if 1 < ranks <= fitting]
    return max(real) if real else (2 if fitting >= 2 else None)


def _measure_collectives(settings: ScalingSettings, experiment: Experiment, jobs: ChildJobs, fitting: int,
                         log: Callable[[str], None]) -> None:
    ranks = _collective_ranks(settings, fitting)
    if ranks is None:
        experiment.notes.append("the all-reduce micro-benchmark needs 2 ranks, and only 1 core is available: "
                                "skipped (pass --collective-ranks 2 to run it anyway)")
        log(experiment.notes[-1])
        return
    names = settings.allreduces or available_allreduces()
    missing = [name for name in ALLREDUCE_NAMES if name not in available_allreduces()]
    if missing and not settings.allreduces:
        experiment.notes.append(f"not measured: the {', '.join(missing)} all-reduce (not in this installation)")
    spec = {"sizes": settings.sizes, "allreduces": names, "seconds_per_size": settings.seconds_per_size,
            "threads_per_rank": settings.threads_per_rank}
    log(f"all-reduce micro-benchmark: {', '.join(names)} on {ranks} ranks, "
        f"{settings.smallest_bytes} B to {settings.largest_bytes} B")
    result, plan = _run_worker(jobs, "collectives", ranks, spec)
    experiment.commands.append(shlex.join(plan.argv))
    experiment.collectives = result["records"]
    experiment.collective_ranks = ranks
    if ranks > fitting:
        experiment.notes.append(f"the micro-benchmark ran on {ranks} ranks with {fitting} available: "
                                "oversubscribed, so its alpha and beta are not those of the network")
    for name, fit in fit_collectives(experiment).items():
        log(f"  {name}: {fit.describe()}")
