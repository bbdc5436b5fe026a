"""mnn-train's TensorBoard event files, read back with TensorBoard's own reader.

The event files are written by mnn itself (mnn.distributed.training.event_file); reading
them needs the tensorboard package (the extra ``tensorboard``), so the tests that read
skip without it.
"""
import json

import numpy as np
import pytest

from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.event_file import SCALAR_TAGS, EventFile, event_files
from mnn.distributed.training.output_dir import set_aside_earlier_run
from processes import run


def curves_read_back(directory):
    """{tag: [(step, value), ...]} of the event files in ``directory``, as TensorBoard shows them."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = reader.EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: [(point.step, point.value) for point in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def curves_of_metrics(directory):
    """The same curves from metrics.jsonl, each value rounded to float32 (as event files hold them)."""
    curves = {}
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        for key, tag in SCALAR_TAGS.get(event["event"], {}).items():
            if event.get(key) is not None:
                curves.setdefault(tag, []).append((event["global_step"], float(np.float32(event[key]))))
    return curves


@pytest.mark.slow
@pytest.mark.without_mpi
def test_event_files_hold_the_curves_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")  # unset, the option writes event files where TensorBoard is installed
    output = tmp_path / "runs" / "digits"
    result = run(["--epochs", "2", "--max-steps", "30", "--log-every", "5", "--output", str(output)],
                 MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert len(event_files(output)) == 1
    curves = curves_read_back(output)
    assert set(curves) == {"train/loss", "train/lr", "train/samples_per_s", "test/loss", "test/accuracy"}
    assert curves == curves_of_metrics(output)
    assert [step for step, _ in curves["train/loss"]] == [5, 10, 15, 20, 23, 25, 30]
    assert [step for step, _ in curves["test/accuracy"]] == [23, 30]


@pytest.mark.slow
@pytest.mark.without_mpi
def test_a_run_resumed_from_an_earlier_checkpoint_shows_each_step_once(tmp_path):
    # The first run trains to step 46 and keeps the checkpoint of step 23 beside the last one;
    # the second goes on from step 23: its steps 24 to 46 replace the first run's.
    common = ["--epochs", "2", "--log-every", "10", "--output", str(tmp_path), "--tensorboard"]
    assert run([*common, "--keep-checkpoints", "2"], MNN_NO_MPI="1").returncode == 0
    first = curves_read_back(tmp_path)
    result = run([*common, "--resume", str(tmp_path / "checkpoint-00000023.npz"), "--lr", "0.05"], MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert len(event_files(tmp_path)) == 2
    curves = curves_read_back(tmp_path)
    assert curves == curves_of_metrics(tmp_path)
    assert [step for step, _ in curves["train/loss"]] == [10, 20, 23, 30, 40, 46]
    assert curves["train/loss"][:3] == first["train/loss"][:3]
    assert curves["train/lr"][-1] == (46, pytest.approx(0.05))  # the second run's


@pytest.mark.slow
@pytest.mark.without_mpi
def test_switched_off_there_are_no_event_files(tmp_path):
    result = run(["--epochs", "1", "--max-steps", "3", "--output", str(tmp_path), "--tensorboard", "false"],
                 MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert event_files(tmp_path) == []


def test_event_files_need_an_output_directory():
    with pytest.raises(ValueError, match="tensorboard: true writes the event files into OUTPUT, but output is not"):
        TrainConfig(tensorboard=True)
    with pytest.raises(TypeError, match="tensorboard: expected true or false"):
        TrainConfig(tensorboard="yes", output="out")


def test_a_new_run_sets_an_earlier_runs_event_files_aside_with_its_checkpoints(tmp_path):
    EventFile(tmp_path).add_scalars(1, {"train/loss": 0.5})
    (tmp_path / "checkpoint.npz").write_bytes(b"an earlier run")
    set_aside_earlier_run(tmp_path)
    assert event_files(tmp_path) == []
    assert curves_read_back(tmp_path / "previous") == {"train/loss": [(1, 0.5)]}


def test_null_values_are_left_out(tmp_path):
    events = EventFile(tmp_path)
    events.add_scalars(1, {"test/loss": 0.25, "test/accuracy": None})
    events.add_scalars(2, {"test/accuracy": float("nan")})  # no number at all: no event
    assert curves_read_back(tmp_path) == {"test/loss": [(1, 0.25)]}


def test_a_loss_beyond_float32_is_shown_as_infinite(tmp_path):
    # A diverging run (--on-nonfinite skip) logs losses that float64 holds and float32 does not.
    EventFile(tmp_path).add_scalars(3, {"train/loss": 2.97e66, "train/lr": -1e300})
    curves = curves_read_back(tmp_path)
    assert curves == {"train/loss": [(3, float("inf"))], "train/lr": [(3, float("-inf"))]}
