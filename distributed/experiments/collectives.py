"""All-reduce micro-benchmark: latency and bandwidth against message size, OSU's way.

The method is that of OSU's ``osu_allreduce`` (OSU Micro-Benchmarks): for each
message size, warm-up iterations that are not timed, then many timed
iterations, each one all-reduce between two barriers that are not timed; each
rank's average time per call, and over the ranks their average, minimum and
maximum. As in OSU, small messages get more iterations (1000 timed after 200
warm-up up to 8 KiB, 100 after 10 above); unlike OSU, a size stops earlier once
its timed iterations would take more than ``seconds_per_size`` (at least 10
are timed), so that a sweep up to 64 MiB stays short on a slow machine. Buffers
are float32 zeros (a sum of zeros never overflows, however many iterations),
reduced in place, as ``DataParallel`` reduces its gradient buckets.

The bandwidths are those of NCCL's tests: the *algorithm bandwidth* n / t and
the *bus bandwidth* n / t * 2(p - 1)/p, which for a bandwidth-optimal
all-reduce is the speed each rank's link runs at (comparable across p).

Implementations are looked up by name in :func:`allreduce_functions`: "mpi" is
the communicator's ``allreduce`` (MPI_Allreduce in place); "ring" is mnn's own
ring all-reduce (:class:`mnn.distributed.ring.RingAllreduce`), and "ring-fp16"
the same with float16 on the wire.

Run it with ``mnn-scaling --collectives`` (which starts it on the ranks through
the launcher), or from Python on every rank::

    records = run_collectives(get_communicator(), message_sizes(4, 2**26), ["mpi"])
    if comm.rank == 0: print(format_table(records))
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

import numpy as np

from mnn.distributed.comm import Communicator
from mnn.distributed.experiments.timing import agree_on_count, time_calls

__all__ = ["ALLREDUCE_NAMES", "SMALLEST_BYTES", "LARGEST_BYTES", "message_sizes", "available_allreduces",
           "allreduce_functions", "measure_allreduce", "run_collectives", "format_table"]

#: Every implementation the benchmark knows by name, available or not.
ALLREDUCE_NAMES = ("mpi", "ring", "ring-fp16")
SMALLEST_BYTES = 4
LARGEST_BYTES = 64 * 2**20
# OSU's split between small and large messages, and its iteration counts for each.
_LARGE_MESSAGE_BYTES = 8192
_OSU_COUNTS = {"small": (200, 1000), "large": (10, 100)}  # (warm-up, timed)
_MIN_ITERATIONS = 10
_ITEM_BYTES = np.dtype(np.float32).itemsize


def message_sizes(smallest: int = SMALLEST_BYTES, largest: int = LARGEST_BYTES) -> list[int]:
    """Powers of two from ``smallest`` to ``largest`` bytes (both powers of two, at least 4)."""
    for name, value in (("smallest", smallest), ("largest", largest)):
        if value < _ITEM_BYTES or value & (value - 1):
            raise ValueError(f"{name} message size must be a power of two of at least {_ITEM_BYTES} bytes "
                             f"(one float32), got {value}")
    if smallest > largest:
        raise ValueError(f"the smallest message size ({smallest}) is larger than the largest ({largest})")
    sizes = [smallest]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def available_allreduces() -> list[str]:
    """The names of :data:`ALLREDUCE_NAMES` that can run here (the ring's need its module)."""
    ring = importlib.util.find_spec("mnn.distributed.ring") is not None
    return [name for name in ALLREDUCE_NAMES if ring or not name.startswith("ring")]


def allreduce_functions(comm: Communicator, names: Sequence[str]) -> dict[str, Callable[[np.ndarray], Any]]:
    """For each name, a function that sums a float32 buffer over ``comm``'s ranks in place.

    This is the one seam through which the benchmark (and the cost model's fit)
    reaches an implementation: "mpi" is ``comm.allreduce``; "ring" and "ring-fp16"
    build mnn's ring all-reduce on ``comm``. ValueError for an unknown or unavailable name.
    """
    functions = {}
    for name in names:
        if name not in ALLREDUCE_NAMES:
            raise ValueError(f"unknown all-reduce {name!r}: expected one of {', '.join(ALLREDUCE_NAMES)}")
        if name not in available_allreduces():
            raise ValueError(f"the {name} all-reduce is not available in this installation "
                             f"(no module mnn.distributed.ring)")
        functions[name] = comm.allreduce if name == "mpi" else _ring_allreduce(comm, name)
    return functions


def _ring_allreduce(comm: Communicator, name: str) -> Callable[[np.ndarray], Any]:
    from mnn.distributed.ring import RingAllreduce  # only once available_allreduces() found it

    # Sized by each buffer: its receive buffers are made again when the size changes,
    # which the warm-up iterations of each size absorb.
    return RingAllreduce(comm, compression="fp16" if name == "ring-fp16" else "none").allreduce


def _counts(size_bytes: int) -> tuple[int, int]:
    return _OSU_COUNTS["small" if size_bytes <= _LARGE_MESSAGE_BYTES else "large"]


def measure_allreduce(comm: Communicator, allreduce: Callable[[np.ndarray], Any], size_bytes: int,
                      seconds_per_size: float = 0.5) -> dict[str, float]:
    """Time ``allreduce`` on a float32 buffer of ``size_bytes``, as OSU does (module docstring).

    Collective. Returns the average, minimum and maximum over the ranks of each
    rank's mean time per call, in microseconds, with the iteration counts. The
    loop is the one of every benchmark here (:mod:`mnn.distributed.experiments.timing`),
    each call timed on its own right after a barrier.
    """
    buffer = np.zeros(size_bytes // _ITEM_BYTES, dtype=np.float32)
    warmup, iterations = _counts(size_bytes)

    def call() -> None:
        allreduce(buffer)

    iterations = agree_on_count(call, comm, seconds_per_size, minimum=_MIN_ITERATIONS, maximum=iterations,
                                warmup=warmup, each_after_barrier=True)
    mean_us = [seconds * 1e6 for seconds in comm.allgather(time_calls(call, iterations, comm,
                                                                       each_after_barrier=True))]
    return {"avg_us": float(np.mean(mean_us)), "min_us": float(min(mean_us)), "max_us": float(max(mean_us)),
            "iterations": iterations, "warmup": warmup}


def run_collectives(comm: Communicator, sizes: Sequence[int], names: Sequence[str],
                    seconds_per_size: float = 0.5) -> list[dict[str, Any]]:
    """Measure each implementation of ``names`` at each size; one record per (name, size).

    Collective; every rank returns the same records. The implementations take
    turns at each size, so a machine that slows down slows all of them alike.
    """
    functions = allreduce_functions(comm, names)
    records = []
    for size in sizes:
        for name, allreduce in functions.items():
            timing = measure_allreduce(comm, allreduce, size, seconds_per_size)
            algorithm_bandwidth = size / (timing["avg_us"] * 1e-6) / 1e9
            records.append({"allreduce": name, "ranks": comm.size, "bytes": int(size), **timing,
                            "algbw_GBps": algorithm_bandwidth,
                            "busbw_GBps": algorithm_bandwidth * 2 * (comm.size - 1) / comm.size})
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as OSU prints them, one block per implementation, with the bandwidths added."""
    lines = []
    for name in dict.fromkeys(record["allreduce"] for record in records):
        rows = [record for record in records if record["allreduce"] == name]
        lines += [f"# all-reduce: {name}, {rows[0]['ranks']} ranks, float32, in place",
                  f"# {'Size':<10} {'Avg Latency(us)':>16} {'Min Latency(us)':>16} {'Max Latency(us)':>16} "
                  f"{'Iterations':>10} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}"]
        lines += [f"{row['bytes']:<12} {row['avg_us']:>16.2f} {row['min_us']:>16.2f} {row['max_us']:>16.2f} "
                  f"{row['iterations']:>10} {row['algbw_GBps']:>12.3f} {row['busbw_GBps']:>12.3f}" for row in rows]
    return "\n".join(lines)
