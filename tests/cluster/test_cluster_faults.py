"""Faults of a job across the hosts of a test cluster: mnn-launch in the head, one rank on each
of node1 and node2, under the MPI of the Python that runs pytest.

What holds on one machine (tests/test_faults_signals.py, tests/test_faults_run.py) must hold
when no rank runs beside mnn-launch:

* Ctrl-C (SIGINT) or SIGTERM to mnn-launch stops every rank after the same step with a
  checkpoint, exit 130, and no process of the job is left on any host; a resumed run ends
  with the parameters of one process that was never interrupted (float64);
* a rank SIGKILLed on its host, or a host lost (its link down and every process on it
  frozen), ends the job within the stall timeout and a few seconds with one line that names
  the rank and its host: mnn-launch's, at the end, for a killed rank (with its process and
  the signal; the launchers name the process and host, or blame the rank that aborted when
  it lost its peer), the stall watchdog's for a lost host; the last checkpoint is kept, and
  nothing of the job is left on the head or on the host that remains.

Each test waits for what the job prints or writes, never for a fixed time; the hosts share
the file system, so rank 0 (on node1) writes into tmp_path.
"""
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_jobs import Job, assert_nothing_left
from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.io import load_arrays
from processes import mpiexec_family, run, wait_for

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.toml"
STEPS_PER_EPOCH = 23  # the digits' 1,437 training samples in global batches of 64
# Far more than a test waits for: the job is always ended by the fault.
ENDLESS = ["--epochs", "1000"]
STALL_TIMEOUT_S = 5
# After a fault: the watchdog's last check and its grace for answers (2 s at this timeout),
# the launcher's end of the job (or mnn-launch's, 2 s after the report), on a loaded machine.
FEW_S = 10
# What a job leaves may take a moment to go (an ssh session's sshd on the other side).
LEFTOVER_S = 5
# The sums of a float64 all-reduce come in another order than one process's: rounding, no more.
ATOL = 1e-9


def train_options(output, *extra):
    return ["--config", str(DIGITS), "--dtype", "float64", "--log-every", "1", "--eval-every", "0",
            "--output", str(output), *extra]


def rank_process(cluster, host):
    """(rank, pid) of the one mnn-train rank on ``host``, read from /proc."""
    for pid in cluster.pids(host):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mnn.scripts.train" in argv:
            variables = dict(entry.partition(b"=")[::2] for entry in environ)
            rank = variables.get(b"PMI_RANK", variables.get(b"OMPI_COMM_WORLD_RANK"))
            return int(rank), pid
    raise AssertionError(f"no rank of mnn-train on {host}")


# --- Ctrl-C and SIGTERM to mnn-launch --------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
def test_a_signal_to_mnn_launch_stops_every_rank_on_every_host_after_the_same_step(
        make_cluster, tmp_path, signum):
    """Open MPI's launcher took SIGINT and SIGTERM as an abort (exit 1, no line, ranks SIGKILLed),
    and with no rank on mnn-launch's machine there was none to give them to; hydra forwards them."""
    cluster = make_cluster(2)
    output = tmp_path / "run"
    job = Job(cluster, train_options(output, *ENDLESS))
    job.wait_for_line("step 3/")
    job.process.send_signal(signum)
    status, stdout, stderr = job.finish()
    assert status == 130, stdout + stderr
    # Open MPI's launcher may warn that it could not move an ssh into a process group (a race of its own).
    lines = [line for line in stderr.splitlines() if line.strip() and "plm:ssh: Warning: setpgid" not in line]
    # "at epoch 1/1000 step 7/23", or "at the end of epoch 1/1000" when the stop lands on an epoch's last step.
    assert len(lines) == 1 and lines[0].startswith(("mnn-train: interrupted at epoch ",
                                                    "mnn-train: interrupted at the end of epoch ")), stderr
    assert f"checkpoint saved to {output / 'checkpoint.npz'}; continue with --resume" in lines[0]
    assert_nothing_left(cluster, timeout=LEFTOVER_S)
    stopped = load_checkpoint(output / "checkpoint.npz").position.global_step
    assert stopped >= 3
    if signum != signal.SIGINT:
        return
    # Every rank stopped after the step of the checkpoint: resumed, the job ends where one
    # process that was never interrupted ends (a rank a step ahead would have moved the sums).
    total = stopped + 5
    resumed = Job(cluster, train_options(output, "--resume", "--max-steps", str(total), *ENDLESS))
    status, stdout, stderr = resumed.finish()
    assert status == 0, stdout + stderr
    reference = run(train_options(tmp_path / "one-process", "--max-steps", str(total), *ENDLESS), MNN_NO_MPI="1")
    assert reference.returncode == 0, reference.stderr
    expected = load_arrays(tmp_path / "one-process" / "model.npz")
    got = load_arrays(output / "model.npz")
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL, err_msg=name)


# --- a rank killed, a host lost --------------------------------------------------------------

def start_and_wait_for_a_checkpoint(cluster, output):
    """A job that has written the checkpoint of its first epoch and trains on."""
    job = Job(cluster, train_options(output, "--stall-timeout", str(STALL_TIMEOUT_S), *ENDLESS))
    job.wait_for_line(f"epoch 2/1000 step 1/{STEPS_PER_EPOCH}")
    return job


def assert_checkpoint_kept(output):
    kept = load_checkpoint(output / "checkpoint.npz").position
    assert kept.epochs_done >= 1 and kept.global_step == kept.epochs_done * STEPS_PER_EPOCH


def test_a_rank_killed_on_its_host_ends_the_job_with_a_report_naming_the_host(make_cluster, tmp_path):
    cluster = make_cluster(2)
    output = tmp_path / "run"
    job = start_and_wait_for_a_checkpoint(cluster, output)
    rank, pid = rank_process(cluster, "node2")
    assert rank == 1
    killed = time.monotonic()
    cluster.run("node2", ["kill", "-KILL", str(pid)])
    status, stdout, stderr = job.finish()
    took = time.monotonic() - killed
    assert status not in (0, 130), stdout + stderr
    assert took < STALL_TIMEOUT_S + FEW_S, f"the job ended {took:.1f} s after the kill"
    reports = [line for line in stderr.splitlines() if line.startswith("mnn-launch: ")]
    assert len(reports) == 1 and stderr.rstrip().endswith(reports[0]), stdout + stderr
    assert reports[0].startswith(f"mnn-launch: rank 1 on node2 (process {pid}) "), reports[0]
    how = reports[0].split(f"(process {pid}) ", 1)[1]
    killed = "was killed by signal 9 (SIGKILL); the launcher ended the job"
    # Open MPI does not say how when it hears first from rank 0, which lost its peer and aborted.
    assert how == killed or (mpiexec_family() == "openmpi" and how.startswith("died without a word")), how
    assert "mnn: stall:" not in stderr  # the launcher saw it first, not the watchdog
    assert_checkpoint_kept(output)
    assert_nothing_left(cluster, timeout=LEFTOVER_S)


def test_a_host_lost_mid_run_ends_the_job_with_one_report_naming_it_and_its_rank(make_cluster, tmp_path):
    """The link down and every process of node2 stopped: prterun waited for its daemon there
    for ever, and hydra left its ssh to node2 running in the head after it ended."""
    cluster = make_cluster(2)
    output = tmp_path / "run"
    job = start_and_wait_for_a_checkpoint(cluster, output)
    lost = time.monotonic()
    cluster.set_link("node2", False)
    cluster.freeze("node2")
    status, stdout, stderr = job.finish()
    took = time.monotonic() - lost
    assert status == 1, stdout + stderr
    assert STALL_TIMEOUT_S < took < STALL_TIMEOUT_S + FEW_S, f"the job ended {took:.1f} s after the host was lost"
    reports = [line for line in stderr.splitlines() if line.startswith("mnn: stall:")]
    assert len(reports) == 1, stderr
    assert "; rank 1 on node2 did not answer (stopped or lost); aborting all 2 ranks" in reports[0]
    assert "rank 0 on node1 has waited " in reports[0]
    assert "mnn-launch: rank" not in stderr  # the stall report is the one line
    assert_checkpoint_kept(output)
    assert_nothing_left(cluster, ["head", "node1"], timeout=LEFTOVER_S)


# --- Ctrl-C while the ranks start -------------------------------------------------------------

def test_ctrl_c_while_the_remote_ranks_start_stops_the_job_with_one_line(make_cluster, tmp_path):
    """mnn-launch holds a signal until the ranks can take it (a rank still importing Python would
    die of it): with every rank on another host it hears their start over TCP, and under Open
    MPI passes the signal on as SIGUSR1, which kills a rank that has no handler for it yet."""
    cluster = make_cluster(2)
    job = Job(cluster, train_options(tmp_path / "run", *ENDLESS))
    wait_for(lambda: starting(cluster, "node2") or job.process.poll() is not None, "rank 1 to start", timeout=60)
    job.process.send_signal(signal.SIGINT)
    status, stdout, stderr = job.finish()
    assert status == 130, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "plm:ssh: Warning: setpgid" not in line]
    # Passed on once the ranks are ready, the signal may find them before or after the first step.
    assert len(lines) == 1 and (lines[0].startswith("mnn-train: interrupted ") or lines[0] ==
                                "mnn-launch: interrupted before training started: stopped the job while it was "
                                "starting"), stderr
    assert_nothing_left(cluster, timeout=LEFTOVER_S)


def starting(cluster, host):
    """Whether a rank of mnn-train runs on ``host`` (it may still be importing Python)."""
    try:
        rank_process(cluster, host)
    except AssertionError:
        return False
    return True
