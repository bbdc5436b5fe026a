"""The all-reduce micro-benchmark and a scaling point, measured on the ranks of this suite.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_collectives.py`` for
N = 1, 2, 3. Only the shape and sanity of the records are checked, never a speed.
"""

import numpy as np
import pytest
from mpi4py import MPI

from mnn.distributed.experiments.collectives import (
    allreduce_functions,
    available_allreduces,
    format_table,
    message_sizes,
    run_collectives,
)
from mnn.distributed.comm import get_communicator
from mnn.distributed.experiments.scaling.worker import measure_point


@pytest.fixture
def comm():
    return get_communicator(MPI.COMM_WORLD)


def test_every_rank_gets_the_same_records_in_osu_shape(comm):
    names = available_allreduces()
    records = run_collectives(comm, message_sizes(4, 256), names, seconds_per_size=0.01)
    assert comm.allgather(records) == [records] * comm.size
    assert [(record["allreduce"], record["bytes"]) for record in records] == \
        [(name, size) for size in (4, 8, 16, 32, 64, 128, 256) for name in names]
    for record in records:
        assert record["ranks"] == comm.size
        assert 0 < record["min_us"] <= record["avg_us"] <= record["max_us"]
        assert 10 <= record["iterations"] <= 1000 and record["warmup"] == 200
        assert record["busbw_GBps"] == pytest.approx(record["algbw_GBps"] * 2 * (comm.size - 1) / comm.size)
    table = format_table(records)
    assert table.startswith(f"# all-reduce: mpi, {comm.size} ranks")
    assert "Avg Latency(us)" in table


def test_each_implementation_sums_over_the_ranks(comm):
    for name, allreduce in allreduce_functions(comm, available_allreduces()).items():
        buffer = np.full(37, comm.rank + 1, dtype=np.float32)
        allreduce(buffer)
        np.testing.assert_array_equal(buffer, comm.size * (comm.size + 1) / 2, err_msg=name)


def test_unknown_allreduce_is_named(comm):
    with pytest.raises(ValueError, match="unknown all-reduce 'tree'"):
        allreduce_functions(comm, ["tree"])


def test_a_scaling_point_times_every_rank_and_splits_the_step(comm):
    spec = {"layers": [6, 5, 3], "dtype": "float64", "per_rank_batches": [4] * comm.size, "steps": 3,
            "warmup": 1, "target_seconds": 0.1, "dataset": None, "threads_per_rank": 1,
            "allreduce": "mpi", "grad_compression": "none"}
    result = measure_point(spec, comm)
    assert result["ranks"] == comm.size and result["global_batch"] == 4 * comm.size and result["steps"] == 3
    assert result["samples_per_s"] == pytest.approx(4 * comm.size / (result["ms_per_step"] * 1e-3))
    assert len(result["per_rank"]) == len(result["peak_rss_mb"]) == comm.size
    assert result["grad_bytes"] == (6 * 5 + 5 + 5 * 3 + 3) * 8 == sum(result["bucket_bytes"])
    assert result["compute_ms"] > 0 and result["optimizer_ms"] > 0
    assert comm.allgather(result["ms_per_step"]) == [result["ms_per_step"]] * comm.size


def test_the_timed_loop_agrees_on_one_count_on_every_rank(comm):
    from mnn.distributed.experiments.timing import agree_on_count, time_calls

    # Rank 0's estimate decides, however fast the others' probes were.
    count = agree_on_count(comm.barrier, comm, target_s=0.01, minimum=3, maximum=50)
    assert 3 <= count <= 50 and comm.allgather(count) == [count] * comm.size
    assert time_calls(comm.barrier, count, comm) > 0
