"""Running a launch: the job in the foreground with SIGINT and SIGTERM passed on, or a
short job with its output captured and a time limit (``--check``'s hello); in both, no
process of the job outlives mnn-launch.

What the two launchers do, and so what mnn-launch does about it:

- MPICH's hydra forwards SIGINT and SIGTERM to every rank and waits for them;
  it shares mnn-launch's process group, so a Ctrl-C in a terminal reaches it
  directly. If hydra is SIGKILLed its proxies kill the ranks; if it gets
  SIGTERM it only forwards it, and a rank that ignores SIGTERM runs on.
- Open MPI's prterun takes SIGINT and SIGTERM as an order to abort: it gives
  each rank SIGCONT, SIGTERM about 0.25 s later and SIGKILL about 0.25 s after
  that, stops forwarding their output, and exits 1 whatever they return. Its
  ranks each lead a process group of their own, so a terminal's Ctrl-C never
  reaches them. If prterun is SIGKILLed its ranks run on with no parent.
  mnn-launch therefore starts it in a process group of its own (the terminal's
  signals reach mnn-launch alone) and hands SIGINT and SIGTERM to the ranks on
  this machine itself: they stop as mnn-train stops on any MPI, after the same
  step, and prterun passes on their output and their exit status (and its own
  notices about it, which :mod:`~mnn.distributed.launch.launcher_output`
  drops). A third signal, or a signal while no rank runs here, goes to prterun.
- When mnn-launch dies, even by SIGKILL, the launcher gets a signal from the
  kernel (Linux's parent-death signal): SIGKILL for hydra, SIGTERM for
  prterun (and srun), which then stop their ranks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Mapping

from mnn.distributed.launch.launcher_output import start_stderr_copier, tell_interrupted, wait_for_copier
from mnn.distributed.launch.plan import LaunchPlan
from mnn.distributed.launch.tree import signal_local_ranks, stop_process_tree

__all__ = ["run_plan", "run_with_timeout"]

# Signals after which mnn-launch stops handing SIGINT/SIGTERM to Open MPI's ranks
# and lets prterun abort the job: the first stops training after a step, the
# second stops it at once (mnn-train's "a person insisting"), the third is for a
# job that no longer listens.
_SIGNALS_TO_RANKS = 2
_PR_SET_PDEATHSIG = 1


def run_plan(plan: LaunchPlan, env: Mapping[str, str]) -> int:
    """Run the plan in the foreground, passing on SIGINT and SIGTERM; return the exit status."""
    openmpi = plan.family == "openmpi"
    stderr_read, stderr_write = os.pipe() if openmpi else (None, None)
    try:
        process = subprocess.Popen(plan.argv, env={**env, **plan.env_updates, **plan.launcher_env},
                                   stderr=stderr_write, preexec_fn=_launcher_setup(plan.family, own_group=openmpi))
    except OSError as error:
        if stderr_read is not None:
            os.close(stderr_read)
        raise ValueError(f"cannot start {plan.argv[0]}: {error.strerror or error}") from None
    finally:
        if stderr_write is not None:
            os.close(stderr_write)
    copier = None
    if stderr_read is not None:
        copier = start_stderr_copier(stderr_read)
        os.close(stderr_read)
    relay = _SignalRelay(process, openmpi, copier)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, relay) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
        if copier is not None:
            wait_for_copier(copier)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return returncode if returncode >= 0 else 128 - returncode


class _SignalRelay:
    """The SIGINT/SIGTERM handler while a job runs: passes each signal on (see the module docstring)."""

    def __init__(self, process: subprocess.Popen, openmpi: bool, copier: int | None):
        self.process = process
        self.openmpi = openmpi
        self.copier = copier
        self.signals_seen = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signals_seen += 1
        if self.copier is not None:
            tell_interrupted(self.copier)
        if self.process.poll() is not None:
            return
        if self.openmpi and self.signals_seen <= _SIGNALS_TO_RANKS and signal_local_ranks(self.process.pid, signum):
            return
        # Ctrl-C in a terminal already reached hydra, which shares our process
        # group; a second SIGINT would make hydra abort without cleanup.
        if not self.openmpi and signum == signal.SIGINT and _in_terminal_foreground():
            return
        self.process.send_signal(signum)


def _launcher_setup(family: str | None, own_group: bool) -> Callable[[], None] | None:
    """What the launcher's process does between fork and exec: perhaps a process group of its
    own, and the signal it gets when mnn-launch dies (see the module docstring)."""
    death_signal = signal.SIGKILL if family == "mpich" else signal.SIGTERM
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork only call it
        except (OSError, AttributeError):
            prctl = None
    if prctl is None and not own_group:
        return None
    parent = os.getpid()

    def setup() -> None:
        if own_group:
            os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            if os.getppid() != parent:  # mnn-launch died before prctl: nobody would tell us
                os.kill(os.getpid(), death_signal)

    return setup


def _in_terminal_foreground() -> bool:
    """Whether our process group is the foreground group of a controlling terminal."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(terminal)


def run_with_timeout(argv: list[str], env: Mapping[str, str], timeout: float,
                     family: str | None = None) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr) of a launcher of ``family``; on
    timeout, or when interrupted, the launcher and everything it started are stopped
    (:func:`~mnn.distributed.launch.tree.stop_process_tree`)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Files, not pipes: a child that the launcher leaves behind could hold a pipe open forever.
        process = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   preexec_fn=_launcher_setup(family, own_group=False))
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(process)
            returncode = None
        except BaseException:
            stop_process_tree(process)
            raise
        out.seek(0)
        err.seek(0)
        return returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
