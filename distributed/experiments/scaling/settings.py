"""Scaling experiments: what one is, what it measured, and what the cost model makes of it.

An experiment measures throughput, speed-up and efficiency of data-parallel
training against the number of ranks. ``mnn-scaling`` (``mnn.scripts.scaling``)
parses the command line into :class:`ScalingSettings`; the parts are:

* this module: the settings, the measured :class:`Point` of each rank count
  and the :class:`Experiment` holding them, their summaries (:func:`summarise`:
  medians over the turns with min and max, the speed-up of each turn against
  the baseline of the *same* turn), the cost model's prediction of the
  measured points and projection to more ranks, and :func:`load_experiment`,
  which reads a stored experiment back;
* :mod:`~mnn.distributed.experiments.scaling.driver`: runs an experiment, each
  rank count one child job started through the launcher's plan, the rank
  counts taking turns (1, 2, 1, 2, ...) so a machine that slows down for a
  while slows every count alike;
* :mod:`~mnn.distributed.experiments.scaling.worker`: what each rank of a
  child job runs;
* :mod:`~mnn.distributed.experiments.scaling.report` and
  :mod:`~mnn.distributed.experiments.scaling.plots`: ``results.csv``,
  ``results.jsonl``, ``report.md`` and the plots.

A rank count larger than the cores available (or the slots of the hosts) is
run, but its points are marked *oversubscribed*: ranks then share cores, so
its numbers say nothing about scaling and are kept apart in every table and plot.

Each rank uses one BLAS thread (``--threads-per-rank``): threads beyond a
rank's core would compete with the other ranks and blur the scaling.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mnn.distributed.experiments.collectives import ALLREDUCE_NAMES, message_sizes
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
from mnn.distributed.experiments.timing import Spread
from mnn.distributed.launch import LaunchSettings

__all__ = ["MODES", "DEFAULT_RUN_TIMEOUT_S", "STEP_PARTS", "ScalingSettings", "Point", "Experiment", "summarise",
           "fit_collectives", "build_workload", "settings_record", "model_networks", "predict_points", "project",
           "load_experiment"]

MODES = ("weak", "strong")
#: Seconds one child job may run before it is stopped, unless told otherwise.
DEFAULT_RUN_TIMEOUT_S = 900.0
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
    ``notes`` go into the report as they are: what the run's surroundings were that it
    cannot see for itself (an emulated network, a machine shared with other jobs).
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
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S
    hosts: list[tuple[str, int]] | None = None
    mpiexec: str | None = None
    ssh: str | None = None
    start_timeout: float = 60.0
    notes: list[str] = field(default_factory=list)

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

    def launch_settings(self) -> LaunchSettings:
        """How the child jobs start, as mnn-launch would with these hosts, mpiexec, ssh and start
        timeout (the driver adds each job's command and ranks)."""
        return LaunchSettings(hosts=self.hosts, mpiexec=self.mpiexec, ssh=self.ssh, start_timeout=self.start_timeout)

    @property
    def train_collective(self) -> str:
        """The micro-benchmark's name for the all-reduce training uses."""
        return "ring-fp16" if self.grad_compression == "fp16" else self.train_allreduce


def _join(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


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
    """What :func:`~mnn.distributed.experiments.scaling.driver.run_experiment` measured and derived
    (or :func:`load_experiment` read back); :mod:`~mnn.distributed.experiments.scaling.report` writes it out."""

    settings: ScalingSettings
    machine: dict
    points: list[Point] = field(default_factory=list)
    collectives: list[dict] = field(default_factory=list)
    collective_ranks: int | None = None
    fits: dict[str, AlphaBetaFit] = field(default_factory=dict)
    workload: Workload | None = None
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


#: The parts a step's time is split into, as the report and the plots name them.
STEP_PARTS = (("compute_ms", "compute (forward + backward)"), ("comm_ms", "communication (start, poll)"),
              ("wait_ms", "wait (exposed all-reduce, slower rank)"), ("optimizer_ms", "optimizer"),
              ("other_ms", "other (Python, barriers)"))
_SUMMARY_KEYS = ("ms_per_step", "samples_per_s", *(key for key, _ in STEP_PARTS))


def summarise(points: list[Point]) -> None:
    """Fill each point's summary: median, min and max over the turns of every measure, and
    the speed-up and efficiency against the smallest rank count, turn by turn (a turn's
    runs ran side by side, so their ratio cancels the machine's slow drifts)."""
    baseline = min(points, key=lambda point: point.ranks)
    for point in points:
        summary = {"ranks": point.ranks, "oversubscribed": point.oversubscribed, "turns": len(point.runs)}
        for key in _SUMMARY_KEYS:
            summary.update(Spread.of([run[key] for run in point.runs]).fields(key))
        first = point.runs[0]
        summary.update(global_batch=first["global_batch"], steps=first["steps"], grad_bytes=first["grad_bytes"],
                       bucket_bytes=first["bucket_bytes"],
                       peak_rss_mb=max(max(run["peak_rss_mb"]) for run in point.runs))
        speedups = [run["samples_per_s"] / base["samples_per_s"] for run, base in zip(point.runs, baseline.runs)]
        summary.update(Spread.of(speedups).fields("speedup"))
        summary.update(Spread.of([s * baseline.ranks / point.ranks for s in speedups]).fields("efficiency"))
        point.summary = summary


def fit_collectives(experiment: Experiment) -> dict[str, AlphaBetaFit]:
    """α and β of each measured all-reduce, each with its own algorithm's model."""
    for name in dict.fromkeys(row["allreduce"] for row in experiment.collectives):
        rows = [row for row in experiment.collectives if row["allreduce"] == name]
        experiment.fits[name] = fit_alpha_beta([row["bytes"] for row in rows], [row["avg_us"] * 1e-6 for row in rows],
                                               experiment.collective_ranks, algorithm=name)
    return experiment.fits


def build_workload(experiment: Experiment) -> None:
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
    with the errors' min and max. Each row also splits the step in two, so that a miss can
    be placed: the all-reduces (Eq. 1 or 4 over the buckets) against the measured comm +
    wait, and the rest (the 1-rank run's compute and optimizer) against the measured rest.
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
        allreduces_ms = sum(fit.predict(n_bytes, point.ranks) for n_bytes in single[0].summary["bucket_bytes"]) * 1e3
        measured_allreduces_ms = statistics.median(run["comm_ms"] + run["wait_ms"] for run in point.runs)
        rows.append({"ranks": point.ranks, "oversubscribed": point.oversubscribed,
                     "predicted_ms": statistics.median(predicted), "measured_ms": point.summary["ms_per_step"],
                     "predicted_allreduce_ms": allreduces_ms, "measured_allreduce_ms": measured_allreduces_ms,
                     "predicted_rest_ms": statistics.median(predicted) - allreduces_ms,
                     "measured_rest_ms": point.summary["ms_per_step"] - measured_allreduces_ms,
                     "measured_min_ms": point.summary["ms_per_step_min"],
                     "measured_max_ms": point.summary["ms_per_step_max"], **Spread.of(errors).fields("error"),
                     "turn_errors": errors})
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
        fit_collectives(experiment)
    experiment.commands = [record["command"] for record in by_kind.get("command", [])]
    experiment.notes = [record["text"] for record in by_kind.get("note", []) if not record["text"].startswith("plots")]
    build_workload(experiment)
    return experiment


def settings_record(settings: ScalingSettings) -> dict:
    """The settings as plain JSON values (for results.jsonl)."""
    record = asdict(settings)
    record["out"] = str(settings.out)
    record["networks"] = [network.name for network in settings.networks]
    return record
