"""The one timed loop of every benchmark here: warm up, agree on a count, time between barriers.

A training step of ``mnn-bench``, a rank count of ``mnn-scaling`` and one
message size of the all-reduce micro-benchmark are all measured the same way:

1. warm up: a few untimed calls, so that buffers, caches and lazily built
   state are in place before anything counts;
2. probe and agree on the count: time a few more calls and let rank 0's
   estimate decide how many calls fill the time wanted, the same number on
   every rank (every call is collective, so the ranks must make as many);
3. time the calls between barriers, so that the ranks start together and a
   slower rank's work counts in the figure;
4. repeat the timing where noise matters and report the median with the
   fastest and slowest beside it (:class:`Spread`): the median resists a
   machine that others slow down for a while, the range shows how much.

Usage, on every rank::

    from mnn.distributed.experiments.timing import Spread, agree_on_count, time_calls
    count = agree_on_count(step, comm, target_s=0.3, minimum=5)
    ms = Spread.of([time_calls(step, count, comm) * 1e3 for _ in range(5)])
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

from mnn.distributed.comm import Communicator

__all__ = ["Spread", "time_calls", "agree_on_count"]


class Spread(NamedTuple):
    """The median of repeated measurements and the smallest and largest of them."""

    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def fields(self, key: str) -> dict[str, float]:
        """``{key: median, key_min: minimum, key_max: maximum}``, as the results name them."""
        return {key: self.median, f"{key}_min": self.minimum, f"{key}_max": self.maximum}


def time_calls(work: Callable[[], Any], calls: int, comm: Communicator, each_after_barrier: bool = False) -> float:
    """Seconds per call of ``work`` over ``calls`` calls, by this rank's clock (collective).

    By default the calls run back to back between two barriers, and the
    closing barrier is timed: a training step's time includes waiting for the
    slowest rank, as training does. ``each_after_barrier`` times each call on
    its own, right after a barrier that is not timed (OSU's method for one
    collective call: its latency, without a barrier's).
    """
    if each_after_barrier:
        elapsed = 0.0
        for _ in range(calls):
            comm.barrier()
            start = time.perf_counter()
            work()
            elapsed += time.perf_counter() - start
        return elapsed / calls
    comm.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        work()
    comm.barrier()
    return (time.perf_counter() - start) / calls


def agree_on_count(work: Callable[[], Any], comm: Communicator, target_s: float, minimum: int,
                   maximum: int | None = None, warmup: int = 3, probe: int = 3,
                   each_after_barrier: bool = False) -> int:
    """How many calls of ``work`` take about ``target_s`` seconds, the same on every rank (collective).

    ``warmup`` untimed calls, then ``probe`` calls timed as :func:`time_calls`
    times them; rank 0's estimate, at most ``maximum`` and at least
    ``minimum``, is broadcast, so that every rank makes the same calls.
    """
    for _ in range(warmup):
        work()
    seconds = time_calls(work, probe, comm, each_after_barrier)
    count = int(target_s / max(seconds, 1e-9))
    if maximum is not None:
        count = min(count, maximum)
    return comm.broadcast_object(max(minimum, count))
