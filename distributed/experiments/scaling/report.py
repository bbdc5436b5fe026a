"""What a scaling experiment writes: results.csv, results.jsonl, report.md and the plots.

``results.csv`` has one row per rank count (medians, min and max over the
turns); ``results.jsonl`` has every run, every point, the micro-benchmark, the
fits, the predictions and the projections, one JSON object per line with a
``kind``; ``report.md`` has the tables, the machine and every assumption of the
cost model. The plots need matplotlib (the extra ``plot``); without it
they are skipped and the report says so. Oversubscribed rank counts (more ranks
than cores) are kept apart everywhere: their own table, hollow red markers and
hatched bars.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from mnn.distributed.environment import install_hint
from mnn.distributed.experiments.costmodel import (
    NETWORKS,
    Workload,
    bandwidth_bound_efficiency,
    describe_algorithm,
)
from mnn.distributed.experiments.scaling.settings import (
    Experiment,
    model_networks,
    predict_points,
    project,
    settings_record,
)

__all__ = ["write_outputs", "plots_available", "REPORT_RANKS", "COMPUTE_FACTOR"]

#: Rank counts shown in the report's projection table (the CSV has all powers of two).
REPORT_RANKS = (2, 8, 64, 512, 1024)
#: The "large-compute" comparison: the same gradient with this many times the compute per sample.
COMPUTE_FACTOR = 16
_CSV_COLUMNS = ("ranks", "oversubscribed", "turns", "global_batch", "steps", "samples_per_s", "samples_per_s_min",
                "samples_per_s_max", "speedup", "speedup_min", "speedup_max", "efficiency", "efficiency_min",
                "efficiency_max", "ms_per_step", "ms_per_step_min", "ms_per_step_max", "compute_ms", "comm_ms",
                "wait_ms", "optimizer_ms", "other_ms", "grad_bytes", "peak_rss_mb")



def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_outputs(experiment: Experiment, log: Callable[[str], None] = print) -> list[Path]:
    """Write every output of ``experiment`` into its settings' ``out`` folder; return the paths."""
    out = Path(experiment.settings.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = predict_points(experiment)
    projections = project(experiment)
    written = [_write_jsonl(experiment, predictions, projections, out / "results.jsonl")]
    if experiment.points:
        written.append(_write_csv(experiment, out / "results.csv"))
    if projections:
        written.append(_write_rows(projections, out / "projection.csv"))
    if experiment.collectives:
        written.append(_write_rows(experiment.collectives, out / "collectives.csv"))
    if not plots_available():
        experiment.notes.append(f"plots skipped: matplotlib is not installed ({install_hint('plot')})")
        log(experiment.notes[-1])
        return [_write_report(experiment, predictions, projections, out / "report.md", written)] + written
    from mnn.distributed.experiments.scaling import plots as scaling_plots

    try:
        written += scaling_plots.draw_all(experiment, predictions, projections, out)
    finally:  # the tables are worth keeping even if a plot fails
        written.insert(0, _write_report(experiment, predictions, projections, out / "report.md", written))
    return written


def _write_jsonl(experiment: Experiment, predictions: list[dict], projections: list[dict], path: Path) -> Path:
    records = [{"kind": "settings", **settings_record(experiment.settings)},
               {"kind": "machine", **experiment.machine}]
    order = {point.ranks: index for index, point in enumerate(experiment.points)}
    runs = sorted((run for point in experiment.points for run in point.runs),
                  key=lambda run: (run["turn"], order[run["ranks"]]))  # the order they ran in
    records += [{"kind": "run", **run} for run in runs]
    records += [{"kind": "point", **point.summary} for point in experiment.points]
    records += [{"kind": "collective", **row} for row in experiment.collectives]
    records += [{"kind": "fit", "allreduce": name, "alpha_s": fit.alpha, "alpha_se_s": fit.alpha_se,
                 "beta_s_per_byte": fit.beta, "beta_se_s_per_byte": fit.beta_se, "r_squared": fit.r_squared,
                 "ranks": fit.ranks, "model": fit.algorithm} for name, fit in experiment.fits.items()]
    records += [{"kind": "prediction", **row} for row in predictions]
    records += [{"kind": "projection", **row} for row in projections]
    records += [{"kind": "command", "command": command} for command in experiment.commands]
    records += [{"kind": "note", "text": note} for note in experiment.notes]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _write_csv(experiment: Experiment, path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for point in experiment.points:
            writer.writerow({key: _csv_value(point.summary[key]) for key in _CSV_COLUMNS})
    return path


def _write_rows(rows: Sequence[dict], path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: _csv_value(value) for key, value in row.items()} for row in rows)
    return path


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------- report.md

def _spread(summary: dict, key: str, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    median, low, high = (summary[name] * scale for name in (key, f"{key}_min", f"{key}_max"))
    return f"{median:,.{digits}f}{unit} ({low:,.{digits}f}–{high:,.{digits}f})"


def _points_table(points: Sequence) -> list[str]:
    lines = ["| ranks | samples/s | speed-up | efficiency | ms/step | compute | comm | wait | optimizer | other "
             "| gradient MB | peak RSS MB/rank |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for point in points:
        s = point.summary
        lines.append(f"| {s['ranks']} | {_spread(s, 'samples_per_s', digits=0)} | {_spread(s, 'speedup', unit='×')} "
                     f"| {_spread(s, 'efficiency', 100, 0, ' %')} | {_spread(s, 'ms_per_step')} "
                     f"| {s['compute_ms']:.2f} | {s['comm_ms']:.2f} | {s['wait_ms']:.2f} | {s['optimizer_ms']:.2f} "
                     f"| {s['other_ms']:.2f} | {s['grad_bytes'] / 1e6:.2f} | {s['peak_rss_mb']:.0f} |")
    return lines


def _machine_lines(machine: dict) -> list[str]:
    slurm = f", SLURM job {machine['slurm_job']}" if machine.get("slurm_job") else ""
    fit = ("the hosts' slots" if machine.get("hosts") else "ranks that fit without sharing a core")
    hosts = ([f"- hosts: {', '.join(machine['hosts'])} (host:slots, ranks placed in this order)"]
             if machine.get("hosts") else [])
    return [f"- date: {machine['date']}; host: {machine['host']}{slurm}",
            f"- CPU: {machine['cpu']}, {machine['cores']} cores; {fit}: {machine['ranks_that_fit']}", *hosts,
            f"- MPI: {machine['mpi_library']} (mpi4py {machine['mpi4py']}), launcher {machine['mpiexec']}",
            f"- BLAS: {machine['blas']}",
            f"- Python {machine['python']}, NumPy {machine['numpy']}, mnn {machine['mnn']}; {machine['platform']}",
            f"- command: `{machine['command']}`"]


def _collectives_lines(experiment: Experiment) -> list[str]:
    names = list(dict.fromkeys(row["allreduce"] for row in experiment.collectives))
    header = "| bytes | " + " | ".join(f"{name}: avg µs (min–max over ranks) | {name}: busbw GB/s | {name}: fit error"
                                       for name in names) + " |"
    lines = [f"On {experiment.collective_ranks} ranks, float32 in place; OSU osu_allreduce's method "
             "(warm-up, then timed iterations with a barrier between them; each rank's mean, then average, "
             "min and max over the ranks). busbw = bytes / time × 2(p−1)/p.", "", header,
             "| ---: |" + " ---: | ---: | ---: |" * len(names)]
    by_size: dict[int, dict[str, dict]] = {}
    for row in experiment.collectives:
        by_size.setdefault(row["bytes"], {})[row["allreduce"]] = row
    for size, rows in by_size.items():
        cells = []
        for name in names:
            row = rows[name]
            fit = experiment.fits.get(name)
            residual = fit.relative_residuals[fit.sizes.index(size)] if fit and size in fit.sizes else None
            error = f"{-residual * 100:+.0f} %" if residual is not None else ""
            cells.append(f"{row['avg_us']:.2f} ({row['min_us']:.2f}–{row['max_us']:.2f}) "
                         f"| {row['busbw_GBps']:.3f} | {error}")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{name}**: {fit.describe()}" for name, fit in experiment.fits.items()]
    lines.append("- fit error: (fitted − measured) / measured at each size")
    return lines


def _model_lines(experiment: Experiment, predictions: list[dict], projections: list[dict]) -> list[str]:
    settings, workload = experiment.settings, experiment.workload
    batch = (f"{settings.per_rank_batch} samples per rank (weak scaling)" if settings.mode == "weak"
             else f"a global batch of {settings.global_batch} split over the ranks (strong scaling)")
    lines = ["Every assumption of the numbers below (the math: `mnn.distributed.experiments.costmodel`):", "",
             f"- step time T(p) = b·t_s + t_o + Σ_k T_allreduce(p, n_k), with {batch};",
             f"- t_s = {workload.compute_s_per_sample * 1e6:.3f} µs compute per sample and t_o = "
             f"{workload.optimizer_s * 1e3:.3f} ms optimizer per step, from the median 1-rank run (everything "
             "but the optimizer counts as compute, so the model reproduces 1 rank); t_s is taken as the same "
             "at every batch size (at small per-rank batches BLAS is slower, so strong-scaling projections "
             "are optimistic);",
             f"- buckets n_k = {', '.join(f'{n / 1e6:.3f} MB' for n in workload.bucket_bytes)} "
             f"({workload.gradient_bytes / 1e6:.2f} MB of gradients), one all-reduce each, none of it hidden "
             "behind backward (an upper bound on the step time);",
             f"- \"mpi\": {describe_algorithm('mpi')};",
             f"- \"ring\": {describe_algorithm('ring')};",
             "- ranks never share a core or a link; the network is flat (no slower links between racks).", ""]
    lines += ["Networks:", ""] + [f"- {network.describe()}" for network in model_networks(experiment)] + [""]
    if predictions:
        name = settings.train_collective
        lines += [f"**Predicted against measured** (α, β fitted here to the {name} all-reduce that training "
                  "used; turn by turn, each turn's prediction from that turn's 1-rank run; error = (predicted − "
                  "measured) / measured, median over the turns and min–max; the step split into its "
                  "all-reduces, measured as comm + wait, and the rest, compute and optimizer):", "",
                  "| ranks | measured ms/step (min–max) | predicted ms/step | error (min–max) "
                  "| all-reduces: measured | predicted | rest: measured | predicted |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in predictions:
            marker = " (oversubscribed: cores shared, not modelled)" if row["oversubscribed"] else ""
            lines.append(f"| {row['ranks']}{marker} | {row['measured_ms']:.2f} ({row['measured_min_ms']:.2f}–"
                         f"{row['measured_max_ms']:.2f}) | {row['predicted_ms']:.2f} | {row['error'] * 100:+.1f} % "
                         f"({row['error_min'] * 100:+.0f} to {row['error_max'] * 100:+.0f} %) "
                         f"| {row['measured_allreduce_ms']:.2f} | {row['predicted_allreduce_ms']:.2f} "
                         f"| {row['measured_rest_ms']:.2f} | {row['predicted_rest_ms']:.2f} |")
        lines.append("")
    if projections:
        shown = [ranks for ranks in REPORT_RANKS if ranks <= settings.max_projected_ranks]
        lines += [f"**Projected efficiency** ({'weak' if settings.mode == 'weak' else 'strong'} scaling; every "
                  "power of two up to the largest is in projection.csv):", "",
                  "| network | all-reduce | " + " | ".join(f"p = {ranks}" for ranks in shown) + " |",
                  "| --- | --- |" + " ---: |" * len(shown)]
        cells: dict[tuple[str, str], dict[int, float]] = {}
        for row in projections:
            cells.setdefault((row["network"], row["algorithm"]), {})[row["ranks"]] = row["efficiency"]
        for (network, algorithm), values in cells.items():
            lines.append(f"| {network} | {algorithm} | "
                         + " | ".join(f"{values[r] * 100:.0f} %" if r in values else "–" for r in shown) + " |")
        lines.append("")
        lines += _two_kinds_lines(experiment, workload)
    return lines


def _two_kinds_lines(experiment: Experiment, workload: Workload) -> list[str]:
    """The measured net beside one with the same gradient and COMPUTE_FACTOR times the compute."""
    settings = experiment.settings
    batch = settings.per_rank_batch if settings.mode == "weak" else settings.global_batch
    large = workload.scaled_compute(COMPUTE_FACTOR, f"{COMPUTE_FACTOR}× the compute, same gradient")
    largest = settings.max_projected_ranks
    lines = [f"**Why a small-compute, large-gradient net scales worse** (weak scaling at {batch} samples per "
             f"rank, p = {largest}, MPI's algorithm; E∞ = 1 / (1 + 2β n / (b t_s)), Eq. (9)):", "",
             "| workload | gradient bytes per compute second | " + " | ".join(
                 f"{name}: E({largest}) / E∞" for name in NETWORKS) + " |",
             "| --- | ---: |" + " ---: |" * len(NETWORKS)]
    from mnn.distributed.experiments.costmodel import efficiency

    for kind in (workload, large):
        compute = batch * kind.compute_s_per_sample
        cells = [f"{efficiency(kind, largest, network, 'mpi', per_rank_batch=batch) * 100:.0f} % / "
                 f"{bandwidth_bound_efficiency(kind.gradient_bytes, compute, network.beta) * 100:.0f} %"
                 for network in NETWORKS.values()]
        lines.append(f"| {kind.name} | {kind.gradient_bytes / compute / 1e6:,.1f} MB/s | " + " | ".join(cells) + " |")
    lines += ["", "The bandwidth term of an all-reduce tends to 2nβ however many ranks there are, so what decides "
              "the efficiency is the ratio of gradient bytes to compute seconds per step: the same all-reduce "
              f"behind {COMPUTE_FACTOR}× the compute costs {COMPUTE_FACTOR}× less of the step.", ""]
    return lines


def _write_report(experiment: Experiment, predictions: list[dict], projections: list[dict], path: Path,
                  written: list[Path]) -> Path:
    settings = experiment.settings
    title = ("All-reduce micro-benchmark" if settings.collectives_only
             else f"Scaling experiment: {settings.describe()}")
    lines = [f"# {title}", "", "## Machine", ""] + _machine_lines(experiment.machine) + [""]
    real = [point for point in experiment.points if not point.oversubscribed]
    over = [point for point in experiment.points if point.oversubscribed]
    if experiment.points:
        baseline = min(point.ranks for point in experiment.points)
        lines += ["## Results", "",
                  f"Medians over {settings.repeats} turns, min–max in brackets; the rank counts took turns "
                  f"({', '.join(str(point.ranks) for point in experiment.points)}, again ...). Speed-up and "
                  f"efficiency are taken turn by turn against the {baseline}-rank run of the same turn; "
                  "efficiency = speed-up × " + f"{baseline} / ranks. Step times in ms, per rank (mean over ranks).",
                  ""]
        lines += _points_table(real) + [""]
        if over:
            lines += ["### Oversubscribed (more ranks than cores: ranks share cores, so this is not scaling)", ""]
            lines += _points_table(over) + [""]
    if experiment.collectives:
        lines += ["## All-reduce micro-benchmark", ""] + _collectives_lines(experiment) + [""]
    if experiment.workload is not None and (predictions or projections):
        lines += ["## Cost model", ""] + _model_lines(experiment, predictions, projections)
    images = [item for item in written if item.suffix == ".png"]
    if images:
        lines += ["## Plots", ""] + [f"![{item.stem}]({item.name})" for item in images] + [""]
    if experiment.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in experiment.notes] + [""]
    if experiment.commands:
        lines += ["## Child jobs (first turn)", ""] + [f"    {command}" for command in experiment.commands] + [""]
    path.write_text("\n".join(lines))
    return path
