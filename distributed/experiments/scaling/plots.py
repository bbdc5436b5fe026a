"""The plots of a scaling experiment, drawn with matplotlib (the optional extra ``plot``).

``speedup.png`` (with the ideal line), ``efficiency.png``, ``breakdown.png`` (the
step split into compute, communication, wait, optimizer and the rest, per rank
count), ``collectives.png`` (all-reduce latency and bus bandwidth against size,
with the fitted α–β line) and ``model.png`` (predicted against measured, and
the projections to 1024 ranks). Medians with min–max error bars; oversubscribed
points are hollow red markers and hatched bars, labelled as such.

Import this module only when matplotlib is installed (``scaling_report`` checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from mnn.distributed.experiments.scaling.settings import STEP_PARTS, Experiment  # noqa: E402

__all__ = ["draw_all"]

_DPI = 100
_OVER = {"marker": "o", "markerfacecolor": "none", "color": "tab:red", "linestyle": "none"}


def draw_all(experiment: Experiment, predictions: list[dict], projections: list[dict], out: Path) -> list[Path]:
    """Draw every plot that ``experiment`` has data for into ``out``; return the files."""
    written = []
    if experiment.points:
        written += [_ratio_plot(experiment, "speedup", out / "speedup.png"),
                    _ratio_plot(experiment, "efficiency", out / "efficiency.png"),
                    _breakdown_plot(experiment, out / "breakdown.png")]
    if experiment.collectives:
        written.append(_collectives_plot(experiment, out / "collectives.png"))
    if projections:
        written.append(_model_plot(experiment, predictions, projections, out / "model.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)
    return path


def _errorbar(axes, points: Sequence, key: str, scale: float, **style) -> None:
    if not points:
        return
    ranks = [point.ranks for point in points]
    median = [point.summary[key] * scale for point in points]
    low = [(point.summary[key] - point.summary[f"{key}_min"]) * scale for point in points]
    high = [(point.summary[f"{key}_max"] - point.summary[key]) * scale for point in points]
    axes.errorbar(ranks, median, yerr=[low, high], capsize=4, **style)


def _ratio_plot(experiment: Experiment, key: str, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    points = experiment.points
    real = [point for point in points if not point.oversubscribed]
    over = [point for point in points if point.oversubscribed]
    baseline = min(point.ranks for point in points)
    ranks = [point.ranks for point in points]
    scale = 100 if key == "efficiency" else 1
    ideal = [scale if key == "efficiency" else r / baseline for r in ranks]
    axes.plot(ranks, ideal, "--", color="gray", label="ideal")
    _errorbar(axes, real, key, scale, marker="o", color="tab:blue", label="measured (median, min–max)")
    _errorbar(axes, over, key, scale, label="oversubscribed (cores shared)", **_OVER)
    axes.set_xlabel("ranks")
    axes.set_xticks(ranks)
    axes.set_ylabel("efficiency (%)" if key == "efficiency" else f"speed-up over {baseline} rank(s)")
    if key == "efficiency":
        axes.set_ylim(0, 110)
    axes.set_title(f"{experiment.settings.mode} scaling, MLP {'-'.join(map(str, experiment.settings.layers))}",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _breakdown_plot(experiment: Experiment, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    points = experiment.points
    labels = [f"{point.ranks}" + ("\n(oversub.)" if point.oversubscribed else "") for point in points]
    bottoms = [0.0] * len(points)
    for (key, label), color in zip(STEP_PARTS, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:gray")):
        values = [point.summary[key] for point in points]
        bars = axes.bar(labels, values, bottom=bottoms, color=color, label=label)
        for bar, point in zip(bars, points):
            if point.oversubscribed:
                bar.set_hatch("//")
        bottoms = [bottom + value for bottom, value in zip(bottoms, values)]
    axes.set_xlabel("ranks")
    axes.set_ylabel("ms per step (median over turns, mean over ranks)")
    axes.set_title("where a step's time goes", fontsize=10)
    axes.legend(fontsize=7)
    return _save(figure, path)


def _collectives_plot(experiment: Experiment, path: Path) -> Path:
    figure, (latency, bandwidth) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(row["allreduce"] for row in experiment.collectives):
        rows = [row for row in experiment.collectives if row["allreduce"] == name]
        sizes = [row["bytes"] for row in rows]
        line, = latency.plot(sizes, [row["avg_us"] for row in rows], "o-", markersize=3, label=f"{name} (avg)")
        latency.fill_between(sizes, [row["min_us"] for row in rows], [row["max_us"] for row in rows],
                             color=line.get_color(), alpha=0.2)
        fit = experiment.fits.get(name)
        if fit is not None:
            latency.plot(sizes, [fit.predict(size) * 1e6 for size in sizes], ":", color=line.get_color(),
                         label=f"{name} α–β fit (R² {fit.r_squared:.3f})")
        bandwidth.plot(sizes, [row["busbw_GBps"] for row in rows], "o-", markersize=3, color=line.get_color(),
                       label=name)
    for axes in (latency, bandwidth):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("message size (bytes)")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    latency.set_yscale("log")
    latency.set_ylabel("latency per all-reduce (µs; band: min–max over ranks)")
    bandwidth.set_ylabel("bus bandwidth (GB/s)")
    figure.suptitle(f"all-reduce on {experiment.collective_ranks} ranks", fontsize=10)
    return _save(figure, path)


def _model_plot(experiment: Experiment, predictions: list[dict], projections: list[dict], path: Path) -> Path:
    figure, (measured, projected) = plt.subplots(1, 2, figsize=(11, 4.2))
    if predictions:
        for row_kind, style in ((False, {"marker": "o", "color": "tab:blue"}), (True, _OVER)):
            rows = [row for row in predictions if row["oversubscribed"] == row_kind]
            if not rows:
                continue
            label = "oversubscribed" if row_kind else "measured (median, min–max)"
            measured.errorbar([row["ranks"] for row in rows], [row["measured_ms"] for row in rows],
                              yerr=[[row["measured_ms"] - row["measured_min_ms"] for row in rows],
                                    [row["measured_max_ms"] - row["measured_ms"] for row in rows]],
                              capsize=4, label=label, **style)
        measured.plot([row["ranks"] for row in predictions], [row["predicted_ms"] for row in predictions], "x--",
                      color="black", label="cost model (α, β fitted here)")
        measured.set_xticks([row["ranks"] for row in predictions])
        measured.set_xlabel("ranks")
        measured.set_ylabel("ms per step")
        measured.set_title("predicted against measured, this machine", fontsize=10)
        measured.legend(fontsize=8)
        measured.grid(alpha=0.3)
    styles = {"ring": "--", "mpi": "-", "ring-fp16": ":"}
    colors = {}
    for row in projections:
        colors.setdefault(row["network"], f"C{len(colors)}")
    for (network, algorithm) in dict.fromkeys((row["network"], row["algorithm"]) for row in projections):
        rows = [row for row in projections if row["network"] == network and row["algorithm"] == algorithm]
        projected.plot([row["ranks"] for row in rows], [row["efficiency"] * 100 for row in rows],
                       styles[algorithm], color=colors[network], label=f"{network}, {algorithm}")
    projected.set_xscale("log", base=2)
    projected.set_ylim(0, 105)
    projected.set_xlabel("ranks")
    projected.set_ylabel(f"predicted {experiment.settings.mode}-scaling efficiency (%)")
    projected.set_title(f"projection: {experiment.workload.name}", fontsize=10)
    projected.grid(alpha=0.3, which="both")
    projected.legend(fontsize=7, ncol=2)
    return _save(figure, path)
