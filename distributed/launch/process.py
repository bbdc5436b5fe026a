"""Running a launch: the job in the foreground with SIGINT and SIGTERM forwarded, or a
short job with its output captured and a time limit (``--check``'s hello).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Mapping

from mnn.distributed.launch.plan import LaunchPlan

__all__ = ["run_plan", "run_with_timeout"]


def run_plan(plan: LaunchPlan, env: Mapping[str, str]) -> int:
    """Run the plan in the foreground, forwarding SIGINT and SIGTERM; return the exit status."""
    try:
        process = subprocess.Popen(plan.argv, env={**env, **plan.env_updates})
    except OSError as error:
        raise ValueError(f"cannot start {plan.argv[0]}: {error.strerror or error}") from None

    def forward(signum, frame):
        # Ctrl-C in a terminal already reached the launcher, which shares our
        # process group; a second SIGINT would make hydra abort without cleanup.
        if signum == signal.SIGINT and _in_terminal_foreground():
            return
        if process.poll() is None:
            process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return returncode if returncode >= 0 else 128 - returncode


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


def run_with_timeout(argv: list[str], env: Mapping[str, str], timeout: float) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr); on timeout the launcher is stopped."""
    process = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        # SIGTERM first: the launcher then stops its ranks; SIGKILL would orphan them.
        process.terminate()
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        return None, out, err

