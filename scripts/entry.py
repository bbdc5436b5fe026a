"""The console scripts' first step: hold Ctrl-C, SIGTERM and SIGHUP while the program loads.

Loading NumPy, the layers and the trainer takes a few tenths of a second, more
on a busy machine. A signal in that time would end the program with a
KeyboardInterrupt traceback (Ctrl-C) or without a word (SIGTERM, SIGHUP). So
each console script (``[project.scripts]`` in pyproject.toml) starts here,
where nothing heavy is loaded yet (``mnn`` loads its layers on first use):
:class:`HeldSignals` counts those signals while the program's module is
imported, then

* mnn-train takes the count over: its
  :class:`~mnn.distributed.training.stopping.StopRequests` starts from it, so every rank
  stops at the first point they can agree on, with "interrupted before training
  started" from rank 0 and exit 130;
* every other program gets its own handlers back; if a signal came, it has
  started nothing yet: it says so and exits 130.

``python -m mnn.scripts.train`` skips this step (the interpreter loads the
module before anything of ours runs).
"""
from __future__ import annotations

import importlib
import signal
import sys
import time
from typing import Any

__all__ = ["HeldSignals", "train", "launch", "generate", "bench", "scaling", "cluster", "plot"]

# The shell's status for a process ended by SIGINT (128 + 2), as mnn-train's.
_EXIT_INTERRUPTED = 130


class HeldSignals:
    """While installed, SIGINT, SIGTERM and SIGHUP are only counted (``count``, and
    ``first_at`` on the monotonic clock); signals ignored before (``nohup``) stay ignored.

    It has the two attributes a :class:`~mnn.distributed.training.stopping.StopRequests`
    takes over from the handler it replaces.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> HeldSignals:
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._count)
        return self

    def release(self) -> None:
        """Put the handlers back that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _count(self, signum: int, frame: object) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.count += 1


def _start(module: str, program: str, takes_over: bool = False) -> int:
    """Import ``module`` with the signals held, then run its ``main``."""
    held = HeldSignals().install()
    main = importlib.import_module(module).main
    if not takes_over:
        held.release()
        if held.count:
            print(f"{program}: interrupted while starting; nothing was started", file=sys.stderr)
            return _EXIT_INTERRUPTED
    return main()


def train() -> int:
    return _start("mnn.scripts.train", "mnn-train", takes_over=True)


def launch() -> int:
    return _start("mnn.scripts.launch", "mnn-launch")


def generate() -> int:
    return _start("mnn.scripts.generate", "mnn-generate")


def bench() -> int:
    return _start("mnn.scripts.bench", "mnn-bench")


def scaling() -> int:
    return _start("mnn.scripts.scaling", "mnn-scaling")


def cluster() -> int:
    return _start("mnn.scripts.cluster", "mnn-cluster")


def plot() -> int:
    return _start("mnn.scripts.plot", "mnn-plot")
