"""What rank 0 shows and records of a run: progress, text lines and metrics.jsonl.

``PROGRESS_ENV`` is how a launcher tells the ranks that a person watches a
terminal: under ``mpiexec`` a rank's stderr is a pipe, so it cannot see that
for itself.
"""
from __future__ import annotations

import os
import sys

__all__ = ["PROGRESS_ENV", "progress_bar_wanted"]

# Ranks' output reaches the terminal through the launcher's pipes, so a rank
# cannot tell that a person is watching: mnn-launch says so in this variable
# ("bar" or "lines"), which the trainer reads to choose a progress bar.
PROGRESS_ENV = "MNN_PROGRESS"


def progress_bar_wanted() -> bool:
    """A bar when ``MNN_PROGRESS=bar`` (mnn-launch sets it when it runs on a
    terminal: the ranks' own stderr is a pipe then), plain lines when
    ``MNN_PROGRESS=lines``, else a bar exactly when stderr is a terminal."""
    choice = os.environ.get(PROGRESS_ENV, "")
    if choice in ("bar", "lines"):
        return choice == "bar"
    return sys.stderr.isatty()
