"""The timeline on one process: the Chrome trace-event file, its chunks, DataParallel's spans,
the trainer's --timeline, and a disabled timeline that does nothing at all.
Several ranks, with their clocks aligned, are in tests/mpi/test_timeline.py.
"""
import errno
import json
import os
import time

import numpy as np
import pytest

from mnn import SGD, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import Communicator, RankFailure, SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.timeline import STEP_TRACK, Timeline, check_timeline_path
from mnn.distributed.training.preflight import JobConfigError
from mnn.distributed.training.trainer import train

STEP_SPANS = ["forward", "backward", "wait", "optimizer"]


def complete_events(path):
    return [event for event in json.loads(path.read_text()) if event["ph"] == "X"]


class NoCalls(Communicator):
    """Two ranks that must never be talked to: every call fails the test."""

    rank, size = 0, 2

    def __getattribute__(self, name):
        if name in ("rank", "size", "__class__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"a disabled timeline called comm.{name}")


def test_a_disabled_timeline_calls_no_one_and_records_nothing():
    timeline = Timeline(NoCalls(), None)
    assert not timeline.enabled
    timeline.name_track(1, "all-reduce bucket 0")
    for step in range(1, 300):
        timeline.next_step(step)
        timeline.span("forward", 0.0, 1.0)
    timeline.flush()
    timeline.close()
    assert timeline.step is None


def test_spans_are_written_by_rank_0_as_chrome_trace_events(tmp_path):
    path = tmp_path / "new folder" / "timeline.json"
    timeline = Timeline(SingleProcessCommunicator(), path)
    timeline.name_track(1, "all-reduce bucket 0")
    timeline.next_step(1)
    start = time.perf_counter()
    timeline.span("forward", start, start + 0.001)
    timeline.span("all-reduce", start + 0.001, start + 0.003, track=1, args={"bucket": 0})
    timeline.close()

    events = json.loads(path.read_text())
    names = {(event["name"], event.get("tid")): event["args"] for event in events if event["ph"] == "M"}
    assert names[("process_name", None)] == {"name": "rank 0"}
    assert names[("thread_name", STEP_TRACK)] == {"name": "step"}
    assert names[("thread_name", 1)] == {"name": "all-reduce bucket 0"}
    forward, reduce = complete_events(path)
    assert (forward["name"], forward["pid"], forward["tid"], forward["args"]) == ("forward", 0, 0, {"step": 1})
    assert reduce["tid"] == 1 and reduce["args"] == {"step": 1, "bucket": 0}
    # Microseconds from the moment the timeline opened.
    assert 0 <= forward["ts"] < 1e6 and forward["dur"] == pytest.approx(1000, abs=0.01)
    assert reduce["ts"] == pytest.approx(forward["ts"] + 1000, abs=0.01)
    assert reduce["dur"] == pytest.approx(2000, abs=0.01)
    timeline.span("forward", start, start)  # closed: nothing more is recorded
    timeline.close()
    assert len(complete_events(path)) == 2


def test_the_file_grows_in_chunks_and_reads_before_it_is_closed(tmp_path):
    path = tmp_path / "timeline.json"
    timeline = Timeline(SingleProcessCommunicator(), path, flush_every_steps=3)
    for step in range(1, 8):
        timeline.next_step(step)
        timeline.span("forward", time.perf_counter(), time.perf_counter())
    # Steps 1-3 went out when step 4 began, 4-6 when step 7 did; step 7's span is still
    # held. Unclosed, the file is an array without its "]", as the viewers accept.
    text = path.read_text()
    assert not text.rstrip().endswith("]")
    events = [event for event in json.loads(text + "]") if event["ph"] == "X"]
    assert [event["args"]["step"] for event in events] == [1, 2, 3, 4, 5, 6]
    timeline.close()
    assert [event["args"]["step"] for event in complete_events(path)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_file_rank_0_cannot_create_fails_on_every_rank(tmp_path):
    (tmp_path / "a file").write_text("")
    with pytest.raises(RankFailure, match="a file"):
        Timeline(SingleProcessCommunicator(), tmp_path / "a file" / "timeline.json")


def make_net(seed=0):
    return SequentialLayers([LinearLayer(6, 12, rng=seed), ReluLayer(), LinearLayer(12, 8, rng=seed + 1),
                             ReluLayer(), LinearLayer(8, 4, rng=seed + 2), CrossEntropyLossLayer()])


def spans_by_step(events):
    by_step = {}
    for event in events:
        by_step.setdefault(event["args"]["step"], []).append(event)
    return by_step


# ids that are not "mpi": pytest-mpi takes a test with the keyword "mpi" for an MPI test.
@pytest.mark.parametrize("allreduce", ["mpi", "ring"], ids=["MPI-allreduce", "ring-allreduce"])
def test_data_parallel_records_every_part_of_each_step(tmp_path, allreduce):
    path = tmp_path / "timeline.json"
    comm = SingleProcessCommunicator()
    timeline = Timeline(comm, path)
    net = make_net()
    dp = DataParallel(net, SGD(net, lr=0.1), comm, bucket_bytes=300, allreduce=allreduce, timeline=timeline)
    assert len(dp.buckets) == 3
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):
        timeline.next_step(step)
        dp(rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 4, 8))
        dp.backward(global_batch_size=8)
        dp.step()
    timeline.close()

    by_step = spans_by_step(complete_events(path))
    assert sorted(by_step) == [1, 2, 3]
    for spans in by_step.values():
        steps = sorted((event for event in spans if event["tid"] == STEP_TRACK), key=lambda event: event["ts"])
        assert [event["name"] for event in steps] == STEP_SPANS
        for before, after in zip(steps, steps[1:]):
            assert before["ts"] + before["dur"] <= after["ts"] + 1e-3
        backward, wait = steps[1], steps[2]
        reductions = [event for event in spans if event["tid"] != STEP_TRACK]
        assert sorted(event["args"]["bucket"] for event in reductions) == [0, 1, 2]
        for event in reductions:
            assert event["name"] == "all-reduce" and event["tid"] == event["args"]["bucket"] + 1
            assert event["args"]["algorithm"] == allreduce
            # Started once its layers' backward was done, done before the wait ended.
            assert backward["ts"] - 1e-3 <= event["ts"]
            assert event["ts"] + event["dur"] <= wait["ts"] + wait["dur"] + 1e-3
            if allreduce == "ring":  # blocking, in synchronize: inside the wait
                assert wait["ts"] - 1e-3 <= event["ts"]


def test_train_writes_the_timeline_and_refuses_a_path_it_cannot_write(tmp_path):
    path = tmp_path / "timeline.json"
    config = TrainConfig(layers=[64, 16, 10], epochs=1, max_steps=5, timeline=str(path), eval_every=0)
    summary = train(config, SingleProcessCommunicator())
    assert summary["steps"] == 5
    by_step = spans_by_step(complete_events(path))
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    assert all({event["name"] for event in spans} == {*STEP_SPANS, "all-reduce"} for spans in by_step.values())

    (tmp_path / "a file").write_text("")
    with pytest.raises(JobConfigError, match="a file"):
        train(TrainConfig(layers=[64, 16, 10], epochs=1, timeline=str(tmp_path / "a file" / "t.json")),
              SingleProcessCommunicator())


def test_a_timeline_overwrites_only_a_timeline_mnn_wrote(tmp_path):
    path = tmp_path / "timeline.json"
    check_timeline_path(path)  # not there yet
    Timeline(SingleProcessCommunicator(), path).close()
    check_timeline_path(path)  # a timeline of an earlier run
    Timeline(SingleProcessCommunicator(), path).close()
    assert json.loads(path.read_text())[0]["name"] == "timeline"

    notes = tmp_path / "notes.json"
    notes.write_text('[\n{"name": "mine"}]\n')
    for other, problem in [(notes, "exists and is not a timeline mnn wrote"), (tmp_path, "is a directory"),
                           (tmp_path / "empty", "exists and is not a timeline mnn wrote")]:
        if other.name == "empty":
            other.write_bytes(b"")
        with pytest.raises(ValueError, match=f"timeline: '{other}' {problem}"):
            check_timeline_path(other)
        with pytest.raises(RankFailure, match=problem):
            Timeline(SingleProcessCommunicator(), other)
    assert notes.read_text() == '[\n{"name": "mine"}]\n'
    if os.path.exists("/dev/full"):
        with pytest.raises(ValueError, match="is not a timeline mnn wrote"):
            check_timeline_path("/dev/full")
    with pytest.raises(ValueError, match="is a checkpoint, which the timeline must not overwrite"):
        check_timeline_path(tmp_path / "new.json", run_output="a checkpoint")


@pytest.mark.parametrize("name", ["checkpoint.npz", "checkpoint-00000046.npz", "metrics.jsonl", "model.npz",
                                  "summary.json", "config.toml", ".mnn.lock", "diverged.npz", "previous/t.json"])
def test_train_refuses_a_timeline_over_its_own_outputs_before_touching_them(tmp_path, name):
    output = tmp_path / "out"
    config = TrainConfig(layers=[64, 16, 10], epochs=1, output=str(output), timeline=str(output / name))
    with pytest.raises(JobConfigError, match=f"timeline: '{output / name}' is .*output directory"):
        train(config, SingleProcessCommunicator())
    assert not output.exists()


class FullDisk:
    """A file that takes nothing more: every write fails as on a full disk."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write

    def close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_timeline_that_cannot_be_written_costs_the_timeline_not_the_run(tmp_path, monkeypatch, capsys):
    path = tmp_path / "timeline.json"
    timeline = Timeline(SingleProcessCommunicator(), path, flush_every_steps=2)
    timeline._file = FullDisk()
    for step in range(1, 5):
        timeline.next_step(step)
        timeline.span("forward", 0.0, 1.0)
    assert not timeline.enabled and timeline._spans == []
    timeline.close()
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"mnn: warning: the timeline {path} cannot be written (OSError: [Errno 28] No space left "
                        f"on device); training goes on without it from step 2"]

    # in a run: the disk fills up at the first flush; the run completes and writes its files
    opened = Timeline._open

    def open_then_fill_up(self):
        opened(self)
        self._file = FullDisk()
    monkeypatch.setattr(Timeline, "_open", open_then_fill_up)
    config = TrainConfig(layers=[64, 16, 10], epochs=1, output=str(tmp_path / "out"), timeline=str(path),
                         eval_every=0)
    summary = train(config, SingleProcessCommunicator())
    assert summary["steps"] == 23 and (tmp_path / "out" / "model.npz").exists()
    assert capsys.readouterr().err.count("mnn: warning: the timeline") == 1
