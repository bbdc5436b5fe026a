"""The environment variables through which mnn-launch speaks to its ranks.

The launcher sets them and the ranks read them, so they belong to neither side:
both import them from here. This module imports only the standard library, so that the launcher
(``mnn.distributed.launch``) can use the names without loading NumPy or the trainer.
It also holds the project's distribution name, for the hints that tell how to
install an optional part.
"""
from pathlib import Path

__all__ = ["DISTRIBUTION", "install_hint", "NO_MPI_ENV", "START_DIR_ENV", "START_ADDR_ENV", "PROGRESS_ENV", "THREAD_VARIABLES", "RESTART_COUNT_ENV",
           "MAX_RESTARTS_ENV", "RESTART_CAUSE_ENV", "RESTART_RANKS_ENV", "RESTART_SEEN_AT_ENV", "LAUNCH_ID_ENV"]

#: ``MNN_NO_MPI=1`` runs a single process without importing mpi4py.
NO_MPI_ENV = "MNN_NO_MPI"

#: A directory where each rank on its machine tells how far its start-up got
#: (see :func:`mnn.distributed.comm.get_communicator`), so that a job that never
#: starts is stopped instead of waiting forever.
START_DIR_ENV = "MNN_START_DIR"

#: ``address:port`` where each rank reports how far its start-up got, when a rank of the
#: job runs on another host (a directory here is not seen there); empty or unset: use
#: :data:`START_DIR_ENV`.
START_ADDR_ENV = "MNN_START_ADDR"

#: Ranks' output reaches the terminal through the launcher's pipes, so a rank
#: cannot tell that a person is watching: mnn-launch says so in this variable
#: ("bar" or "lines"), which the trainer reads to choose a progress bar.
PROGRESS_ENV = "MNN_PROGRESS"

#: Thread-count variables of OpenMP, OpenBLAS and MKL (mnn-launch sets them per rank).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Restarts (``mnn-launch --max-restarts``): how many times this job was started again
#: before this start (0 the first time) and how many it may be; torchrun's
#: TORCHELASTIC_RESTART_COUNT and TORCHELASTIC_MAX_RESTARTS. A restart count above 0 makes
#: mnn-train continue from OUTPUT's newest checkpoint, as ``--resume`` does.
RESTART_COUNT_ENV = "MNN_RESTART_COUNT"
MAX_RESTARTS_ENV = "MNN_MAX_RESTARTS"

#: On a restart: why the job before it ended (mnn-launch's words, e.g. "rank 1 on node2 was
#: killed by signal 9 (SIGKILL)"), its ranks (a number), and when mnn-launch saw it end (the
#: Unix time, as ``time.time()``), which mnn-train records in its ``restart`` event.
RESTART_CAUSE_ENV = "MNN_RESTART_CAUSE"
RESTART_RANKS_ENV = "MNN_RESTART_RANKS_BEFORE"
RESTART_SEEN_AT_ENV = "MNN_RESTART_SEEN_AT"

#: One mnn-launch run's id, the same in every start of its job: rank 0 of mnn-train writes it
#: into OUTPUT's lock, so that a restart takes over the lock of the start before it even when
#: that one's rank 0 ran on a host that is now lost (a lock from another host cannot be checked).
LAUNCH_ID_ENV = "MNN_LAUNCH_ID"

#: The distribution's name (pyproject.toml): "mnn" on PyPI is another project, Alibaba's MNN.
DISTRIBUTION = "mnn-mpi"


def install_hint(extra: str) -> str:
    """The pip command that adds the optional part ``extra`` (``mpi``, ``plot``, ...) to this
    project: from the checkout it runs from, when it runs from one (an editable install),
    else by its distribution name; never ``mnn[...]``, which is another project."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"
