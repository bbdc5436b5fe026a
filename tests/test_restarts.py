"""Restarts (``mnn-launch --max-restarts``): a job whose rank is killed starts again from its
newest checkpoint and ends with the model of an uninterrupted run; what a restart cannot fix
is never restarted. Real jobs of 3 ranks under the MPI of this Python (make test runs this
file under MPICH and under Open MPI); each kill waits for a step the job has reached, as its
output directory's lock records it."""
import json
import os
import re
import signal
import sys

import numpy as np
import pytest

from mnn.distributed.launch import JobEnd
from mnn.distributed.launch.restarts import RestartPolicy, hosts_for_restart, restart_cause
from mnn.distributed.launch.settings import LaunchSettings
from mnn.distributed.launch.tree import local_ranks
from mnn.distributed.training.output_dir import recorded_step
from processes import LAUNCH, TRAIN, finish, needs_mpiexec, start, wait_for

pytestmark = [needs_mpiexec,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ranks from /proc")]

# The digits MLP in float64, long enough to be killed twice mid-run (about 3,000 steps).
JOB = ["--epochs", "130", "--dtype", "float64", "--eval-every", "0", "--log-every", "1000",
       "--optimizer", "momentum"]


def lock_step(output):
    """The global step the job writing ``output`` has done, as its lock says (None: no lock yet)."""
    return recorded_step(output)


def events(output, kind):
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [event for line in path.read_text().splitlines() if line.strip()
            for event in [json.loads(line)] if event["event"] == kind]


def kill_a_rank_at(job, output, step, rank=1):
    """SIGKILL ``rank`` of the job once its lock says ``step`` steps are done."""
    wait_for(lambda: (lock_step(output) or 0) >= step or job.poll() is not None, f"step {step}", timeout=120)
    assert job.poll() is None, "the job ended before the kill"
    ranks = {}
    # the ranks on this machine below mnn-launch (its launcher is its child)
    wait_for(lambda: ranks.update(local_ranks(job.pid)) or rank in ranks, f"rank {rank}'s process")
    os.kill(ranks[rank], signal.SIGKILL)


def launch(output, *options, ranks=("-n", "3"), train=JOB):
    return start([*LAUNCH, *ranks, *options, "--", *TRAIN, *train, "--output", str(output)])


def model(output):
    with np.load(output / "model.npz") as arrays:
        return {name: arrays[name] for name in arrays.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The model that 3 ranks train without a failure."""
    output = tmp_path_factory.mktemp("uninterrupted")
    status, stdout, stderr = finish(launch(output), timeout=300)
    assert status == 0, stdout + stderr
    return model(output)


def test_a_rank_killed_twice_restarts_twice_and_ends_with_the_uninterrupted_model(tmp_path, uninterrupted):
    job = launch(tmp_path, "--max-restarts", "2", train=[*JOB, "--checkpoint-every-steps", "5"])
    kill_a_rank_at(job, tmp_path, 400)
    wait_for(lambda: len(events(tmp_path, "restart")) == 1 or job.poll() is not None, "the first restart")
    kill_a_rank_at(job, tmp_path, 1400, rank=2)
    status, stdout, stderr = finish(job, timeout=300)
    assert status == 0, stdout + stderr
    restarts = [line for line in stderr.splitlines() if line.startswith("mnn-launch: restart ")]
    assert [line.split(" after ")[0] for line in restarts] == ["mnn-launch: restart 1 of 2",
                                                               "mnn-launch: restart 2 of 2"], stderr
    # the cause as the launcher told it: the killed rank, or under load the exit of a rank whose
    # MPI call failed first when its peer died
    assert all(line.endswith(": 3 ranks -> 3; the job continues from its newest checkpoint") for line in restarts)
    trained = model(tmp_path)
    assert trained.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():  # the same ranks: the same sums, bit for bit
        assert np.array_equal(trained[name], value), name
    first, second = events(tmp_path, "restart")
    for event in (first, second):
        assert event["ranks_before"] == event["ranks_after"] == 3
        # a checkpoint every 5 steps, or an epoch's (23 steps); redone: at most a checkpoint's steps,
        # and those of the one still being written when the kill came
        assert event["checkpoint_step"] % 5 == 0 or event["checkpoint_step"] % 23 == 0, event
        assert 0 <= event["redo_steps"] < 2 * 5, event
        assert event["reached_step"] == event["checkpoint_step"] + event["redo_steps"]
        assert event["detect_s"] >= 0 and event["restart_s"] > 0
    assert first["checkpoint_step"] >= 395 and second["checkpoint_step"] >= 1395
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 2
    assert summary["steps_redone"] == first["redo_steps"] + second["redo_steps"]
    assert summary["lost_s"] >= first["restart_s"] + second["restart_s"]
    assert "took over the lock" in stdout and "restart 2 of 2: 3 ranks -> 3, continuing from the checkpoint" in stdout


def test_a_restart_on_fewer_ranks_ends_with_the_uninterrupted_model_up_to_rounding(tmp_path, uninterrupted):
    """The hostfile read again before the restart has lost a slot: 3 ranks -> 2 (--min-ranks 2)."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:3\n")
    output = tmp_path / "run"
    job = launch(output, "--max-restarts", "1", "--min-ranks", "2", ranks=("--hostfile", str(hostfile)),
                 train=[*JOB, "--checkpoint-every-steps", "7"])
    wait_for(lambda: (lock_step(output) or 0) >= 300 or job.poll() is not None, "step 300", timeout=120)
    hostfile.write_text("localhost:2\n")
    kill_a_rank_at(job, output, 300)
    status, stdout, stderr = finish(job, timeout=300)
    assert status == 0, stdout + stderr
    assert re.search(r"^mnn-launch: restart 1 of 1 after .*: 3 ranks -> 2; the job continues from its newest "
                     r"checkpoint$", stderr, re.MULTILINE), stderr
    restart, = events(output, "restart")
    assert (restart["ranks_before"], restart["ranks_after"]) == (3, 2)
    assert json.loads((output / "summary.json").read_text())["world_size"] == 2
    trained = model(output)
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(trained[name], value, rtol=0, atol=1e-9, err_msg=name)


def test_a_failure_before_the_first_checkpoint_restarts_from_the_start(tmp_path, uninterrupted):
    job = launch(tmp_path, "--max-restarts", "1", train=[*JOB, "--checkpoint-every", "0"])
    kill_a_rank_at(job, tmp_path, 200)
    status, stdout, stderr = finish(job, timeout=300)
    assert status == 0, stdout + stderr
    restart, = events(tmp_path, "restart")
    assert restart["checkpoint_step"] == 0 and restart["redo_steps"] >= 200
    assert "continuing from the beginning (no checkpoint yet)" in stdout
    for name, value in uninterrupted.items():
        assert np.array_equal(model(tmp_path)[name], value), name


def test_too_few_ranks_left_end_the_job_with_the_failure_and_one_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:3\n")
    output = tmp_path / "run"
    job = launch(output, "--max-restarts", "3", "--min-ranks", "2", ranks=("--hostfile", str(hostfile)))
    wait_for(lambda: (lock_step(output) or 0) >= 100 or job.poll() is not None, "step 100", timeout=120)
    hostfile.write_text("localhost:1\n")
    kill_a_rank_at(job, output, 100)
    status, stdout, stderr = finish(job, timeout=120)
    assert status not in (0, 2, 130), stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mnn-launch: cannot restart the job after ") and last.endswith(
        f": 1 rank left, fewer than --min-ranks 2; it ends with exit status {status}"), stderr
    assert (output / "checkpoint.npz").exists()  # the run's work is kept for a --resume by hand


def test_restarts_used_up_end_with_the_last_failures_status_and_one_line(tmp_path):
    job = start([*LAUNCH, "-n", "2", "--max-restarts", "2", "--", sys.executable, "-c",
                 "import os, sys; os.write(1, f\"start {os.environ['MNN_RESTART_COUNT']}\\n\".encode()); sys.exit(3)"])
    status, stdout, stderr = finish(job, timeout=120)
    assert status == 3, stdout + stderr
    assert sorted(re.findall(r"start (\d)", stdout)) == ["0", "0", "1", "1", "2", "2"], stdout
    assert stderr.count("mnn-launch: restart ") == 2
    assert stderr.strip().splitlines()[-1] == ("mnn-launch: 2 restarts used up (--max-restarts): the job ends with "
                                               "the status of its last failure, 3 (the launcher's exit status 3)")


@pytest.mark.parametrize("case", ["bad job", "diverged", "interrupted"])
def test_a_bad_job_a_divergence_and_an_interrupt_are_never_restarted(tmp_path, case):
    train = {"bad job": ["--batch-size", "0"], "diverged": [*JOB, "--lr", "1e12"], "interrupted": JOB}[case]
    job = launch(tmp_path, "--max-restarts", "2", train=train)
    if case == "interrupted":
        wait_for(lambda: (lock_step(tmp_path) or 0) >= 50 or job.poll() is not None, "step 50", timeout=120)
        job.send_signal(signal.SIGINT)
    status, stdout, stderr = finish(job, timeout=120)
    assert status == {"bad job": 2, "diverged": 1, "interrupted": 130}[case], stdout + stderr
    assert "restart" not in stderr and not events(tmp_path, "restart"), stderr


def test_what_a_restart_can_fix():
    assert restart_cause(JobEnd(137, death="rank 1 on node2 (process 7) was killed by signal 9 (SIGKILL)")) == \
        "rank 1 on node2 (process 7) was killed by signal 9 (SIGKILL)"
    assert restart_cause(JobEnd(1, stalled=True)) == "a rank's stall report (above)"
    assert restart_cause(JobEnd(1)) == "the launcher's exit status 1"  # a rank's crash, an unexpected error
    for end in (JobEnd(0), JobEnd(2), JobEnd(130), JobEnd(143, interrupted=True), JobEnd(1, run_error=True)):
        assert restart_cause(end) is None, end


def test_the_ranks_of_a_restart_lose_the_slots_of_hosts_left_out_beyond_the_unused_ones(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:4\n")
    settings = LaunchSettings(command=("true",), ranks=3, hosts=(("localhost", 4),))
    again, left_out = hosts_for_restart(settings, RestartPolicy(1, 1, str(hostfile)), os.environ,
                                        parse_hostfile=lambda path: [("localhost", 2)])
    assert (again.ranks, again.hosts, left_out) == (2, (("localhost", 2),), [])
    unchanged, _ = hosts_for_restart(settings, RestartPolicy(1), os.environ, parse_hostfile=None)
    assert unchanged == settings
