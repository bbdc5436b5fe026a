"""Scaling experiments: throughput, speed-up and efficiency of data-parallel training against ranks.

``mnn-scaling`` (``mnn.scripts.scaling``) parses the command line into
:class:`ScalingSettings`; :func:`run_experiment` does the rest:

1. each rank count is one child job, started through the launcher's own plan
   (:func:`mnn.distributed.launch.build_command`, as ``mnn-launch`` starts jobs:
   ``srun`` inside a SLURM allocation, else the ``mpiexec`` that belongs to
   mpi4py, with ``--hosts``/``--hostfile`` when given). The job runs
   ``python -m mnn.distributed.experiments.scaling WORKER SPEC`` on every rank, which
   trains the MLP for a fixed number of steps and prints one result line on
   rank 0 (:func:`measure_point`);
2. rank counts take turns, ``--repeats`` times (1, 2, 1, 2, ...), so a machine
   that slows down for a while slows every count alike; each point is the
   median over the turns, with the minimum and maximum beside it, and the
   speed-up of each turn is taken against the baseline of the *same* turn;
3. the all-reduce micro-benchmark (:mod:`mnn.distributed.experiments.collectives`) runs on
   the largest rank count that fits the cores, α and β are fitted to it, and
   the cost model (:mod:`mnn.distributed.experiments.costmodel`) predicts the measured
   points and projects them to 1024 ranks;
4. :mod:`mnn.distributed.experiments.scaling_report` writes ``results.csv``,
   ``results.jsonl``, ``report.md`` and the plots into the output folder.

A rank count larger than the cores available (or the slots of the hosts) is
run, but its points are marked *oversubscribed*: ranks then share cores, so
its numbers say nothing about scaling and are kept apart in every table and plot.

Each rank uses one BLAS thread (``--threads-per-rank``): threads beyond a
rank's core would compete with the other ranks and blur the scaling.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mnn.distributed.experiments.collectives import ALLREDUCE_NAMES, available_allreduces, message_sizes, run_collectives
from mnn.distributed.comm import Communicator, get_communicator, stop_all_on_error
from mnn.distributed.experiments.costmodel import (
    ALGORITHMS,
    NETWORKS,
    AlphaBetaFit,
    Network,
    Workload,
    efficiency,
    fit_alpha_beta,
    projection_ranks,
    step_time,
)
from mnn.distributed.environment import THREAD_VARIABLES
from mnn.distributed.launch import (
    LaunchPlan,
    MpiSetup,
    build_command,
    detect_mpi,
    require_answers,
)
from mnn.distributed.launch.hosts import usable_cores
from mnn.distributed.launch.process import run_with_timeout

__all__ = ["MODES", "RESULT_MARKER", "ScalingSettings", "Point", "Experiment", "measure_point",
           "run_experiment", "summarise", "worker_command", "launch_plan", "capacity", "child_environment",
           "settings_record", "model_networks", "predict_points", "project", "load_experiment"]

MODES = ("weak", "strong")
#: Rank 0 of a child job prints its result on one line after this marker.
RESULT_MARKER = "MNN-SCALING-RESULT "
_DTYPES = ("float32", "float64")
_DEFAULT_LAYERS = (784, 1024, 1024, 10)


@dataclass
class ScalingSettings:
    """Everything an experiment needs, checked by :meth:`check` (ValueError naming the problem).

    ``per_rank_batch`` is used in weak mode, ``global_batch`` in strong mode.
    ``steps`` fixes the timed steps per run; ``None`` times about ``target_seconds``.
    ``collectives``: run the all-reduce micro-benchmark (and the cost model);
    ``collectives_only``: run nothing else. ``networks`` are projected to in the
    report, besides the α and β fitted here. The launcher fields are mnn-launch's.
    """

    ranks: list[int] = field(default_factory=lambda: [1, 2])
    layers: tuple[int, ...] = _DEFAULT_LAYERS
    dtype: str = "float32"
    mode: str = "weak"
    per_rank_batch: int = 256
    global_batch: int | None = None
    repeats: int = 3
    steps: int | None = None
    warmup_steps: int = 5
    target_seconds: float = 1.0
    dataset: str | None = None
    out: Path = Path("runs/scaling")
    collectives: bool = True
    collectives_only: bool = False
    collective_ranks: int | None = None
    smallest_bytes: int = 4
    largest_bytes: int = 64 * 2**20
    seconds_per_size: float = 0.5
    allreduces: list[str] | None = None
    train_allreduce: str = "mpi"
    grad_compression: str = "none"
    networks: list[Network] = field(default_factory=lambda: list(NETWORKS.values()))
    max_projected_ranks: int = 1024
    threads_per_rank: int = 1
    run_timeout: float = 900.0
    hosts: list[tuple[str, int]] | None = None
    mpiexec: str | None = None
    ssh: str | None = None
    start_timeout: float = 60.0

    def check(self) -> "ScalingSettings":
        """Raise ValueError for settings that do not make an experiment; return self."""
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"--ranks: every rank count must be at least 1, got {_join(self.ranks)}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"--ranks: each rank count once, got {_join(self.ranks)}")
        if len(self.layers) < 2 or min(self.layers) < 1:
            raise ValueError(f"--layers: at least two positive widths (inputs, ..., classes), got {_join(self.layers)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "strong":
            if self.global_batch is None:
                raise ValueError("--mode strong needs --global-batch (the samples of one step over all ranks)")
            if self.global_batch < max(self.ranks):
                raise ValueError(f"--global-batch {self.global_batch} is smaller than {max(self.ranks)} ranks: "
                                 "in strong scaling every rank needs at least one sample of the global batch")
        elif self.per_rank_batch < 1:
            raise ValueError(f"--batch-per-rank must be at least 1, got {self.per_rank_batch}")
        for name in ("repeats", "warmup_steps", "threads_per_rank", "max_projected_ranks"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        message_sizes(self.smallest_bytes, self.largest_bytes)
        unknown = [name for name in self.allreduces or [] if name not in ALLREDUCE_NAMES]
        if unknown:
            raise ValueError(f"--allreduce: unknown {', '.join(unknown)}; expected {', '.join(ALLREDUCE_NAMES)}")
        if self.train_allreduce not in ("mpi", "ring"):
            raise ValueError(f"--train-allreduce: expected mpi or ring, got {self.train_allreduce!r}")
        if self.grad_compression not in ("none", "fp16"):
            raise ValueError(f"--grad-compression: expected none or fp16, got {self.grad_compression!r}")
        if self.grad_compression == "fp16" and self.train_allreduce != "ring":
            raise ValueError("--grad-compression fp16 needs --train-allreduce ring (MPI has no float16 sum)")
        if self.collective_ranks is not None and self.collective_ranks < 2:
            raise ValueError(f"--collective-ranks must be at least 2, got {self.collective_ranks}")
        return self

    @property
    def sizes(self) -> list[int]:
        return message_sizes(self.smallest_bytes, self.largest_bytes)

    def per_rank_batches(self, ranks: int) -> list[int]:
        """Samples of each rank in a step on ``ranks`` (strong scaling: near-equal shards)."""
        if self.mode == "weak":
            return [self.per_rank_batch] * ranks
        base, extra = divmod(self.global_batch, ranks)
        return [base + 1 if rank < extra else base for rank in range(ranks)]

    def describe(self) -> str:
        batch = (f"{self.per_rank_batch} samples per rank" if self.mode == "weak"
                 else f"global batch {self.global_batch}")
        data = f"dataset {self.dataset}" if self.dataset else "random data"
        reduce = f"{self.train_allreduce} all-reduce" + (", float16 on the wire" if self.grad_compression == "fp16"
                                                         else "")
        return (f"MLP {'-'.join(map(str, self.layers))}, {self.dtype}, {self.mode} scaling, {batch}, {data}, "
                f"SGD (momentum 0.9), {reduce}, {self.threads_per_rank} BLAS thread(s) per rank")

    @property
    def train_collective(self) -> str:
        """The micro-benchmark's name for the all-reduce training uses."""
        return "ring-fp16" if self.grad_compression == "fp16" else self.train_allreduce


def _join(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


# ---------------------------------------------------------------------------------------- child jobs

def worker_command(kind: str, spec: Mapping[str, Any]) -> list[str]:
    """The command every rank of a child job runs: this module, ``kind`` ("point" or "collectives")."""
    return [sys.executable, "-m", "mnn.distributed.experiments.scaling", kind, json.dumps(dict(spec), separators=(",", ":"))]


def capacity(settings: ScalingSettings, env: Mapping[str, str], cores: int | None = None) -> int:
    """How many ranks fit without sharing cores: the slots of the hosts, the SLURM
    allocation's tasks, or this machine's cores, divided by the threads per rank."""
    if settings.hosts:
        return sum(slots for _, slots in settings.hosts)
    tasks = env.get("SLURM_NTASKS", "").split("(")[0]
    if env.get("SLURM_JOB_ID") and tasks.isdigit() and not settings.mpiexec:
        return int(tasks)
    return max(1, (usable_cores() if cores is None else cores) // settings.threads_per_rank)


def launch_plan(settings: ScalingSettings, ranks: int, command: list[str], env: Mapping[str, str],
                mpi: MpiSetup) -> LaunchPlan:
    """The launcher's plan for ``command`` on ``ranks``: what ``mnn-launch -n ranks -- command``
    would run, with the same hosts, mpiexec, ssh and start timeout."""
    args = argparse.Namespace(command=command, ranks=ranks, hosts=settings.hosts, hostfile=None,
                              mpiexec=settings.mpiexec, ssh=settings.ssh, start_timeout=settings.start_timeout,
                              dry_run=False, check=False)
    return build_command(args, env, mpi)


def child_environment(settings: ScalingSettings, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the BLAS/OpenMP thread variables set to the threads per rank (the launcher
    passes variables that are set on unchanged)."""
    return {**env, **{name: str(settings.threads_per_rank) for name in THREAD_VARIABLES}}


def _run_job(settings: ScalingSettings, kind: str, ranks: int, spec: dict, env: Mapping[str, str],
             mpi: MpiSetup) -> tuple[dict, LaunchPlan]:
    """Start one child job and return rank 0's result; RuntimeError naming what failed."""
    plan = launch_plan(settings, ranks, worker_command(kind, spec), env, mpi)
    code, stdout, stderr = run_with_timeout(plan.argv, {**env, **plan.env_updates, **plan.launcher_env},
                                            settings.run_timeout, family=plan.family)
    results = [line.split(RESULT_MARKER, 1)[1] for line in stdout.splitlines() if RESULT_MARKER in line]
    if code != 0 or not results:
        why = f"no answer within {settings.run_timeout:g} s" if code is None else f"exit status {code}"
        tail = "\n".join((stderr.strip() or stdout.strip() or "(no output)").splitlines()[-15:])
        raise RuntimeError(f"the {kind} job on {ranks} rank(s) failed ({why}): {' '.join(plan.argv)}\n{tail}")
    return json.loads(results[-1]), plan


# ---------------------------------------------------------------------------------------- measuring

def _local_batches(spec: Mapping[str, Any], comm: Communicator, dtype: np.dtype) -> tuple[list, int]:
    """This rank's batches, cycled through by the timed steps, and the global batch size.

    Random data by default (the same on every run, different on every rank); with
    a dataset, the first ``n`` global batches of epoch 0 of the sampler, ``n`` up to 8.
    """
    layers = spec["layers"]
    sizes = spec["per_rank_batches"]
    global_batch = sum(sizes)
    if not spec.get("dataset"):
        rng = np.random.default_rng(1000 + comm.rank)
        local = sizes[comm.rank]
        inputs = rng.standard_normal((local, layers[0])).astype(dtype)
        return [(inputs, rng.integers(0, layers[-1], local))], global_batch

    from mnn.datasets import load_dataset
    from mnn.distributed.sampler import GlobalBatchSampler

    data = load_dataset(spec["dataset"])
    data.check_classes(layers[-1])
    features = int(np.prod(data.sample_shape))
    if features != layers[0]:
        raise ValueError(f"dataset {spec['dataset']} has {features} features per sample but --layers starts "
                         f"with {layers[0]}")
    if global_batch > len(data.train):
        raise ValueError(f"the global batch ({global_batch}) is larger than the {len(data.train)} training "
                         f"samples of {spec['dataset']}")
    sampler = GlobalBatchSampler(len(data.train), global_batch, rank=comm.rank, world_size=comm.size, seed=0,
                                 drop_last=True)
    batches = []
    for batch in sampler.batches(0):
        inputs, labels = data.train.batch(batch.indices, dtype=dtype)
        batches.append((inputs.reshape(len(inputs), -1), labels))
        if len(batches) == 8:
            break
    return batches, global_batch


def measure_point(spec: Mapping[str, Any], comm: Communicator) -> dict[str, Any]:
    """Train the MLP of ``spec`` for a fixed number of steps on ``comm``; time it (collective).

    Steps are forward, backward (with ``DataParallel``'s bucketed all-reduce)
    and an SGD update. After ``warmup`` untimed steps, the timed steps run
    between two barriers; their number is ``spec["steps"]`` or, when None,
    enough for about ``target_seconds`` (rank 0's estimate, the same on all
    ranks). Returns, on every rank, the step time, throughput, each rank's
    breakdown from ``DataParallel.timings`` and its peak resident memory.
    """
    from threadpoolctl import threadpool_limits

    from mnn.model import build_net, mlp_description
    from mnn.optim import SGD
    from mnn.distributed.data_parallel import DataParallel

    dtype = np.dtype(spec["dtype"])
    with threadpool_limits(limits=spec["threads_per_rank"]):
        net = build_net(mlp_description(list(spec["layers"])), dtype=dtype, rng=0)
        # Only a choice other than MPI's is passed: the default path is DataParallel's oldest.
        options = {} if spec["allreduce"] == "mpi" else {"allreduce": spec["allreduce"],
                                                         "grad_compression": spec["grad_compression"]}
        parallel = DataParallel(net, SGD(net, lr=0.01, momentum=0.9), comm=comm, **options)
        batches, global_batch = _local_batches(spec, comm, dtype)

        def run_steps(count: int, position: int) -> int:
            for _ in range(count):
                inputs, labels = batches[position % len(batches)]
                parallel(inputs, labels)
                parallel.backward(global_batch_size=global_batch)
                parallel.step()
                position += 1
            return position

        position = run_steps(spec["warmup"], 0)
        steps = spec["steps"]
        if steps is None:
            comm.barrier()
            probe = time.perf_counter()
            position = run_steps(3, position)
            per_step = (time.perf_counter() - probe) / 3
            steps = comm.broadcast_object(max(5, int(spec["target_seconds"] / max(per_step, 1e-6))))
        parallel.reset_timings()
        comm.barrier()
        start = time.perf_counter()
        run_steps(steps, position)
        comm.barrier()
        elapsed = max(comm.allgather(time.perf_counter() - start))  # the slowest rank's clock

    timings = comm.allgather(dict(parallel.timings))
    peak_mb = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    ms_per_step = elapsed * 1e3 / steps
    per_rank = [{"compute_ms": t["compute_s"] * 1e3 / steps,
                 "comm_ms": (t["comm_s"] - t["wait_s"]) * 1e3 / steps,
                 "wait_ms": t["wait_s"] * 1e3 / steps,
                 "optimizer_ms": t["optimizer_s"] * 1e3 / steps} for t in timings]
    breakdown = {key: float(np.mean([rank[key] for rank in per_rank])) for key in per_rank[0]}
    breakdown["other_ms"] = max(0.0, ms_per_step - sum(breakdown.values()))
    return {"ranks": comm.size, "steps": steps, "global_batch": global_batch, "ms_per_step": ms_per_step,
            "samples_per_s": global_batch / (ms_per_step * 1e-3), **breakdown,
            "grad_bytes": int(timings[0]["reduced_bytes"] // steps) if comm.size > 1
            else int(sum(bucket.nbytes for bucket in parallel.buckets)),
            "bucket_bytes": [int(bucket.nbytes) for bucket in parallel.buckets],
            "peak_rss_mb": [round(value, 1) for value in peak_mb], "per_rank": per_rank}


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of a child job's rank: ``point SPEC`` or ``collectives SPEC`` (JSON)."""
    kind, spec = argv[0], json.loads(argv[1])
    comm = get_communicator()
    with stop_all_on_error(comm):
        if kind == "point":
            result = measure_point(spec, comm)
        else:
            from threadpoolctl import threadpool_limits
            with threadpool_limits(limits=spec["threads_per_rank"]):
                result = {"records": run_collectives(comm, spec["sizes"], spec["allreduces"],
                                                     spec["seconds_per_size"])}
        if comm.rank == 0:
            print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------- the experiment

@dataclass
class Point:
    """One rank count's runs, over the turns, and their summary (medians, min-max, speed-up)."""

    ranks: int
    oversubscribed: bool
    runs: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """What :func:`run_experiment` measured and derived; :mod:`scaling_report` writes it out."""

    settings: ScalingSettings
    machine: dict
    points: list[Point] = field(default_factory=list)
    collectives: list[dict] = field(default_factory=list)
    collective_ranks: int | None = None
    fits: dict[str, AlphaBetaFit] = field(default_factory=dict)
    workload: Workload | None = None
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


_SUMMARY_KEYS = ("ms_per_step", "samples_per_s", "compute_ms", "comm_ms", "wait_ms", "optimizer_ms", "other_ms")


def summarise(points: list[Point]) -> None:
    """Fill each point's summary: median, min and max over the turns of every measure, and
    the speed-up and efficiency against the smallest rank count, turn by turn (a turn's
    runs ran side by side, so their ratio cancels the machine's slow drifts)."""
    baseline = min(points, key=lambda point: point.ranks)
    for point in points:
        summary = {"ranks": point.ranks, "oversubscribed": point.oversubscribed, "turns": len(point.runs)}
        for key in _SUMMARY_KEYS:
            values = [run[key] for run in point.runs]
            summary.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
        first = point.runs[0]
        summary.update(global_batch=first["global_batch"], steps=first["steps"], grad_bytes=first["grad_bytes"],
                       bucket_bytes=first["bucket_bytes"],
                       peak_rss_mb=max(max(run["peak_rss_mb"]) for run in point.runs))
        speedups = [run["samples_per_s"] / base["samples_per_s"] for run, base in zip(point.runs, baseline.runs)]
        for key, values in (("speedup", speedups),
                            ("efficiency", [s * baseline.ranks / point.ranks for s in speedups])):
            summary.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
        point.summary = summary


def _collective_ranks(settings: ScalingSettings, fitting: int) -> int | None:
    if settings.collective_ranks is not None:
        return settings.collective_ranks
    real = [ranks for ranks in settings.ranks if 1 < ranks <= fitting]
    return max(real) if real else (2 if fitting >= 2 else None)


def run_experiment(settings: ScalingSettings, env: Mapping[str, str],
                   log: Callable[[str], None] = print) -> Experiment:
    """Run the experiment of ``settings`` (see the module docstring); RuntimeError if a job fails.

    ``log`` gets one progress line per run. Nothing is written here.
    """
    from mnn.distributed.experiments.scaling_report import machine_description

    env = child_environment(settings, env)
    mpi = detect_mpi(env, mpiexec=settings.mpiexec)
    if mpi.error:
        raise RuntimeError(mpi.error)
    require_answers(settings.hosts, settings.ssh, settings.start_timeout, env)
    fitting = capacity(settings, env)
    experiment = Experiment(settings, machine_description(mpi, fitting))
    if not settings.collectives_only:
        _measure_points(settings, experiment, env, mpi, fitting, log)
    if settings.collectives or settings.collectives_only:
        _measure_collectives(settings, experiment, env, mpi, fitting, log)
    _build_workload(experiment)
    return experiment


def _measure_points(settings: ScalingSettings, experiment: Experiment, env: Mapping[str, str], mpi: MpiSetup,
                    fitting: int, log: Callable[[str], None]) -> None:
    experiment.points = [Point(ranks, ranks > fitting) for ranks in settings.ranks]
    total = settings.repeats * len(settings.ranks)
    for turn in range(settings.repeats):
        for index, point in enumerate(experiment.points):
            spec = {"layers": list(settings.layers), "dtype": settings.dtype,
                    "per_rank_batches": settings.per_rank_batches(point.ranks), "steps": settings.steps,
                    "warmup": settings.warmup_steps, "target_seconds": settings.target_seconds,
                    "dataset": settings.dataset, "threads_per_rank": settings.threads_per_rank,
                    "allreduce": settings.train_allreduce, "grad_compression": settings.grad_compression}
            result, plan = _run_job(settings, "point", point.ranks, spec, env, mpi)
            if turn == 0:
                experiment.commands.append(shlex.join(plan.argv))
            result.update(turn=turn, oversubscribed=point.oversubscribed, launcher=plan.launcher)
            point.runs.append(result)
            done = turn * len(settings.ranks) + index + 1
            marker = " (oversubscribed)" if point.oversubscribed else ""
            log(f"[{done}/{total}] turn {turn + 1}/{settings.repeats}: {point.ranks} rank(s){marker}: "
                f"{result['ms_per_step']:.2f} ms/step, {result['samples_per_s']:,.0f} samples/s "
                f"({result['steps']} steps via {plan.launcher})")
    summarise(experiment.points)


def _measure_collectives(settings: ScalingSettings, experiment: Experiment, env: Mapping[str, str],
                         mpi: MpiSetup, fitting: int, log: Callable[[str], None]) -> None:
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
    result, plan = _run_job(settings, "collectives", ranks, spec, env, mpi)
    experiment.commands.append(shlex.join(plan.argv))
    experiment.collectives = result["records"]
    experiment.collective_ranks = ranks
    if ranks > fitting:
        experiment.notes.append(f"the micro-benchmark ran on {ranks} ranks with {fitting} available: "
                                "oversubscribed, so its alpha and beta are not those of the network")
    for name, fit in _fit_collectives(experiment).items():
        log(f"  {name}: {fit.describe()}")


def _fit_collectives(experiment: Experiment) -> dict[str, AlphaBetaFit]:
    """α and β of each measured all-reduce, each with its own algorithm's model."""
    for name in dict.fromkeys(row["allreduce"] for row in experiment.collectives):
        rows = [row for row in experiment.collectives if row["allreduce"] == name]
        experiment.fits[name] = fit_alpha_beta([row["bytes"] for row in rows], [row["avg_us"] * 1e-6 for row in rows],
                                               experiment.collective_ranks, algorithm=name)
    return experiment.fits


def _build_workload(experiment: Experiment) -> None:
    """The cost model's workload from the 1-rank runs: compute per sample and optimizer per step."""
    single = [point for point in experiment.points if point.ranks == 1]
    if not single:
        if experiment.points:
            experiment.notes.append("no 1-rank run: the cost model needs one (add 1 to --ranks)")
        return
    experiment.workload = _workload(experiment.settings, single[0].summary)


def _workload(settings: ScalingSettings, one_rank: Mapping[str, Any]) -> Workload:
    """The workload of a 1-rank run (or the median of several). Everything but the optimizer
    counts as compute, so that the model reproduces that run exactly."""
    return Workload(f"MLP {'-'.join(map(str, settings.layers))}",
                    compute_s_per_sample=(one_rank["ms_per_step"] - one_rank["optimizer_ms"]) * 1e-3
                    / one_rank["global_batch"],
                    optimizer_s=one_rank["optimizer_ms"] * 1e-3, bucket_bytes=tuple(one_rank["bucket_bytes"]))


def model_networks(experiment: Experiment) -> list[Network]:
    """The networks the cost model predicts with: α and β fitted here (one per measured
    all-reduce), then the settings' presets or --alpha/--beta."""
    local = [Network(f"here ({name} fit)", fit.alpha, fit.beta,
                     f"fitted to this machine's {name} all-reduce on {fit.ranks} ranks: {fit.describe()}")
             for name, fit in experiment.fits.items()]
    return local + list(experiment.settings.networks)


def _per_rank_batch(settings: ScalingSettings, ranks: int) -> float:
    # Strong scaling: the largest shard sets the pace of a step.
    return max(settings.per_rank_batches(ranks))


def predict_points(experiment: Experiment) -> list[dict]:
    """The cost model's step time for each measured point beside the measured one (Eq. 7 of
    :mod:`costmodel`, with the α and β fitted here to the all-reduce that training uses).

    Turn by turn, as the speed-up: each turn's prediction starts from that turn's 1-rank
    run, so the machine's drifts cancel; the median prediction and error are reported,
    with the errors' min and max.
    """
    name = experiment.settings.train_collective
    fit = experiment.fits.get(name)
    single = [point for point in experiment.points if point.ranks == 1]
    if fit is None or not single:
        return []
    network = Network(f"here ({name} fit)", fit.alpha, fit.beta, "fitted here")
    rows = []
    for point in experiment.points:
        batch = _per_rank_batch(experiment.settings, point.ranks)
        predicted, errors = [], []
        for run, base in zip(point.runs, single[0].runs):
            predicted.append(step_time(_workload(experiment.settings, base), point.ranks, batch, network, name) * 1e3)
            errors.append((predicted[-1] - run["ms_per_step"]) / run["ms_per_step"])
        rows.append({"ranks": point.ranks, "oversubscribed": point.oversubscribed,
                     "predicted_ms": statistics.median(predicted), "measured_ms": point.summary["ms_per_step"],
                     "measured_min_ms": point.summary["ms_per_step_min"],
                     "measured_max_ms": point.summary["ms_per_step_max"], "error": statistics.median(errors),
                     "error_min": min(errors), "error_max": max(errors), "turn_errors": errors})
    return rows


def project(experiment: Experiment, workload: Workload | None = None) -> list[dict]:
    """Predicted step time, samples/s and efficiency for p = 1, 2, 4, ... up to the settings'
    largest, for every network of :func:`model_networks`: the presets with both all-reduce
    models, each fit with its own."""
    workload = workload or experiment.workload
    if workload is None:
        return []
    settings = experiment.settings
    fitted = {f"here ({name} fit)": name for name in experiment.fits}
    rows = []
    for network in model_networks(experiment):
        # A fit holds its own algorithm's constants: project it with that algorithm only.
        for algorithm in [fitted[network.name]] if network.name in fitted else ALGORITHMS:
            for ranks in projection_ranks(settings.max_projected_ranks):
                if settings.mode == "weak":
                    batch = settings.per_rank_batch
                    value = efficiency(workload, ranks, network, algorithm, per_rank_batch=batch)
                elif ranks > settings.global_batch:
                    continue  # fewer samples than ranks: not a step anyone would run
                else:
                    batch = settings.global_batch / ranks
                    value = efficiency(workload, ranks, network, algorithm, global_batch=settings.global_batch)
                seconds = step_time(workload, ranks, batch, network, algorithm)
                rows.append({"workload": workload.name, "network": network.name, "algorithm": algorithm,
                             "ranks": ranks, "per_rank_batch": batch, "step_ms": seconds * 1e3,
                             "samples_per_s": ranks * batch / seconds, "efficiency": value})
    return rows


def load_experiment(folder: str | Path, networks: list[Network] | None = None,
                    max_projected_ranks: int | None = None, out: str | Path | None = None) -> Experiment:
    """An experiment as ``folder/results.jsonl`` holds it, to report or project again without
    measuring: the points are summarised and α, β fitted anew from the stored runs.
    ``networks``, ``max_projected_ranks`` and ``out`` replace the stored settings' own.
    ValueError when the file is missing or not a results.jsonl."""
    path = Path(folder) / "results.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ValueError(f"--from {folder}: cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--from {folder}: {path} is not JSON lines ({error})") from None
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        by_kind.setdefault(record.pop("kind", None), []).append(record)
    if not by_kind.get("settings") or not by_kind.get("machine"):
        raise ValueError(f"--from {folder}: {path} holds no settings and machine records: not written by mnn-scaling")
    stored = by_kind["settings"][0]
    fields = {name: value for name, value in stored.items()
              if name in ScalingSettings.__dataclass_fields__ and name not in ("networks", "out")}
    if fields.get("hosts"):
        fields["hosts"] = [tuple(host) for host in fields["hosts"]]
    fields["layers"] = tuple(fields.get("layers", _DEFAULT_LAYERS))
    settings = ScalingSettings(**fields, out=Path(out if out is not None else folder),
                               networks=networks if networks is not None else
                               [NETWORKS[name] for name in stored.get("networks", []) if name in NETWORKS])
    if max_projected_ranks is not None:
        settings.max_projected_ranks = max_projected_ranks
    experiment = Experiment(settings, by_kind["machine"][0])
    runs = by_kind.get("run", [])
    experiment.points = [Point(ranks, any(run["oversubscribed"] for run in mine), mine)
                         for ranks in settings.ranks if (mine := [run for run in runs if run["ranks"] == ranks])]
    if experiment.points:
        summarise(experiment.points)
    experiment.collectives = by_kind.get("collective", [])
    if experiment.collectives:
        experiment.collective_ranks = experiment.collectives[0]["ranks"]
        _fit_collectives(experiment)
    experiment.commands = [record["command"] for record in by_kind.get("command", [])]
    experiment.notes = [record["text"] for record in by_kind.get("note", []) if not record["text"].startswith("plots")]
    _build_workload(experiment)
    return experiment


def settings_record(settings: ScalingSettings) -> dict:
    """The settings as plain JSON values (for results.jsonl)."""
    record = asdict(settings)
    record["out"] = str(settings.out)
    record["networks"] = [network.name for network in settings.networks]
    return record


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
