"""The timeline on real MPI processes: every rank's spans in rank 0's one file, on one clock.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_timeline.py`` for N = 1, 2, 3.
Besides the spans each rank can check alone (names, order, no overlap on a track), the ranks'
clocks are checked against each other: an all-reduce cannot finish on any rank before every
rank has started it, so each rank's wait must end after every rank's backward ended.

The ranks run on one host, whose clock they share, so the test knows each rank's true offset
and hence the error of the alignment the timeline measured. No allowance in time is assumed:
the error is bounded by the one Cristian's method guarantees (half a round trip, at most
half of the time rank 0 took to align the clocks), and the order across ranks is checked on
the times with that error taken out, so a loaded machine makes the test slower, never wrong.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn import SGD, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import SingleProcessCommunicator, get_communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed import timeline as timeline_module
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.timeline import STEP_TRACK, Timeline
from mnn.distributed.training.trainer import train

STEP_SPANS = ["forward", "backward", "wait", "optimizer"]
# Microseconds: the file's times are written with three decimals.
ROUNDING_US = 1e-3


def end(event):
    return event["ts"] + event["dur"]


def check_trace(path, world_size, steps, buckets, alignment_errors_us):
    """Every rank's spans of every step are in the file, and nothing in it is impossible.

    ``alignment_errors_us[rank]``: how far the timeline placed that rank's times before the true
    ones (see ``measured_alignment``); the order across ranks is checked with it taken out."""
    events = json.loads(Path(path).read_text())
    process_names = {event["pid"]: event["args"]["name"] for event in events if event["name"] == "process_name"}
    assert process_names == {rank: f"rank {rank}" for rank in range(world_size)}
    spans = [event for event in events if event["ph"] == "X"]
    assert {event["pid"] for event in spans} == set(range(world_size))

    # One track at a time: its spans follow each other.
    tracks = {}
    for event in spans:
        tracks.setdefault((event["pid"], event["tid"]), []).append(event)
    assert set(tracks) == {(rank, track) for rank in range(world_size) for track in range(buckets + 1)}
    for track in tracks.values():
        track.sort(key=lambda event: event["ts"])
        assert all(end(before) <= after["ts"] + ROUNDING_US for before, after in zip(track, track[1:]))

    by_rank_and_step = {}
    for event in spans:
        by_rank_and_step.setdefault((event["pid"], event["args"]["step"]), []).append(event)
    assert set(by_rank_and_step) == {(rank, step) for rank in range(world_size) for step in steps}
    parts = {}
    for (rank, step), events_of_step in by_rank_and_step.items():
        on_step_track = sorted((event for event in events_of_step if event["tid"] == STEP_TRACK),
                               key=lambda event: event["ts"])
        assert [event["name"] for event in on_step_track] == STEP_SPANS
        forward, backward, wait, optimizer = on_step_track
        reductions = [event for event in events_of_step if event["tid"] != STEP_TRACK]
        assert sorted(event["args"]["bucket"] for event in reductions) == list(range(buckets))
        for event in reductions:  # started after backward began, seen done before the wait ended
            assert backward["ts"] - ROUNDING_US <= event["ts"] and end(event) <= end(wait) + ROUNDING_US
        parts[rank, step] = backward, wait

    # Across ranks, on the true clock: each rank's wait ends after every rank's backward ended.
    for step in steps:
        last_backward = max(end(parts[rank, step][0]) + alignment_errors_us[rank] for rank in range(world_size))
        for rank in range(world_size):
            assert end(parts[rank, step][1]) + alignment_errors_us[rank] >= last_backward - 2 * ROUNDING_US, \
                (rank, step)
    return spans


@pytest.fixture(name="measured_alignment")
def measured_alignment_fixture(comm, monkeypatch):
    """``measured_alignment(skew)``, called after a timeline was opened on every rank with the
    clock ``time.perf_counter() + skew``: each rank's alignment error in microseconds (the
    timeline's time minus the true one, on rank 0's clock), checked against Cristian's bound.

    The ranks share the host's clock, so rank r's true zero on its own clock is rank 0's zero
    plus the difference of their skews; what the timeline took for it differs by the error."""
    opened = {}
    align = timeline_module._rank0_zero

    def timed_alignment(timeline_comm):
        started = time.perf_counter()
        opened["zero"] = align(timeline_comm)
        opened["seconds"] = time.perf_counter() - started
        return opened["zero"]
    monkeypatch.setattr(timeline_module, "_rank0_zero", timed_alignment)

    def measured_alignment(skew=0.0):
        everyone = comm.allgather((opened["zero"], skew, opened["seconds"]))
        zero0, skew0, seconds0 = everyone[0]
        errors_s = [zero - skew - (zero0 - skew0) for zero, skew, _ in everyone]
        # Rank 0 noted t1 <= t_r <= t4 within the time it took to align them all, and took the
        # middle: no rank's error exceeds half of that time (give or take the floats' rounding).
        for rank, error in enumerate(errors_s):
            assert abs(error) <= seconds0 / 2 + 16 * math.ulp(abs(zero0) + abs(skew0) + 1e4), (rank, error, seconds0)
        return [error * 1e6 for error in errors_s]
    return measured_alignment


def train_with_timeline(comm, path, allreduce, steps=4):
    timeline = Timeline(comm, path, flush_every_steps=3)  # and a flush inside the run
    rng = np.random.default_rng(comm.rank)
    net = SequentialLayers([LinearLayer(6, 12, rng=0), ReluLayer(), LinearLayer(12, 8, rng=1), ReluLayer(),
                            LinearLayer(8, 4, rng=2), CrossEntropyLossLayer()])
    dp = DataParallel(net, SGD(net, lr=0.1), comm, bucket_bytes=300, allreduce=allreduce, timeline=timeline)
    for step in range(1, steps + 1):
        timeline.next_step(step)
        dp(rng.standard_normal((5, 6)).astype(np.float32), rng.integers(0, 4, 5))
        dp.backward(global_batch_size=5 * comm.size)
        dp.step()
    timeline.close()
    comm.barrier()
    return len(dp.buckets)


# ids that are not "mpi": pytest-mpi takes a test with the keyword "mpi" for an MPI test.
@pytest.mark.parametrize("allreduce", ["mpi", "ring"], ids=["MPI-allreduce", "ring-allreduce"])
def test_every_rank_s_spans_on_one_clock(comm, shared_dir, allreduce, measured_alignment):
    path = shared_dir / f"{allreduce}.json"
    buckets = train_with_timeline(comm, path, allreduce)
    check_trace(path, comm.size, steps=[1, 2, 3, 4], buckets=buckets, alignment_errors_us=measured_alignment())


def test_clocks_that_disagree_are_aligned(comm, shared_dir, monkeypatch, measured_alignment):
    # Each rank's clock as another host's might read: 1000 s apart from rank to rank; and
    # the ranks open the timeline 50 ms apart, so that no rank's own opening time is a zero
    # that would pass for rank 0's.
    skew = 1000.0 * comm.rank - 500.0
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + skew)
    time.sleep(0.05 * comm.rank)
    path = shared_dir / "skewed.json"
    buckets = train_with_timeline(comm, path, "mpi")
    errors_us = measured_alignment(skew)
    monkeypatch.undo()
    spans = check_trace(path, comm.size, steps=[1, 2, 3, 4], buckets=buckets, alignment_errors_us=errors_us)
    assert all(0 <= event["ts"] + errors_us[event["pid"]] for event in spans)  # on rank 0's clock, from its zero
    assert all(math.isfinite(event["ts"]) and event["ts"] < 60e6 for event in spans)


@pytest.mark.parametrize("kind", ["world", "self", "single"])
def test_gather_gives_root_every_value_in_rank_order(kind):
    comm = SingleProcessCommunicator() if kind == "single" else \
        get_communicator(MPI.COMM_WORLD if kind == "world" else MPI.COMM_SELF)
    for root in {0, comm.size - 1}:
        got = comm.gather({"rank": comm.rank}, root=root)
        assert got == ([{"rank": rank} for rank in range(comm.size)] if comm.rank == root else None)
    with pytest.raises(ValueError, match="root must be a rank"):
        comm.gather(1, root=comm.size)


@pytest.mark.mpi
def test_train_writes_one_timeline_for_all_ranks(comm, shared_dir, measured_alignment):
    path = shared_dir / "runs" / "timeline.json"
    summary = train(TrainConfig(layers=[64, 32, 10], batch_size=100, epochs=1, max_steps=6, eval_every=0,
                                allreduce="ring", timeline=str(path)), comm)
    comm.barrier()
    assert summary["steps"] == 6
    check_trace(path, comm.size, steps=[1, 2, 3, 4, 5, 6], buckets=1, alignment_errors_us=measured_alignment())
