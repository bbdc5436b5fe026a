"""The environment variables through which mnn-launch speaks to its ranks.

The launcher sets them and the ranks read them, so they belong to neither side:
both import them from here. This module imports nothing, so that the launcher
(``mnn.distributed.launch``) can use the names without loading NumPy or the trainer.
"""

__all__ = ["NO_MPI_ENV", "START_DIR_ENV", "START_ADDR_ENV", "PROGRESS_ENV", "THREAD_VARIABLES"]

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
