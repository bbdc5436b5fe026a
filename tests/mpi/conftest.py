"""MPI suite guard: a test that fails on some ranks must not leave the others hanging.

When a test fails on one rank, the other ranks may be blocked in a collective
that the failing rank will never reach (and then every following test
mismatches its collectives). On more than one rank, a failure is therefore
printed at once, with its rank, and the whole job is aborted: the run stops
with a non-zero status instead of hanging.

make test runs this suite under MPICH and under Open MPI. The fixtures ``comm``
(the world, as mnn's communicator) and ``shared_dir`` (rank 0's temporary folder,
which every rank can read: one host) are shared by the suite's files.
"""

import sys
from pathlib import Path

import pytest
from mpi4py import MPI

from mnn.distributed.comm import get_communicator


@pytest.fixture(name="comm")
def comm_fixture():
    return get_communicator(MPI.COMM_WORLD)


@pytest.fixture(name="shared_dir")
def shared_dir_fixture(comm, tmp_path):
    """One temporary folder for all ranks (rank 0's), so every rank can read the outputs."""
    return Path(comm.broadcast_object(str(tmp_path)))


def pytest_runtest_logreport(report):
    world = MPI.COMM_WORLD
    if not report.failed or world.Get_size() == 1:
        return
    print(f"\n[rank {world.Get_rank()}] {report.nodeid} failed ({report.when}); aborting all "
          f"{world.Get_size()} ranks so none waits forever:\n{report.longreprtext}",
          file=sys.stderr, flush=True)
    world.Abort(1)
