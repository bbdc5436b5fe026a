"""mnn-plot: the training curves of one or more runs in one PNG (``main`` is the console script).

    mnn-plot runs/digits-example                       # writes runs/digits-example/curves.png
    mnn-plot runs/lr-0.1 runs/lr-0.3 --out lr.png      # two runs, one colour each
    mnn-plot runs/a/metrics.jsonl runs/b --x samples

Each RUN is a run's output directory (``mnn-train --output DIR``) or its
metrics.jsonl; the run may still be training (a line it is writing is
skipped). The panels (training loss, the evaluation metric, samples per second,
against the global step or the samples trained on) are drawn by
:mod:`~mnn.distributed.experiments.run_plots`. The PNG goes to ``--out``, by
default ``RUN/curves.png`` for one run and ``plot.png`` here for several; its
path is printed. One process, no MPI. Exit status 2, with one line
``mnn-plot: error: ...``, for a run that cannot be read, a file that holds no
training events, an output that cannot be written, or matplotlib not installed
(the optional extra ``plot``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnn.distributed.environment import install_hint
from mnn.distributed.experiments.run_plots import METRICS_NAME, X_AXES, draw_curves, load_run
from mnn.distributed.experiments.scaling.report import plots_available

__all__ = ["main", "build_parser", "default_out"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-plot", description="Draw the training loss, the evaluation metric and the throughput of "
                                     "one or more mnn-train runs into one PNG.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help=f"a run's output directory (mnn-train --output DIR) or its {METRICS_NAME}")
    parser.add_argument("--out", metavar="FILE.png", default=None,
                        help="the PNG to write (default: RUN/curves.png for one run, plot.png here for several)")
    parser.add_argument("--x", choices=X_AXES, default="steps",
                        help="the x axis: global steps, or samples trained on (steps × the batch size of the "
                             "run's config.toml) (default: steps)")
    return parser


def default_out(runs: list[str]) -> Path:
    """Where the PNG goes without --out: beside the one run's metrics.jsonl, else here."""
    if len(runs) == 1:
        run = Path(runs[0])
        return (run if run.is_dir() else run.parent) / "curves.png"
    return Path("plot.png")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out(args.runs)
    try:
        runs = [load_run(path) for path in args.runs]
        # The runs are checked first: a wrong path is told whether matplotlib is there or not.
        if not plots_available():
            raise ValueError(f"matplotlib is not installed; add it with: {install_hint('plot')}")
        written = draw_curves(runs, out, args.x)
    except ValueError as error:
        print(f"mnn-plot: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the PNG cannot be written there
        print(f"mnn-plot: error: cannot write {str(out)!r}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
