"""Running jobs in a test cluster: mnn-launch in the head, under the MPI of the Python that runs pytest."""
import os
import sys
import time
from pathlib import Path

from processes import ENV

__all__ = ["PYTHON_BIN", "LAUNCH", "TRAIN", "CLUSTER_ENV", "launch", "command_line", "assert_nothing_left"]

PYTHON_BIN = Path(sys.executable).parent
LAUNCH = [sys.executable, "-m", "mnn.scripts.launch"]
TRAIN = [sys.executable, "-m", "mnn.scripts.train"]
# The environment of a job in the cluster: this Python's tools first on PATH, Open MPI's
# permission to run as root (the cluster runs as root), progress as lines.
CLUSTER_ENV = {**ENV, "PATH": f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launch(cluster, args, timeout=180, env=None, check=False):
    """``mnn-launch ARGS`` in the cluster's head, to its end (a CompletedProcess with text output)."""
    return cluster.run("head", [*LAUNCH, *args], env=env or CLUSTER_ENV, timeout=timeout, check=check)


def command_line(pid):
    """The command line of process ``pid`` as text ("" once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def assert_nothing_left(cluster, hosts=None, timeout=20):
    """Within ``timeout`` seconds no process of the job is left on ``hosts`` (default: the head and
    every host; processes that notice their launcher gone take a moment). Fails naming what is left."""
    hosts = ("head", *cluster.host_names) if hosts is None else hosts
    deadline = time.monotonic() + timeout
    while True:
        left = {host: [command_line(pid)[:200] for pid in pids]
                for host in hosts if (pids := cluster.job_pids(host))}
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left by the job after {timeout} s: {left}")
        time.sleep(0.1)
