"""Communicator tests on real MPI processes.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_comm.py`` for N = 1, 2, 3.
Collectives are checked on COMM_WORLD, COMM_SELF and the single-process
communicator; the tests that start their own processes (no mpi4py, the
abort guard) run only when the suite itself runs on one rank.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mpi4py import MPI

from mnn.distributed.environment import NO_MPI_ENV
from mnn.distributed.comm import (
    MPICommunicator,
    RankFailure,
    Request,
    SingleProcessCommunicator,
    check_all,
    get_communicator,
    run_all,
)
from processes import mpiexec, needs_mpiexec, outside_the_job

WORLD_SIZE = MPI.COMM_WORLD.Get_size()
one_rank_suite_only = pytest.mark.skipif(
    WORLD_SIZE > 1, reason="starts its own processes; runs once, in the one-rank suite")


@pytest.fixture(params=["world", "self", "single"])
def comm(request):
    if request.param == "world":
        return get_communicator(MPI.COMM_WORLD)
    if request.param == "self":
        return get_communicator(MPI.COMM_SELF)
    return SingleProcessCommunicator()


def rank_values(comm, dtype, shape=(3, 4)):
    return (np.arange(np.prod(shape)).reshape(shape) + 10 * comm.rank + 1).astype(dtype)


def expected_sum(comm, dtype, shape=(3, 4)):
    base = np.arange(np.prod(shape)).reshape(shape)
    return sum(base + 10 * rank + 1 for rank in range(comm.size)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_allreduce_sum_in_place(comm, dtype):
    array = rank_values(comm, dtype)
    result = comm.allreduce(array)
    assert result is array
    assert array.dtype == dtype
    np.testing.assert_array_equal(array, expected_sum(comm, dtype))


def test_allreduce_mean(comm):
    array = rank_values(comm, np.float64)
    comm.allreduce(array, op="mean")
    np.testing.assert_allclose(array, expected_sum(comm, np.float64) / comm.size, rtol=1e-15)


def test_iallreduce_wait_and_wait_all(comm):
    first, second = rank_values(comm, np.float32), rank_values(comm, np.float64, shape=(5,))
    requests = [comm.iallreduce(first), comm.iallreduce(second, op="mean")]
    Request.wait_all(requests)
    assert all(request.test() for request in requests)
    np.testing.assert_array_equal(first, expected_sum(comm, np.float32))
    np.testing.assert_allclose(second, expected_sum(comm, np.float64, shape=(5,)) / comm.size)
    third = rank_values(comm, np.float64)
    request = comm.iallreduce(third)
    request.wait()
    request.wait()  # waiting twice is harmless
    np.testing.assert_array_equal(third, expected_sum(comm, np.float64))


def test_broadcast_from_each_root(comm):
    for root in range(comm.size):
        array = rank_values(comm, np.float64)
        scalar = np.array(float(comm.rank))
        assert comm.broadcast(array, root=root) is array
        comm.broadcast(scalar, root=root)
        np.testing.assert_array_equal(array, np.arange(12.0).reshape(3, 4) + 10 * root + 1)
        assert scalar == root
    with pytest.raises(ValueError, match="root must be a rank"):
        comm.broadcast(np.zeros(2), root=comm.size)


def test_broadcast_object_gives_roots_value_everywhere(comm):
    for root in range(comm.size):
        mine = {"rank": comm.rank, "shape": (2, comm.rank)}
        assert comm.broadcast_object(mine, root=root) == {"rank": root, "shape": (2, root)}
    with pytest.raises(ValueError, match="root must be a rank"):
        comm.broadcast_object(1, root=comm.size)


def test_allgather_and_barrier(comm):
    assert comm.allgather({"rank": comm.rank}) == [{"rank": rank} for rank in range(comm.size)]
    comm.barrier()


def test_bad_buffers_raise_clear_errors(comm):
    with pytest.raises(ValueError, match="non-contiguous"):
        comm.allreduce(np.zeros((4, 4))[:, 0])
    with pytest.raises(TypeError, match="floating"):
        comm.allreduce(np.zeros(3, dtype=np.int32), op="mean")
    with pytest.raises(ValueError, match="op must be one of"):
        comm.allreduce(np.zeros(3), op="max")
    with pytest.raises(TypeError, match="numpy.ndarray"):
        comm.broadcast([1.0, 2.0])


def test_check_all_raises_on_every_rank_when_one_fails(comm):
    check_all(comm, True)
    last = comm.size - 1
    with pytest.raises(RankFailure) as caught:
        check_all(comm, comm.rank != last, f"bad input on rank {comm.rank}")
    assert caught.value.failures == {last: f"bad input on rank {last}"}
    # a job of one process has no other rank to tell apart: no "rank 0:" before its message
    told = f"rank {last}: bad input on rank {last}" if comm.size > 1 else f"bad input on rank {last}"
    assert str(caught.value) == told


def test_run_all_returns_or_raises_everywhere(comm):
    assert run_all(comm, lambda value: value * 2, comm.rank) == 2 * comm.rank

    def load(rank):
        if rank == 0:
            raise FileNotFoundError("no such file: data.npz")
        return rank

    with pytest.raises(RankFailure) as caught:
        run_all(comm, load, comm.rank)
    assert caught.value.failures == {0: "FileNotFoundError: no such file: data.npz"}
    if comm.rank == 0:
        assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_get_communicator_choices():
    single = SingleProcessCommunicator()
    assert get_communicator(single) is single
    wrapped = get_communicator(MPI.COMM_SELF)
    assert isinstance(wrapped, MPICommunicator) and (wrapped.rank, wrapped.size) == (0, 1)
    default = get_communicator()
    if WORLD_SIZE > 1:
        assert isinstance(default, MPICommunicator)
        assert (default.rank, default.size) == (MPI.COMM_WORLD.Get_rank(), WORLD_SIZE)
    else:
        assert isinstance(default, SingleProcessCommunicator)


# ---- tests that start their own processes ----------------------------------------------

def child_environment(**extra):
    """A child's environment outside this job, without MNN_NO_MPI unless ``extra`` sets it."""
    env = outside_the_job()
    env.pop(NO_MPI_ENV, None)
    return {**env, **extra}


def run_python(code, env, timeout=60):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


BLOCK_MPI4PY = "import sys; sys.modules['mpi4py'] = None; sys.modules['mpi4py.MPI'] = None\n"
PRINT_COMMUNICATOR = """
import sys
from mnn.distributed.comm import get_communicator
comm = get_communicator()
print(type(comm).__name__, comm.rank, comm.size, sys.modules.get('mpi4py.MPI') is not None)
"""


@one_rank_suite_only
def test_runs_without_mpi4py():
    result = run_python(BLOCK_MPI4PY + PRINT_COMMUNICATOR, child_environment())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SingleProcessCommunicator", "0", "1", "False"]


@one_rank_suite_only
def test_no_mpi_variable_forces_single_process():
    result = run_python(PRINT_COMMUNICATOR, child_environment(**{NO_MPI_ENV: "1"}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SingleProcessCommunicator", "0", "1", "False"]


@one_rank_suite_only
def test_falling_back_under_a_multi_rank_launcher_is_an_error():
    result = run_python(PRINT_COMMUNICATOR, child_environment(**{NO_MPI_ENV: "1", "PMI_SIZE": "2"}))
    assert result.returncode != 0
    assert "the launcher started 2 ranks but MNN_NO_MPI=1" in result.stderr


GUARDED_JOB = """
import sys
from mnn.distributed.comm import check_all, get_communicator, stop_all_on_error
comm = get_communicator()
with stop_all_on_error(comm):
    if sys.argv[1] == "collective":
        check_all(comm, comm.rank != 1, "config.toml: lr must be > 0, got -1")
    else:
        if comm.rank == 1:
            raise RuntimeError("unexpected failure on rank 1")
        comm.barrier()  # rank 0 would wait here forever without the abort
print("finished", comm.rank)
"""


@one_rank_suite_only
@needs_mpiexec
@pytest.mark.parametrize("mode", ["collective", "local"])
def test_failure_on_one_rank_stops_every_rank(mode):
    result = subprocess.run(mpiexec(2) + [sys.executable, "-c", GUARDED_JOB, mode],
                            env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "finished" not in result.stdout
    if mode == "collective":
        # Printed once, by rank 0, although rank 1 failed.
        assert result.stderr.count("error: rank 1: config.toml: lr must be > 0, got -1") == 1
    else:
        assert "RuntimeError: unexpected failure on rank 1" in result.stderr
