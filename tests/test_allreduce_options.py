"""mnn-train's --allreduce, --grad-compression and --timeline: one clear error for a bad value,
and a 2-rank run that uses all three."""
import json
from pathlib import Path

import pytest

from mnn.distributed.training.config import TrainConfig, resolve_config
from processes import needs_mpiexec, run


def test_the_defaults_are_mpi_uncompressed_and_no_timeline():
    config = TrainConfig()
    assert (config.allreduce, config.grad_compression, config.timeline) == ("mpi", "none", None)
    assert TrainConfig(timeline=Path("runs/t.json")).timeline == "runs/t.json"  # stored as text, as TOML has it


@pytest.mark.parametrize("values, message", [
    ({"allreduce": "ringg"}, "allreduce: expected one of mpi, ring, got 'ringg'"),
    ({"grad_compression": "fp8", "allreduce": "ring"}, "grad_compression: expected one of none, fp16, got 'fp8'"),
    ({"grad_compression": "fp16"}, "grad_compression: fp16 needs allreduce = \"ring\""),
    ({"timeline": ""}, "timeline: expected a file path or None"),
])
def test_bad_values_are_one_clear_error(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(overrides=values)


@needs_mpiexec
@pytest.mark.parametrize("args, message", [
    (["--allreduce", "ringg"], "argument --allreduce: invalid choice: 'ringg' (choose from"),
    (["--grad-compression", "fp16"], "grad_compression: fp16 needs allreduce = \"ring\""),
])
def test_a_bad_value_on_two_ranks_is_told_once(args, message):
    result = run(args, ranks=2)
    assert result.returncode == 2
    assert result.stderr.count(message) == 1, result.stderr
    assert result.stderr.count("error") == 1, result.stderr


@needs_mpiexec
@pytest.mark.slow
def test_two_ranks_train_through_the_compressed_ring_and_write_a_timeline(tmp_path):
    timeline = tmp_path / "timeline.json"
    result = run(["--allreduce", "ring", "--grad-compression", "fp16", "--timeline", str(timeline),
                  "--epochs", "3", "--output", str(tmp_path / "out")], ranks=2)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9 and summary["steps"] == 3 * 23
    events = [event for event in json.loads(timeline.read_text()) if event["ph"] == "X"]
    assert {event["pid"] for event in events} == {0, 1}
    reductions = [event for event in events if event["name"] == "all-reduce"]
    assert len(reductions) == 2 * 3 * 23
    assert {(event["args"]["algorithm"], event["args"]["compression"]) for event in reductions} == {("ring", "fp16")}
    config = (tmp_path / "out" / "config.toml").read_text()
    assert 'allreduce = "ring"' in config and 'grad_compression = "fp16"' in config
