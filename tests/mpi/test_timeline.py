"""The timeline on real MPI processes: every rank's spans in rank 0's one file, on one clock.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_timeline.py`` for N = 1, 2, 3.
Besides the spans each rank can check alone (names, order, no overlap on a track), the ranks'
clocks are checked against each other: an all-reduce cannot finish on any rank before every
rank has started it, so each rank's wait must end after every rank's backward ended.
"""
import json
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn import SGD, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import SingleProcessCommunicator, get_communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.timeline import STEP_TRACK, Timeline
from mnn.distributed.training.trainer import train

STEP_SPANS = ["forward", "backward", "wait", "optimizer"]
# Microseconds of disagreement allowed between the ranks' aligned clocks and between the
# moments of one rank's spans: the alignment errs by half a round trip (about 1 us here,
# tens of us with more ranks than cores).
SLACK_US = 500.0


def end(event):
    return event["ts"] + event["dur"]


def check_trace(path, world_size, steps, buckets):
    """Every rank's spans of every step are in the file, and nothing in it is impossible."""
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
        assert all(end(before) <= after["ts"] + 1e-3 for before, after in zip(track, track[1:]))

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
            assert backward["ts"] - 1e-3 <= event["ts"] and end(event) <= end(wait) + 1e-3
        parts[rank, step] = backward, wait

    # Across ranks: each rank's wait ends after every rank's backward ended.
    for step in steps:
        last_backward = max(end(parts[rank, step][0]) for rank in range(world_size))
        for rank in range(world_size):
            assert end(parts[rank, step][1]) >= last_backward - SLACK_US, (rank, step)
    return spans


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
def test_every_rank_s_spans_on_one_clock(comm, shared_dir, allreduce):
    path = shared_dir / f"{allreduce}.json"
    buckets = train_with_timeline(comm, path, allreduce)
    check_trace(path, comm.size, steps=[1, 2, 3, 4], buckets=buckets)


def test_clocks_that_disagree_are_aligned(comm, shared_dir, monkeypatch):
    # Each rank's clock as another host's might read: 1000 s apart from rank to rank; and
    # the ranks open the timeline 50 ms apart, so that no rank's own opening time is a zero
    # that would pass for rank 0's.
    skew = 1000.0 * comm.rank - 500.0
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + skew)
    time.sleep(0.05 * comm.rank)
    path = shared_dir / "skewed.json"
    buckets = train_with_timeline(comm, path, "mpi")
    monkeypatch.undo()
    spans = check_trace(path, comm.size, steps=[1, 2, 3, 4], buckets=buckets)
    assert all(0 <= event["ts"] < 60e6 for event in spans)  # on rank 0's clock, from its zero


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
def test_train_writes_one_timeline_for_all_ranks(comm, shared_dir):
    path = shared_dir / "runs" / "timeline.json"
    summary = train(TrainConfig(layers=[64, 32, 10], batch_size=100, epochs=1, max_steps=6, eval_every=0,
                                allreduce="ring", timeline=str(path)), comm)
    comm.barrier()
    assert summary["steps"] == 6
    check_trace(path, comm.size, steps=[1, 2, 3, 4, 5, 6], buckets=1)
