"""Running jobs in a test cluster: mnn-launch in the head, under the MPI of the Python that runs pytest."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from processes import ENV, wait_for

__all__ = ["PYTHON_BIN", "LAUNCH", "TRAIN", "CLUSTER_ENV", "launch", "Job", "command_line", "assert_nothing_left"]

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


class Job:
    """mnn-launch (with ``launch_options``) running mnn-train with ``options`` across the
    cluster's hosts, started in the head; its stdout and stderr are read as they come, so that
    a long job never blocks on a full pipe."""

    def __init__(self, cluster, options, launch_options=()):
        self.process = cluster.popen("head", [*LAUNCH, "--hosts", cluster.host_list, *launch_options, "--", *TRAIN,
                                              *options],
                                     env=CLUSTER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.errors = [], []
        self._readers = [threading.Thread(target=self._read, args=(pipe, into), daemon=True)
                         for pipe, into in ((self.process.stdout, self.lines), (self.process.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, into):
        for line in pipe:
            into.append(line)

    def wait_for_line(self, text):
        """Wait until a line of stdout holds ``text``."""
        wait_for(lambda: any(text in line for line in self.lines) or self.process.poll() is not None,
                 f"a line with {text!r}", timeout=120)
        assert any(text in line for line in self.lines), f"the job ended first: {''.join(self.lines)}"

    def finish(self, timeout=120):
        """(exit status, stdout, stderr) once the job has ended; killed if it outlives ``timeout``."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(timeout=10)  # a process the job left may hold a pipe: the test then says so
        return self.process.returncode, "".join(self.lines), "".join(self.errors)


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
