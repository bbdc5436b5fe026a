"""Faults during a training run, end to end: a run that diverges, steps skipped without
end, a timeline that must not overwrite or cannot write, an output directory that turns
read-only, a metrics.jsonl that is not UTF-8, and rank 0 working alone while a short
stall timeout runs.

Real ``mnn-train`` processes under the ``mpiexec`` beside this Python (MPICH or Open
MPI: ``make test`` runs this file under both), with the helpers of tests/test_faults.py.
The tests that need a file system that fills up or turns read-only mount a small tmpfs,
and are skipped where mounting is not permitted.
"""
import contextlib
import json
import subprocess
import time
import uuid

import numpy as np
import pytest

from processes import ENV, TRAIN, mpiexec, needs_mpiexec, run
from test_faults import STEPS_PER_EPOCH, script, strict_events

from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.io import load_arrays


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("mnn-train: error:")]


@contextlib.contextmanager
def small_tmpfs(tmp_path, size):
    """A tmpfs of ``size`` mounted in ``tmp_path``; the test is skipped where mounting is not permitted."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# --- a run that diverges -------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.slow
def test_a_diverging_resumed_run_leaves_its_checkpoint_and_the_suggested_resume_trains(tmp_path):
    good = run(["--epochs", "2", "--output", str(tmp_path)], ranks=2)
    assert good.returncode == 0, good.stderr
    checkpoint = (tmp_path / "checkpoint.npz").read_bytes()

    diverged = run(["--epochs", "3", "--lr", "1e10", "--resume", "--output", str(tmp_path)], ranks=2)
    assert diverged.returncode == 1, diverged.stderr
    errors = error_lines(diverged)
    assert len(errors) == 1 and "training diverged at epoch 3/3 step " in errors[0], diverged.stderr
    assert f"The last checkpoint, {tmp_path / 'checkpoint.npz'} at the end of epoch 2/3, is left as it was: " \
           "continue with --resume and a lower --lr" in errors[0]
    assert "Traceback" not in diverged.stderr
    assert (tmp_path / "checkpoint.npz").read_bytes() == checkpoint  # the good one, never the exploded one
    stopped = [event for event in strict_events(tmp_path / "metrics.jsonl") if event["event"] == "nonfinite"]
    assert len(stopped) == 1 and stopped[0]["action"] == "stopped"
    if stopped[0]["global_step"] > 2 * STEPS_PER_EPOCH + 1:  # steps were applied after the checkpoint
        kept = load_checkpoint(tmp_path / "diverged.npz")
        assert kept.position.global_step == stopped[0]["global_step"] - 1
        assert f"is in {tmp_path / 'diverged.npz'}, for inspection" in errors[0]

    again = run(["--epochs", "3", "--lr", "0.1", "--resume", "--output", str(tmp_path)], ranks=2)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3 * STEPS_PER_EPOCH


@needs_mpiexec
def test_a_fresh_run_that_diverges_writes_no_checkpoint(tmp_path):
    result = run(["--epochs", "2", "--lr", "1e10", "--output", str(tmp_path)], ranks=2)
    assert result.returncode == 1, result.stderr
    assert "No checkpoint was written: start again with a lower --lr" in error_lines(result)[0]
    assert not list(tmp_path.glob("checkpoint*.npz"))


# --- skipped steps ----------------------------------------------------------------------------------

@needs_mpiexec
def test_skipping_stops_after_max_skipped_steps_in_a_row(tmp_path):
    result = run(["--epochs", "3", "--lr", "1e10", "--on-nonfinite", "skip", "--max-skipped-steps", "4",
                  "--output", str(tmp_path)], ranks=2)
    assert result.returncode == 1, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and "4 steps in a row were not finite (--max-skipped-steps 4)" in errors[0]
    events = [event for event in strict_events(tmp_path / "metrics.jsonl") if event["event"] == "nonfinite"]
    assert [event["action"] for event in events] == ["skipped"] * 3 + ["stopped"]
    assert not (tmp_path / "model.npz").exists() and not (tmp_path / "summary.json").exists()


@needs_mpiexec
@pytest.mark.slow
def test_a_run_whose_every_step_is_skipped_fails_and_a_run_with_some_says_how_many(tmp_path):
    probe = script("""
        import math
        from mnn.distributed.data_parallel import DataParallel
        forward = DataParallel.forward
        DataParallel.forward = lambda self, inputs, targets=None: forward(self, inputs, targets) * math.nan
    """)
    nothing = subprocess.run(mpiexec(2) + probe + ["--epochs", "1", "--on-nonfinite", "skip", "--max-skipped-steps",
                                                   "0", "--output", str(tmp_path / "a")],
                             capture_output=True, text=True, timeout=120, env=ENV)
    assert nothing.returncode == 1, nothing.stderr
    assert f"every step of this run ({STEPS_PER_EPOCH}) was not finite, so nothing was trained" \
        in error_lines(nothing)[0]
    assert not (tmp_path / "a" / "model.npz").exists()

    some = run(["--epochs", "1", "--lr", "1e6", "--on-nonfinite", "skip", "--max-skipped-steps", "0",
                "--output", str(tmp_path / "b")], ranks=2)
    assert some.returncode == 0, some.stderr
    skipped = len([event for event in strict_events(tmp_path / "b" / "metrics.jsonl")
                   if event["event"] == "nonfinite"])
    assert 0 < skipped < STEPS_PER_EPOCH
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["skipped_steps"] == skipped
    assert f"{STEPS_PER_EPOCH} steps ({skipped} skipped), 1 epoch done" in some.stdout


# --- the timeline ------------------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.slow
def test_the_timeline_never_overwrites_a_checkpoint_or_a_file_it_did_not_write(tmp_path):
    first = run(["--epochs", "1", "--output", str(tmp_path)], ranks=2)
    assert first.returncode == 0, first.stderr
    checkpoint = (tmp_path / "checkpoint.npz").read_bytes()
    for extra in (["--resume"], []):  # a fresh run would first move the checkpoint into previous/
        result = run(["--epochs", "2", "--output", str(tmp_path), "--timeline", str(tmp_path / "checkpoint.npz"),
                      *extra], ranks=2)
        assert result.returncode == 2, result.stderr
        errors = error_lines(result)
        assert len(errors) == 1 and f"timeline: '{tmp_path / 'checkpoint.npz'}' is a file of this run's output " \
            "directory" in errors[0], result.stderr
        assert (tmp_path / "checkpoint.npz").read_bytes() == checkpoint
        assert not (tmp_path / "previous").exists()

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    result = run(["--epochs", "1", "--timeline", str(notes)], ranks=2)
    assert result.returncode == 2 and "is not a timeline mnn wrote" in error_lines(result)[0], result.stderr
    assert notes.read_text() == '{"mine": true}\n'


@needs_mpiexec
@pytest.mark.slow
def test_a_full_disk_under_the_timeline_costs_the_timeline_not_the_run(tmp_path):
    with small_tmpfs(tmp_path, "12k") as full:
        result = run(["--epochs", "5", "--output", str(tmp_path / "out"), "--timeline", str(full / "timeline.json")],
                     ranks=2)
        assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "mnn: warning: the timeline" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], result.stderr
    assert "training goes on without it" in warnings[0] and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["epochs"] == 5
    assert load_checkpoint(tmp_path / "out" / "checkpoint.npz").position.epochs_done == 5


# --- the output directory ------------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.slow
def test_an_output_directory_that_turns_read_only_stops_the_run_with_one_line(tmp_path):
    with small_tmpfs(tmp_path, "8m") as disk:
        output = disk / "out"
        job = subprocess.Popen(mpiexec(2) + TRAIN + ["--epochs", "100000", "--output", str(output)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            deadline = time.monotonic() + 60
            while not (output / "checkpoint.npz").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
            if remounted.returncode != 0:
                pytest.skip(f"cannot remount the tmpfs read-only: {remounted.stderr.strip()}")
            stdout, stderr = job.communicate(timeout=120)
        finally:
            job.kill()
            job.wait()
        assert job.returncode == 1, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("mnn-train: error:")]
        assert len(errors) == 1, stderr
        assert f"cannot write {output}" in errors[0] and "Read-only file system" in errors[0]
        assert f"the last checkpoint is {output / 'checkpoint.npz'}, at the end of epoch " in errors[0]
        assert "continue with --resume once" in errors[0]
        assert "Traceback" not in stderr and "MPI_Abort" not in stderr and "aborting" not in stderr
        assert load_checkpoint(output / "checkpoint.npz").position.epochs_done >= 1


@pytest.mark.slow
@pytest.mark.without_mpi
def test_a_metrics_line_that_is_not_utf8_does_not_block_resume(tmp_path):
    no_mpi = {"MNN_NO_MPI": "1"}
    assert run(["--epochs", "1", "--output", str(tmp_path)], **no_mpi).returncode == 0
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:1]) + b'{"event": "\xff\xfe"}\n' + b"".join(lines[1:]))
    resumed = run(["--epochs", "2", "--resume", "--output", str(tmp_path)], **no_mpi)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{metrics}: dropped line 2, which is not UTF-8 JSON" in resumed.stdout
    events = strict_events(metrics)
    assert [event["event"] for event in events].count("summary") == 2


# --- rank 0 working alone --------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.slow
def test_rank_0_building_the_dataset_cache_alone_is_no_stall(tmp_path):
    # The dataset cache is built by rank 0 while the others wait; here it takes three
    # stall timeouts.
    from mnn.datasets import load_dataset
    digits = load_dataset("digits")
    np.savez(tmp_path / "digits.npz", x_train=digits.train.x, y_train=digits.train.y, x_test=digits.test.x,
             y_test=digits.test.y)
    probe = script("""
        import os, time
        import mnn.distributed.training.job_data as job_data
        load = job_data.load_dataset
        def slow_load(spec):
            if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "0":
                time.sleep(6)
            return load(spec)
        job_data.load_dataset = slow_load
    """)
    result = subprocess.run(mpiexec(2) + probe + ["--dataset", str(tmp_path / "digits.npz"), "--epochs", "1",
                                                  "--stall-timeout", "2", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "mnn: stall" not in result.stderr
    assert load_arrays(tmp_path / "out" / "model.npz")
