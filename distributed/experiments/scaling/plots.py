"""The plots of a scaling experiment, drawn with matplotlib (the optional extra ``plot``).

``speedup.png`` (with the ideal line), ``efficiency.png``, ``breakdown.png`` (the
step split into compute, communication, wait, optimizer and the rest, per rank
count; the legend beside the bars), ``collectives.png`` (all-reduce latency and
bus bandwidth against size in B/KiB/MiB, with the fitted α–β line) and
``model.png`` (predicted against measured, and the projections to 1024 ranks:
a colour per network, a line style per all-reduce, a legend for each). Medians
with min–max error bars; oversubscribed points are hollow red markers and
hatched bars, labelled as such.

Import this module only when matplotlib is installed (``scaling_report`` checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mnn.distributed.experiments.costmodel import Network

import matplotlib

matplotlib.use("Agg")  # files only, never a window; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

from mnn.distributed.experiments.scaling.settings import STEP_PARTS, Experiment, model_networks  # noqa: E402

__all__ = ["ALGORITHM_STYLES", "draw_all", "format_bytes", "size_ticks", "projection_styles"]

_DPI = 100
_OVER = {"marker": "o", "markerfacecolor": "none", "color": "tab:red", "linestyle": "none"}
#: model.png's projection: a line style per all-reduce, a colour per network (this machine first, in black).
ALGORITHM_STYLES = {"mpi": "-", "ring": "--", "ring-fp16": ":"}
_NETWORK_COLORS = ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
_THIS_MACHINE = "this machine (α, β fitted to each all-reduce)"


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
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")  # "tight": legends placed beside an axes stay in
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
    figure, axes = plt.subplots(figsize=(8, 4))
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
    # Beside the bars, not over them; top to bottom as the parts are stacked.
    handles, names = axes.get_legend_handles_labels()
    axes.legend(handles[::-1], names[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
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
    major, minor = size_ticks([row["bytes"] for row in experiment.collectives])
    for axes in (latency, bandwidth):
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_locator(FixedLocator(major))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda size, _: format_bytes(size)))
        axes.xaxis.set_minor_locator(FixedLocator(minor))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("message size")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    latency.set_yscale("log")
    latency.set_ylabel("latency per all-reduce (µs; band: min–max over ranks)")
    bandwidth.set_ylabel("bus bandwidth (GB/s)")
    figure.suptitle(f"all-reduce on {experiment.collective_ranks} ranks", fontsize=10)
    return _save(figure, path)


def format_bytes(size: float) -> str:
    """``size`` bytes in binary units, as a tick label: ``4 B``, ``1 KiB``, ``1.5 KiB``, ``64 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:g} {unit}"
        size /= 1024
    return f"{size:g} TiB"


def size_ticks(sizes: Sequence[int], most: int = 7) -> tuple[list[int], list[int]]:
    """The major ticks (labelled, at most ``most``) and the minor ones (every power of two)
    of a base-2 axis over ``sizes``: majors every k-th power of two down from the largest size,
    k as small as ``most`` allows, so that 4 B … 64 MiB reads 4 B, 64 B, 1 KiB, … 64 MiB."""
    if most < 2:
        raise ValueError(f"size_ticks needs room for at least 2 labelled ticks, got most={most}")
    low, high = (max(1, int(size)).bit_length() - 1 for size in (min(sizes), max(sizes)))
    step = max(1, -(-(high - low) // (most - 1)))
    return [2**k for k in range(high, low - 1, -step)][::-1], [2**k for k in range(low, high + 1)]


def projection_styles(projections: Sequence[dict], networks: Sequence[Network],
                      fitted: Sequence[str]) -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, str]]:
    """How model.png tells its projection lines apart: ``(colour, line style)`` for each
    ``(network, all-reduce)`` of ``projections``, and the colour of each network's legend label.

    A line style per all-reduce (:data:`ALGORITHM_STYLES`), a colour per network. The
    networks named in ``fitted`` (α and β fitted here, one per all-reduce) are one network,
    this machine, in black; the others are labelled with their α and bandwidth."""
    described = {network.name: network for network in networks}
    colors: dict[str, str] = {}
    lines: dict[tuple[str, str], tuple[str, str]] = {}
    for row in projections:
        network = described.get(row["network"])
        if row["network"] in fitted:
            label, color = _THIS_MACHINE, "black"
        else:
            label = row["network"] if network is None else (
                f"{network.name}: α {network.alpha * 1e6:.3g} µs, {1 / network.beta / 1e9:.3g} GB/s")
            color = f"C{sum(name != _THIS_MACHINE for name in colors)}"
        color = colors.setdefault(label, color)
        lines.setdefault((row["network"], row["algorithm"]), (color, ALGORITHM_STYLES.get(row["algorithm"], "-.")))
    return lines, colors


def _model_plot(experiment: Experiment, predictions: list[dict], projections: list[dict], path: Path) -> Path:
    figure, (measured, projected) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(1, 1.3))
    if predictions:
        _measured_panel(measured, predictions)
    _projection_panel(projected, experiment, projections)
    return _save(figure, path)


def _measured_panel(measured, predictions: list[dict]) -> None:
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


def _projection_panel(projected, experiment: Experiment, projections: list[dict]) -> None:
    networks = model_networks(experiment)  # the fitted ones first, one per all-reduce measured
    fitted = [network.name for network in networks[:len(experiment.fits)]]
    lines, colors = projection_styles(projections, networks, fitted)
    for (network, algorithm), (color, linestyle) in lines.items():
        rows = [row for row in projections if row["network"] == network and row["algorithm"] == algorithm]
        projected.plot([row["ranks"] for row in rows], [row["efficiency"] * 100 for row in rows],
                       linestyle=linestyle, color=color, linewidth=1.6)
    projected.set_xscale("log", base=2)
    projected.xaxis.set_major_formatter(FuncFormatter(lambda ranks, _: f"{ranks:g}"))  # 1024, not 2^10
    projected.set_ylim(0, 105)
    projected.set_xlabel("ranks")
    projected.set_ylabel(f"predicted {experiment.settings.mode}-scaling efficiency (%)")
    projected.set_title(f"projection: {experiment.workload.name}", fontsize=10)
    projected.grid(alpha=0.3, which="both")
    # Two legends beside the panel: the colours name the networks, the line styles the all-reduces.
    drawn = {algorithm for _, algorithm in lines}
    algorithms = [name for name in ALGORITHM_STYLES if name in drawn] + sorted(drawn - set(ALGORITHM_STYLES))
    by_network = projected.legend([Line2D([], [], color=color, linewidth=3) for color in colors.values()],
                                  list(colors), title="network (colour)", fontsize=8, title_fontsize=8,
                                  loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, alignment="left")
    projected.add_artist(by_network).set_clip_on(False)  # add_artist clips to the axes: out of savefig's "tight"
    projected.legend([Line2D([], [], color="gray", linestyle=ALGORITHM_STYLES.get(name, "-."), linewidth=1.6)
                      for name in algorithms], list(algorithms), title="all-reduce (line style)", fontsize=8,
                     title_fontsize=8, loc="lower left", bbox_to_anchor=(1.02, 0), borderaxespad=0,
                     alignment="left", handlelength=3)
