"""Signals at awkward moments, output nobody reads, and jobs that never start: real processes
under ``mnn-launch``, under the MPI beside this Python (``make test`` runs this file under
MPICH and under Open MPI).

Each test waits for a condition (a file a rank writes, a line it prints) before it acts,
never for a fixed time, so a loaded machine makes it slower but not wrong.
"""
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.launch.startup import rank_hosts, reports_start
from mnn.distributed.training.stopping import StopRequests
from processes import TRAIN, finish, start, wait_for
from test_faults import script
from test_launch import OTHER_HOSTS, launcher_command, marked_processes, needs_mpi, write_remote_shell

needs_proc = pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches processes through /proc")

JOB = ["--epochs", "30", "--log-every", "5"]


def launch(ranks, command, **options):
    """``mnn-launch -n RANKS [options] -- command``."""
    extra = [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", str(value))]
    return [*launcher_command(), "-n", str(ranks), *extra, "--", *command]


def read_until(process, text):
    """Lines of ``process``'s stdout up to the first that holds ``text``."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the job ended before printing {text!r}: {''.join(lines)}")


def assert_one_interrupt_line(stderr, starting):
    """mnn-train's one line (and nothing from the launcher, no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    if starting:  # mnn-train's, or mnn-launch's when the ranks took more than 5 s to be ready
        assert re.match(r"mnn-(train|launch): interrupted before training started", lines[0]), stderr
    else:
        assert re.match(r"mnn-train: interrupted at (epoch \d+/\d+ step \d+/\d+|the end of epoch \d+/\d+); "
                        r"checkpoint saved to .*; continue with --resume$", lines[0]), stderr


# --- a signal at start-up -----------------------------------------------------------------------

def slow_start_env(tmp_path):
    """An environment in which each rank, before anything of mnn is imported (so before any
    handler of its own is installed), says so in a file and sleeps 1.5 s: well within the 5 s
    that mnn-launch holds a signal for ranks that are starting, on a loaded machine too."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, time\n"
        "rank = os.environ.get('PMI_RANK', os.environ.get('OMPI_COMM_WORLD_RANK'))\n"
        "if rank is not None:\n"
        f"    open(os.path.join({str(tmp_path)!r}, f'rank{{rank}}.importing'), 'w').close()\n"
        "    time.sleep(1.5)\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@needs_mpi
@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_ranks_start_stops_the_job_with_one_line(tmp_path, signum):
    """Ranks still importing Python have no handler: a signal passed on to them then kills
    them (exit 143, no line) or prints a KeyboardInterrupt traceback on each. mnn-launch holds
    it until they are ready for it, and mnn-train stops before training with its line."""
    process = start(launch(2, [*TRAIN, *JOB, "--output", str(tmp_path / "out")]), env=slow_start_env(tmp_path))
    wait_for(lambda: len(list(tmp_path.glob("rank*.importing"))) == 2, "both ranks to start")
    process.send_signal(signum)
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert_one_interrupt_line(stderr, starting=True)
    assert not (tmp_path / "out" / "checkpoint.npz").exists()


# --- a job that never starts --------------------------------------------------------------------

@needs_mpi
@needs_proc
@pytest.mark.slow
def test_a_host_that_answers_but_never_starts_its_ranks_is_named_and_the_job_stopped(tmp_path):
    """The host answers ``ssh HOST true``, but the launcher's remote start there hangs: both
    launchers would wait forever (and the rank here in MPI's start-up with them)."""
    ssh, marker = write_remote_shell(tmp_path, answers=True)
    host = OTHER_HOSTS[0]
    started = time.monotonic()
    process = start([*launcher_command(), "--hosts", f"localhost:1,{host}:1", "--ssh", str(ssh),
                     "--start-timeout", "4", "--", *TRAIN, *JOB, "--output", str(tmp_path / "out")],
                    env={"MNN_TEST_MARK": marker})  # every process of the job inherits it
    status, _, stderr = finish(process)
    elapsed = time.monotonic() - started
    # Open MPI's launcher may warn that it could not move the remote shell into a process group.
    lines = [line for line in stderr.splitlines() if "plm:ssh: Warning: setpgid" not in line]
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("mnn-launch: error: the job did not start within 4 s "
                                                   "(--start-timeout): "), stderr
    assert f"rank 1 on {host}: no word from that host" in lines[0]
    assert "mnn-launch ended every process of the job" in lines[0]
    assert elapsed < 60
    assert marked_processes(marker, wait=10) == []  # the remote shell and the rank here included


@needs_mpi
@needs_proc
@pytest.mark.slow
def test_sigterm_while_a_host_hangs_in_its_start_stops_everything_with_one_line(tmp_path):
    """A batch system's SIGTERM to a job whose start hangs: hydra used to leave the remote
    shell running; mnn-launch stops every process of the job within seconds, not at the
    start timeout."""
    ssh, marker = write_remote_shell(tmp_path, answers=True)
    process = start([*launcher_command(), "--hosts", f"localhost:1,{OTHER_HOSTS[0]}:1", "--ssh", str(ssh),
                     "--start-timeout", "600", "--", *TRAIN, *JOB, "--output", str(tmp_path / "out")],
                    env={"MNN_TEST_MARK": marker})
    wait_for(lambda: any("time.sleep(1e6)" in line for line in marked_processes(marker)), "the remote shell to hang")
    process.send_signal(signal.SIGTERM)
    status, _, stderr = finish(process, timeout=60)
    assert status == 130, stderr
    assert_one_interrupt_line("\n".join(line for line in stderr.splitlines()
                                        if "plm:ssh: Warning: setpgid" not in line), starting=True)
    assert marked_processes(marker, wait=10) == []


@needs_mpi
@needs_proc
@pytest.mark.slow
def test_a_rank_stopped_before_mpi_starts_is_named_and_the_job_stopped(tmp_path):
    """Rank 1 is stopped (SIGSTOP) before it reaches MPI: rank 0 would wait in MPI's start-up
    for ever, where no stall watchdog runs yet."""
    marker = f"mnn-test-job-{os.getpid()}-{time.monotonic_ns()}"
    probe = script("""
        import os, signal
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
    """)
    process = start(launch(2, [*probe, *JOB, "--output", str(tmp_path)], start_timeout=4),
                    env={"MNN_TEST_MARK": marker})
    status, _, stderr = finish(process)
    lines = stderr.splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("mnn-launch: error: the job did not start within 4 s"), stderr
    assert re.search(r"rank 1 \(process \d+\) on this machine was stopped \(SIGSTOP\)", lines[0]), stderr
    assert "rank 0 on this machine waited in MPI's start-up for the others" in lines[0]
    assert marked_processes(marker, wait=10) == []


# --- signals while training -----------------------------------------------------------------------

@needs_mpi
@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT])
def test_two_signals_close_together_or_a_hang_up_stop_training_with_one_line(tmp_path, signum):
    """A closed terminal or ssh session (SIGHUP) stops as SIGTERM does; two Ctrl-C 0.2 s apart
    are one request (MPICH's launcher aborted on the second: exit 255, seven lines of errors)."""
    process = start(launch(2, [*TRAIN, *JOB, "--output", str(tmp_path)]))
    read_until(process, "| loss ")
    process.send_signal(signum)
    if signum == signal.SIGINT:
        time.sleep(0.2)
        process.send_signal(signum)
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert_one_interrupt_line(stderr, starting=False)
    assert load_checkpoint(tmp_path / "checkpoint.npz").position.global_step >= 5


@pytest.mark.without_mpi
def test_sighup_stops_a_run_without_a_launcher_as_sigterm_does(tmp_path):
    process = start([*TRAIN, *JOB, "--output", str(tmp_path)], env={"MNN_NO_MPI": "1"})
    read_until(process, "| loss ")
    process.send_signal(signal.SIGHUP)
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert_one_interrupt_line(stderr, starting=False)
    assert load_checkpoint(tmp_path / "checkpoint.npz").position.global_step >= 5


@needs_mpi
@needs_proc
@pytest.mark.slow
def test_sigterm_after_training_while_the_ranks_exit_still_exits_0(tmp_path):
    """The README: a signal while the last outputs are written changes nothing. Here it comes
    after training returned, while the ranks leave (MPI finalises): it used to kill them."""
    probe = script(f"""
        import os, time
        import mnn.scripts.train as entry
        real_train = entry.train
        def train_then_linger(config, comm):
            summary = real_train(config, comm)
            open(os.path.join({str(tmp_path)!r}, f"trained{{comm.rank}}"), "w").close()
            time.sleep(1)
            return summary
        entry.train = train_then_linger
    """)
    process = start(launch(2, [*probe, "--epochs", "1", "--output", str(tmp_path / "out")]))
    wait_for(lambda: len(list(tmp_path.glob("trained*"))) == 2, "training to end")
    process.send_signal(signal.SIGTERM)
    status, _, stderr = finish(process)
    assert status == 0, stderr
    assert {"model.npz", "summary.json", "checkpoint.npz"} <= {path.name for path in (tmp_path / "out").iterdir()}


# --- output nobody reads ------------------------------------------------------------------------------

@needs_mpi
@needs_proc
@pytest.mark.parametrize("launched", [True, False], ids=["mnn-launch", "one-process"])
@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(tmp_path, launched):
    """``mnn-launch ... | head -3``: hydra died of SIGPIPE (exit 141) and prterun aborted the
    job; a lone mnn-train died of BrokenPipeError. The run goes on to its end."""
    command = [*TRAIN, "--epochs", "2", "--log-every", "1", "--output", str(tmp_path)]
    process = start(launch(2, command) if launched else command, env=None if launched else {"MNN_NO_MPI": "1"})
    read_until(process, "| loss ")
    process.stdout.close()  # as head does after its lines
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr
    assert {"model.npz", "summary.json"} <= {path.name for path in tmp_path.iterdir()}


# --- the pieces, in this process --------------------------------------------------------------------

def test_stop_requests_nest_keep_ignored_signals_ignored_and_can_stay_ignored():
    """mnn-train counts signals from before MPI starts (an outer block) and hands the count to
    the trainer's block; ``nohup`` (SIGHUP ignored) stays in force; once the run has ended a
    signal changes nothing, to the process's end."""
    saved = {signum: signal.getsignal(signum) for signum in StopRequests.SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with StopRequests() as outer:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(lambda: outer.count == 1, "the signal to be counted", timeout=10)
            with StopRequests() as inner:
                assert inner.count == 1
            assert signal.getsignal(signal.SIGTERM) == outer._request
            outer.ignore_from_now()
            os.kill(os.getpid(), signal.SIGINT)  # long after the first: no KeyboardInterrupt now
            wait_for(lambda: outer.count == 2, "the signal to be counted", timeout=10)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_which_jobs_report_their_start_and_where_each_rank_runs():
    assert reports_start(["mnn-train", "--epochs", "2"]) and reports_start(["/venv/bin/mnn-train"])
    assert reports_start([sys.executable, "-m", "mnn.scripts.train", "--epochs", "2"])
    assert not reports_start([sys.executable, "-c", "print(1)"]) and not reports_start(["mnn-generate"])
    assert rank_hosts(None, 3, {"localhost"}) == [None, None, None]
    assert rank_hosts([("localhost", 1), ("127.0.0.2", 2)], 5, {"localhost"}) == [
        None, "127.0.0.2", "127.0.0.2", None, "127.0.0.2"]
