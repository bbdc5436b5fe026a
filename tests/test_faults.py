"""What happens when things go wrong in mnn-train: real processes, real files, both MPIs.

Each test starts ``mnn-train`` under the ``mpiexec`` beside this Python (MPICH
or Open MPI, whichever this environment has) or as one process, brings about
one fault (a bad learning rate, a signal at an awkward moment, a second job on
the same output, ranks that disagree...) and checks what the user sees, what
is kept on disk, and that ``--resume`` continues.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.training.output_dir import LOCK_NAME
from mnn.io import load_arrays
from processes import ENV, TRAIN, mpiexec, needs_mpiexec, run

STEPS_PER_EPOCH = -(-1438 // 64)  # digits, batch 64


def strict_events(path):
    """metrics.jsonl as strict JSON: a bare NaN or Infinity fails here."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def script(code):
    """``python -c`` running ``code`` (dedented) and then mnn-train's main with the given arguments."""
    return [sys.executable, "-c", textwrap.dedent(code) + "\nfrom mnn.scripts.train import main\n"
            "import sys\nsys.exit(main(sys.argv[1:]))\n"]


# --- clear words ---------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.slow
def test_a_usage_error_is_printed_by_one_rank(ranks):
    result = run(["--epochs", "many"], ranks=ranks)
    assert result.returncode == 2
    assert result.stderr.count("usage: mnn-train") == 1, result.stderr
    assert result.stderr.count("argument --epochs: invalid int value: 'many'") == 1


@needs_mpiexec
@pytest.mark.slow
def test_a_global_batch_smaller_than_the_ranks_trains_and_says_so_once(tmp_path):
    result = run(["--batch-size", "2", "--max-steps", "3", "--output", str(tmp_path)], ranks=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("the global batch of 2 is smaller than the 3 ranks: 1 rank gets no sample") == 1


@needs_mpiexec
def test_ranks_running_different_jobs_are_stopped_at_start_up(tmp_path):
    # One mpiexec, two programs (MPMD): rank 1 is given another learning rate.
    output = str(tmp_path / "out")
    command = mpiexec(1) + TRAIN + ["--output", output, "--lr", "0.1", ":"] + ["-n", "1"] + TRAIN + \
        ["--output", output, "--lr", "0.2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("mnn-train: error") == 1
    assert "the ranks do not run the same thing" in result.stderr
    assert "rank 1 on " in result.stderr and "lr = 0.2 (rank 0: 0.1)" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@needs_mpiexec
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a BLAS of 2 threads per rank")
@pytest.mark.slow
def test_blas_threads_are_kept_within_the_cores_when_nobody_set_them(tmp_path):
    env = {name: value for name, value in ENV.items()
           if name not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    cores = len(os.sched_getaffinity(0))
    probe = script("""
        import threadpoolctl
        from mnn.distributed.training import ranks
        limit = ranks.limit_blas_threads
        def report(facts, rank):
            note = limit(facts, rank)
            threads = max(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")
            print(f"rank {rank} blas threads {threads}", flush=True)
            return note
        import mnn.distributed.training.preflight
        mnn.distributed.training.preflight.limit_blas_threads = report
    """)
    result = subprocess.run(mpiexec(cores) + probe + ["--max-steps", "2", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    # The ranks' lines may interleave within a line of the launcher's output.
    assert sorted(re.findall(r"rank (\d+) blas threads (\d+)", result.stdout)) == [
        (str(rank), "1") for rank in range(cores)]
    assert result.stdout.count(f"{cores} ranks share the {cores} cores of") == 1
    assert "BLAS limited to 1 thread per rank" in result.stdout

    warned = subprocess.run(mpiexec(cores) + TRAIN + ["--max-steps", "2", "--output", str(tmp_path / "mine")],
                            capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": str(cores)})
    assert warned.returncode == 0, warned.stderr
    assert warned.stdout.count("set OMP_NUM_THREADS=1 (or use mnn-launch, which does)") == 1


# --- divergence -------------------------------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_keeps_a_finite_checkpoint(tmp_path, ranks):
    good = run(["--epochs", "3", "--max-steps", str(STEPS_PER_EPOCH + 3), "--output", str(tmp_path)], ranks=ranks)
    assert good.returncode == 0, good.stderr
    before = load_checkpoint(tmp_path / "checkpoint.npz")

    diverged = run(["--epochs", "3", "--lr", "1e6", "--resume", "--output", str(tmp_path)], ranks=ranks)
    assert diverged.returncode == 1, diverged.stderr
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("mnn-train: error:")]
    assert len(errors) == 1 and "training diverged at epoch 2/3 step " in errors[0], diverged.stderr
    assert "its update was not applied" in errors[0] and "--on-nonfinite skip" in errors[0]
    assert "Traceback" not in diverged.stderr and "RuntimeWarning" not in diverged.stderr
    after = load_checkpoint(tmp_path / "checkpoint.npz")
    assert after.position == before.position  # a run that diverged never replaces a checkpoint
    for name, value in after.model_state.items():
        assert np.isfinite(value).all(), name
    events = strict_events(tmp_path / "metrics.jsonl")
    stopped = [event for event in events if event["event"] == "nonfinite"]
    assert len(stopped) == 1 and stopped[0]["action"] == "stopped"
    assert stopped[0]["global_step"] > after.position.global_step
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == STEPS_PER_EPOCH + 3  # the good run's


@needs_mpiexec
@pytest.mark.slow
def test_on_nonfinite_skip_skips_the_updates_and_keeps_json_strict(tmp_path):
    result = run(["--epochs", "1", "--lr", "1e6", "--on-nonfinite", "skip", "--max-skipped-steps", "0",
                  "--output", str(tmp_path)], ranks=2)
    assert result.returncode == 0, result.stderr
    events = strict_events(tmp_path / "metrics.jsonl")
    skipped = [event for event in events if event["event"] == "nonfinite"]
    assert skipped and all(event["action"] == "skipped" for event in skipped)
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert summary["steps"] == STEPS_PER_EPOCH
    for name, value in load_arrays(tmp_path / "model.npz").items():
        assert np.isfinite(value).all(), name


# --- signals at awkward moments ----------------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.slow
def test_sigterm_during_start_up_stops_every_rank_with_one_line(tmp_path, ranks):
    # Each rank sends itself SIGTERM while preflight loads the data.
    probe = script("""
        import os, signal
        import mnn.distributed.training.job_data as job_data
        load = job_data.load_dataset
        def load_and_get_terminated(spec):
            os.kill(os.getpid(), signal.SIGTERM)
            return load(spec)
        job_data.load_dataset = load_and_get_terminated
    """)
    result = subprocess.run(mpiexec(ranks) + probe + ["--output", str(tmp_path), "--dataset", "digits"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 130, result.stderr
    assert result.stderr.count("mnn-train: interrupted before training started") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoint.npz").exists() and not (tmp_path / LOCK_NAME).exists()


@needs_mpiexec
@pytest.mark.slow
def test_sigterm_while_the_final_outputs_are_written_still_completes_the_run(tmp_path):
    probe = script("""
        import os, signal
        import mnn.distributed.training.trainer as trainer
        write = trainer._write_results
        def terminated_while_writing(*args):
            os.kill(os.getpid(), signal.SIGTERM)
            write(*args)
        trainer._write_results = terminated_while_writing
    """)
    result = subprocess.run(mpiexec(2) + probe + ["--epochs", "1", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    assert {"model.npz", "summary.json", "checkpoint.npz"} <= {path.name for path in tmp_path.iterdir()}
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.without_mpi
def test_resuming_a_finished_run_writes_the_outputs_it_missed(tmp_path):
    first = run(["--epochs", "1", "--output", str(tmp_path)], MNN_NO_MPI="1")
    assert first.returncode == 0, first.stderr
    model = load_arrays(tmp_path / "model.npz")
    (tmp_path / "model.npz").unlink()
    (tmp_path / "summary.json").unlink()
    again = run(["--epochs", "1", "--output", str(tmp_path), "--resume"], MNN_NO_MPI="1")
    assert again.returncode == 0, again.stderr
    assert "nothing left to train" in again.stdout
    assert "wrote the model.npz and summary.json that the finished run had not written yet" in again.stdout
    restored = load_arrays(tmp_path / "model.npz")
    for key, value in model.items():
        assert restored[key].tobytes() == value.tobytes(), key
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == STEPS_PER_EPOCH


# --- one output directory, one job -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.without_mpi
def test_a_second_job_on_the_same_output_is_refused_and_the_first_is_untouched(tmp_path):
    first = subprocess.Popen(TRAIN + ["--epochs", "100000", "--output", str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, "MNN_NO_MPI": "1"})
    try:
        for line in first.stdout:
            if "| loss " in line:
                break
        second = run(["--epochs", "1", "--output", str(tmp_path)], MNN_NO_MPI="1")
        assert second.returncode == 2
        assert f"output directory '{tmp_path}' is in use by another job (process {first.pid} on " in second.stderr
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130
    assert not (tmp_path / LOCK_NAME).exists()
    assert load_checkpoint(tmp_path / "checkpoint.npz").config["epochs"] == 100000


@pytest.mark.slow
@pytest.mark.without_mpi
def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    result = run(["--epochs", "1", "--output", str(tmp_path)], MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert f"took over the lock of {tmp_path} left by a job that ended without removing it" in result.stdout
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.without_mpi
def test_a_fresh_run_keeps_the_earlier_runs_files_and_says_so(tmp_path):
    first = run(["--epochs", "1", "--output", str(tmp_path)], MNN_NO_MPI="1")
    assert first.returncode == 0, first.stderr
    old_model = (tmp_path / "model.npz").read_bytes()
    second = run(["--epochs", "1", "--seed", "5", "--output", str(tmp_path)], MNN_NO_MPI="1")
    assert second.returncode == 0, second.stderr
    assert f"{tmp_path} held an earlier run's checkpoints: moved its files into {tmp_path / 'previous'}" \
        in second.stdout
    assert (tmp_path / "previous" / "model.npz").read_bytes() == old_model
    assert load_checkpoint(tmp_path / "previous" / "checkpoint.npz").config["seed"] == 0
    assert load_checkpoint(tmp_path / "checkpoint.npz").config["seed"] == 5


@pytest.mark.slow
@pytest.mark.without_mpi
def test_metrics_tell_each_step_once_after_a_crash_and_resume(tmp_path):
    # A run checkpointed at the end of epoch 1 goes on logging epoch 2, then "crashes":
    # its epoch-1 checkpoint is all that is left, and the resumed run trains epoch 2 again.
    no_mpi = {"MNN_NO_MPI": "1"}
    assert run(["--epochs", "1", "--log-every", "5", "--output", str(tmp_path)], **no_mpi).returncode == 0
    epoch_one = (tmp_path / "checkpoint.npz").read_bytes()
    assert run(["--epochs", "2", "--log-every", "5", "--resume", "--output", str(tmp_path)],
               **no_mpi).returncode == 0
    (tmp_path / "checkpoint.npz").write_bytes(epoch_one)
    again = run(["--epochs", "2", "--log-every", "5", "--resume", "--output", str(tmp_path)], **no_mpi)
    assert again.returncode == 0, again.stderr
    steps = [event["global_step"] for event in strict_events(tmp_path / "metrics.jsonl")
             if event["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * STEPS_PER_EPOCH


# --- checkpoints that survive --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.without_mpi
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    no_mpi = {"MNN_NO_MPI": "1"}
    first = run(["--epochs", "3", "--keep-checkpoints", "2", "--output", str(tmp_path)], **no_mpi)
    assert first.returncode == 0, first.stderr
    rotated = sorted(path.name for path in tmp_path.glob("checkpoint-*.npz"))
    assert rotated == [f"checkpoint-{2 * STEPS_PER_EPOCH:08d}.npz"]
    # The newest checkpoint is cut short, as by a disk that filled up.
    newest = tmp_path / "checkpoint.npz"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = run(["--epochs", "4", "--keep-checkpoints", "2", "--resume", "--output", str(tmp_path)], **no_mpi)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {newest}: " in resumed.stdout
    assert f"resumed from {tmp_path / rotated[0]} at the end of epoch 2/4" in resumed.stdout
    assert load_checkpoint(newest).position.global_step == 4 * STEPS_PER_EPOCH


@pytest.mark.without_mpi
def test_a_temporary_file_left_by_a_killed_write_is_removed_at_the_next_start(tmp_path):
    stale = tmp_path / f".checkpoint.npz.{'0' * 32}.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = run(["--epochs", "1", "--output", str(tmp_path)], MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert f"removed {stale.name}, left by a write that was cut short" in result.stdout
    assert not stale.exists()


# --- a rank that stops answering -----------------------------------------------------------

@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.slow
def test_a_rank_that_sleeps_in_training_ends_the_job_with_a_stall_report(tmp_path, ranks):
    # Rank 1 falls asleep in the forward pass of step 4, as a deadlocked rank would.
    probe = script("""
        import os, time
        from mnn.distributed.data_parallel import DataParallel
        forward, calls = DataParallel.forward, []
        def sleepy_forward(self, inputs, targets=None):
            calls.append(1)
            if self.comm.rank == 1 and len(calls) == 4:
                time.sleep(60)
            return forward(self, inputs, targets)
        DataParallel.forward = sleepy_forward
    """)
    # 6 s, not less: the watchdog watches the job's preparation too, and on a loaded machine (make
    # test runs its parts at once) one rank has finished loading the data 5 s after another (a
    # report at 2 s: "rank 0 has waited 2.1 s in the all-gather; rank 1 ... busy for 6.8 s").
    started = time.monotonic()
    result = subprocess.run(mpiexec(ranks) + probe + ["--stall-timeout", "6", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=ENV)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    reports = [line for line in result.stderr.splitlines() if line.startswith("mnn: stall:")]
    assert len(reports) == 1, result.stderr
    assert "rank 1 has not arrived (at step 4, busy for" in reports[0]
    assert "in the all-reduce of step 4" in reports[0] and "stall timeout 6.0 s" in reports[0]
    assert elapsed < 40, elapsed
