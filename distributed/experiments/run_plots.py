"""Training curves of one or more runs, read from their metrics.jsonl and drawn in one PNG (``mnn-plot``).

Comparing runs (two learning rates, one rank against four) means putting their
curves side by side; metrics.jsonl already holds them (see
:mod:`~mnn.distributed.training.reporting`), so this reads nothing else. One
figure, three panels against the global step (or the samples trained on):

* the training loss of the ``train`` events (the mean since the previous one);
* the evaluation metric of the ``eval`` events: the test accuracy when every
  run has one, else the test bits per character (a text), else the test loss;
  the axis says which;
* the throughput, ``samples_per_s``.

Each run keeps one colour and one line style in every panel, so the panels read
without the legend and in grey; the legend sits under the panels, where it
covers no line, and names each run by its directory (with as many parent folders
as it takes to tell two runs of the same name apart).

:func:`load_run` reads a run and needs only the standard library, so a bad path
is told before matplotlib loads; :func:`curves_figure` and :func:`draw_curves`
import matplotlib (the optional extra ``plot``) when called: check
:func:`~mnn.distributed.experiments.scaling.report.plots_available` first.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mnn.distributed.training.config import load_toml

__all__ = ["Run", "load_run", "run_labels", "eval_metric", "curves_figure", "draw_curves", "X_AXES",
           "METRICS_NAME"]

METRICS_NAME = "metrics.jsonl"
# What --x may be: the x of every panel.
X_AXES = ("steps", "samples")
# The eval metrics in order of preference: (key in the eval event, axis label, scale).
_EVAL_METRICS = (("test_accuracy", "test accuracy (%)", 100.0),
                 ("test_bits_per_char", "test bits per character (bits)", 1.0),
                 ("test_loss", "test loss (mean per sample)", 1.0))
_LINE_STYLES = ("-", "--", "-.", ":")
_DPI = 110


@dataclass
class Run:
    """One run's curves: ``train`` and ``eval`` events in file order, and its job's global batch
    (``batch_size`` of the config.toml beside metrics.jsonl; None when there is none)."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int | None = None


def load_run(path: str | Path) -> Run:
    """Read a run directory (its metrics.jsonl) or a metrics.jsonl file.

    A line that is not a JSON object is skipped: a run still training may be
    halfway through writing its last line. A path that does not exist, a
    directory without metrics.jsonl and a file without a single ``train`` event
    are ValueErrors that say what was expected.
    """
    path = Path(path)
    metrics = path / METRICS_NAME if path.is_dir() else path
    if path.is_dir() and not metrics.is_file():
        raise ValueError(f"{str(path)!r} has no {METRICS_NAME}: expected a run directory "
                         f"(mnn-train --output DIR) or a {METRICS_NAME} file")
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist: expected a run directory or a {METRICS_NAME} file")
    try:
        text = metrics.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ValueError(f"cannot read {str(metrics)!r}: {error.strerror or error}") from None
    run = Run(metrics)
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("train", "eval") \
                and isinstance(event.get("global_step"), int):
            getattr(run, event["event"]).append(event)
    if not run.train:
        raise ValueError(f"{str(metrics)!r} has no train events: expected the {METRICS_NAME} "
                         f"that mnn-train --output writes")
    config = metrics.parent / "config.toml"
    if config.is_file():
        try:
            run.batch_size = load_toml(config).get("batch_size")
        except ValueError:  # only --x samples needs it, and says so
            pass
    return run


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's directory name, with parent folders added until no two labels are the same
    (runs/a/lr-0.1 and runs/b/lr-0.1 become a/lr-0.1 and b/lr-0.1)."""
    folders = [run.path.resolve().parent.parts for run in runs]
    for depth in range(1, max(len(parts) for parts in folders) + 1):
        labels = ["/".join(parts[-depth:]) for parts in folders]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run.path) for run in runs]  # the same file named twice


def eval_metric(runs: Sequence[Run]) -> tuple[str, str, float]:
    """(key, axis label, scale) of the eval metric every run with evaluations has: accuracy before
    bits per character before the test loss, so that runs are compared by the same measure."""
    evaluated = [run for run in runs if run.eval]
    for key, label, scale in _EVAL_METRICS:
        if all(any(_finite(event.get(key)) for event in run.eval) for run in evaluated):
            return key, label, scale
    return _EVAL_METRICS[-1]


def curves_figure(runs: Sequence[Run], x: str = "steps"):
    """The figure of ``runs``' curves against ``x`` ("steps" or "samples"); matplotlib's Figure.
    "samples" multiplies the global step by the run's batch size (from its config.toml)."""
    if x not in X_AXES:
        raise ValueError(f"x: expected one of {', '.join(X_AXES)}, got {x!r}")
    if x == "samples":
        missing = [str(run.path.parent / "config.toml") for run in runs if not isinstance(run.batch_size, int)]
        if missing:
            raise ValueError(f"--x samples needs each run's batch size from its config.toml; "
                             f"not found: {', '.join(missing)}")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window; set before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    key, eval_label, scale = eval_metric(runs)
    figure, (loss_axes, eval_axes, speed_axes) = plt.subplots(1, 3, figsize=(15, 4.6), sharex=True)
    for index, (run, label) in enumerate(zip(runs, run_labels(runs))):
        style = {"color": f"C{index % 10}", "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)],
                 "linewidth": 1.8, "label": label}
        per_step = run.batch_size if x == "samples" else 1
        _plot(loss_axes, run.train, "loss", per_step, 1.0, style)
        _plot(eval_axes, run.eval, key, per_step, scale, style)
        _plot(speed_axes, run.train, "samples_per_s", per_step, 1.0, style)
    x_label = "global step (optimizer updates)" if x == "steps" else "samples trained on (global step × batch size)"
    for axes, y_label, title in ((loss_axes, "training loss (mean since the previous point)", "training loss"),
                                 (eval_axes, eval_label, "evaluation on the test split"),
                                 (speed_axes, "throughput (samples / s, all ranks)", "training speed")):
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.set_title(title, fontsize=11)
        axes.grid(alpha=0.3, which="both")
    if not eval_axes.get_lines():
        eval_axes.text(0.5, 0.5, "no eval events", transform=eval_axes.transAxes, ha="center", color="gray")
    if _spans_decades(loss_axes):
        loss_axes.set_yscale("log")
        loss_axes.set_ylabel("training loss (mean since the previous point; log scale)")
    speed_axes.set_ylim(bottom=0)
    speed_axes.yaxis.set_major_formatter(EngFormatter(sep=" "))  # 250 k, not 250000
    names = ", ".join(run_labels(runs)) if len(runs) <= 3 else f"{len(runs)} runs"
    figure.suptitle(f"mnn-train runs: {names}", fontsize=13)
    handles, labels = loss_axes.get_legend_handles_labels()
    # Under the panels, in as many columns as fit: it covers no curve however they run.
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=10, frameon=False)
    rows = math.ceil(len(labels) / 4)
    figure.tight_layout(rect=(0, 0.04 + 0.05 * rows, 1, 1))
    return figure


def draw_curves(runs: Sequence[Run], out: str | Path, x: str = "steps") -> Path:
    """Draw :func:`curves_figure` of ``runs`` into the PNG ``out``; return its path."""
    import matplotlib.pyplot as plt

    figure = curves_figure(runs, x)
    try:
        figure.savefig(out, dpi=_DPI)
    finally:
        plt.close(figure)
    return Path(out)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plot(axes, events: list[dict[str, Any]], key: str, per_step: int, scale: float, style: dict) -> None:
    """One run's line of ``key`` against its global step × ``per_step``; points whose value is
    null (not finite in the run) are left out."""
    points = [(event["global_step"] * per_step, event[key] * scale) for event in events if _finite(event.get(key))]
    if points:
        # Few points: mark them, so that a line is seen to join measurements.
        axes.plot(*zip(*points), **({"marker": ".", "markersize": 6} if len(points) <= 40 else {}), **style)


def _spans_decades(axes) -> bool:
    """Whether the lines' positive values span more than a factor 20 (a loss that falls from
    2.3 to 0.05 shows on a log scale; a linear one flattens everything after the first drop)."""
    values = [value for line in axes.get_lines() for value in line.get_ydata()]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20
