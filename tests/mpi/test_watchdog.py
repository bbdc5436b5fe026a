"""The stall watchdog on real MPI processes: a rank that sleeps, deadlocks or is stopped
ends the job with one report, and training that goes well is left alone.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_watchdog.py`` for
N = 1, 2, 3. A test of an abort must run in a job of its own: those tests start
``mpiexec -n 2`` and ``-n 3`` themselves and run once, in the one-rank suite
(as tests/mpi/test_comm.py does). The jobs' stall timeout is 2 s.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn.distributed.comm import get_communicator
from mnn.distributed.watchdog import StallWatchdog
from processes import mpiexec, outside_the_job

TIMEOUT_S = 2.0
# From the stall to the end of the job: the timeout, up to two looks of the
# watchdog (0.5 s apart at this timeout), the grace for answers (1 s) and the
# launcher tearing the job down, about 4 s; the bound only tells a job that ends
# from one that hangs, so it leaves a loaded machine ample time.
LATEST_END_S = TIMEOUT_S + 30.0
# A rank this much slower than the others is no stall: a tenth of the timeout
# the loop below is given, so that a loaded machine cannot make it one.
SLOW_S = 1.0
WORLD_SIZE = MPI.COMM_WORLD.Get_size()
one_rank_suite_only = pytest.mark.skipif(
    WORLD_SIZE > 1, reason="starts its own processes; runs once, in the one-rank suite")


def watchdog_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("mnn-stall-watchdog")]


# --- on the suite's own ranks --------------------------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_training_like_loops_finish_and_leave_no_thread():
    comm = get_communicator(MPI.COMM_WORLD)
    grads, vote = np.full(1000, float(comm.rank)), np.zeros(1)
    with StallWatchdog(comm, 10 * SLOW_S) as watchdog:
        assert len(watchdog_threads()) == 1
        watched = watchdog.watched_comm
        for step in range(40):
            watchdog.progress(step)
            if step == 20 and comm.rank == comm.size - 1:
                time.sleep(SLOW_S)  # slow, but not stalled
            request = watched.iallreduce(grads, op="mean")
            with watchdog.waiting("gradient all-reduce"):
                request.wait()
            with watchdog.waiting("stop vote"):
                comm.allreduce(vote)
        if comm.rank == 0:
            time.sleep(0.3)  # leaving is not collective: the others have stopped by now
    assert watchdog_threads() == []
    np.testing.assert_allclose(grads, np.full(1000, (comm.size - 1) / 2))
    comm.barrier()  # MPI still works on every rank


@pytest.mark.mpi
def test_a_world_of_one_starts_nothing():
    with StallWatchdog(MPI.COMM_SELF, TIMEOUT_S) as watchdog:
        assert not watchdog.enabled and watchdog_threads() == []


# --- jobs of their own ---------------------------------------------------------------------

# argv: what the stalled rank does (none, sleep, deadlock, stop), which rank, a folder
# for each rank's pid and the time of the stall, and optionally mpi4py's thread level.
# In the modes "alone" and "alone-stop" rank 0 works alone at step 3 while the others
# wait for it on purpose (run_on_root): for three timeouts, or stopped (SIGSTOP).
JOB = """
import os, signal, sys, threading, time
from pathlib import Path
import numpy as np

mode, stalled_rank, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if len(sys.argv) > 4:
    import mpi4py
    mpi4py.rc.thread_level = sys.argv[4]
from mnn.distributed.comm import get_communicator, run_on_root
from mnn.distributed.watchdog import StallWatchdog

def work_alone():
    (folder / "stalled_at").write_text(repr(time.time()))
    if mode == "alone":
        time.sleep(3 * %(timeout)r)
    else:
        os.kill(os.getpid(), signal.SIGSTOP)

comm = get_communicator()
(folder / f"rank{comm.rank}.pid").write_text(str(os.getpid()))
grads, vote = np.zeros(1000), np.zeros(1)
with StallWatchdog(comm, %(timeout)r) as watchdog:
    watched = watchdog.watched_comm
    for step in range(8):
        watchdog.progress(step)
        time.sleep(0.01 * comm.rank)  # ranks at different speeds
        if step == 3 and mode.startswith("alone"):
            run_on_root(watched, work_alone)
        elif step == 3 and comm.rank == stalled_rank and mode != "none":
            (folder / "stalled_at").write_text(repr(time.time()))
            if mode == "sleep":
                time.sleep(120)
            elif mode == "deadlock":
                lock = threading.Lock()
                lock.acquire()
                lock.acquire()
            else:
                os.kill(os.getpid(), signal.SIGSTOP)
        request = watched.iallreduce(grads)
        with watchdog.waiting("gradient all-reduce"):
            request.wait()
        watched.allreduce(vote)
    if comm.rank == 0:
        time.sleep(0.5)  # ranks stop their watchdogs at different moments
print("finished", comm.rank, flush=True)
""" % {"timeout": TIMEOUT_S}


def alive(pid):
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def run_job(tmp_path, ranks, mode, stalled_rank, *thread_level):
    """Run JOB; return (result, seconds from the stall to the job's end or None, leftover pids).

    Whatever is left of the job is continued and killed here, so a failing test
    leaves no stopped process behind."""
    pids = []
    try:
        result = subprocess.run(mpiexec(ranks) + [sys.executable, "-c", JOB, mode, str(stalled_rank),
                                                  str(tmp_path), *thread_level],
                                env=outside_the_job(), capture_output=True, text=True, timeout=90)
        ended = time.time()
        pids = [int(path.read_text()) for path in tmp_path.glob("rank*.pid")]
        deadline = time.monotonic() + 3  # the launcher's kill may take a moment to land
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = [pid for pid in pids if alive(pid)]
        stalled_file = tmp_path / "stalled_at"
        stall_to_end = ended - float(stalled_file.read_text()) if stalled_file.exists() else None
        return result, stall_to_end, leftovers
    finally:
        for pid in [int(path.read_text()) for path in tmp_path.glob("rank*.pid")]:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum) if alive(pid) else None
                except ProcessLookupError:
                    pass


def ranks_text(ranks):
    return f"rank {ranks[0]} has" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} have"


@one_rank_suite_only
@pytest.mark.parametrize("mode, ranks, stalled_rank", [("sleep", 2, 1), ("sleep", 3, 0), ("deadlock", 3, 1)])
def test_a_rank_that_never_arrives_is_named_and_the_job_aborts(tmp_path, mode, ranks, stalled_rank):
    result, stall_to_end, leftovers = run_job(tmp_path, ranks, mode, stalled_rank)
    assert result.returncode != 0 and "finished" not in result.stdout, result.stderr
    assert result.stderr.count("mnn: stall:") == 1, result.stderr  # one report, by one rank
    waiting = [rank for rank in range(ranks) if rank != stalled_rank]
    assert f"mnn: stall: {ranks_text(waiting)} waited " in result.stderr
    assert " s in the gradient all-reduce of step 3; " in result.stderr
    assert f"rank {stalled_rank} has not arrived (at step 3, busy for " in result.stderr
    assert f"aborting all {ranks} ranks (stall timeout 2.0 s)" in result.stderr
    assert TIMEOUT_S < stall_to_end < LATEST_END_S, f"ended {stall_to_end:.1f} s after the stall"
    assert leftovers == []


@one_rank_suite_only
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_stopped_rank_is_reported_as_silent_and_no_process_is_left(tmp_path, ranks):
    result, stall_to_end, leftovers = run_job(tmp_path, ranks, "stop", 1)
    assert result.returncode != 0 and "finished" not in result.stdout, result.stderr
    assert result.stderr.count("mnn: stall:") == 1, result.stderr
    waiting = [rank for rank in range(ranks) if rank != 1]
    assert f"mnn: stall: {ranks_text(waiting)} waited " in result.stderr
    assert "rank 1 did not answer (stopped or lost)" in result.stderr
    assert TIMEOUT_S < stall_to_end < LATEST_END_S, f"ended {stall_to_end:.1f} s after the stall"
    assert leftovers == []


@one_rank_suite_only
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_job_that_goes_well_ends_normally_with_the_watchdog(tmp_path, ranks):
    started = time.monotonic()
    result, _, leftovers = run_job(tmp_path, ranks, "none", -1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished") == ranks  # (the ranks' lines may interleave)
    assert "mnn: stall" not in result.stderr
    assert time.monotonic() - started < 30  # nothing hangs in MPI_Finalize
    assert leftovers == []


@one_rank_suite_only
def test_below_thread_multiple_a_waiting_rank_reports_itself_and_ends_the_job(tmp_path):
    result, stall_to_end, leftovers = run_job(tmp_path, 3, "sleep", 1, "serialized")
    assert result.returncode != 0 and "finished" not in result.stdout, result.stderr
    reports = [line for line in result.stderr.splitlines() if line.startswith("mnn: stall:")]
    assert 1 <= len(reports) <= 2, result.stderr  # each waiting rank knows only itself
    for report in reports:
        assert " s in the gradient all-reduce of step 3; " in report
        assert "were not asked (MPI runs at MPI_THREAD_SERIALIZED, not MPI_THREAD_MULTIPLE)" in report
    assert TIMEOUT_S < stall_to_end < LATEST_END_S, f"ended {stall_to_end:.1f} s after the stall"
    assert leftovers == []


@one_rank_suite_only
@pytest.mark.parametrize("ranks, thread_level", [(2, ()), (3, ()), (3, ("serialized",))])
def test_rank_0_working_alone_while_the_others_wait_on_purpose_is_no_stall(tmp_path, ranks, thread_level):
    result, _, leftovers = run_job(tmp_path, ranks, "alone", -1, *thread_level)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished") == ranks
    assert "mnn: stall" not in result.stderr
    assert leftovers == []


@one_rank_suite_only
def test_rank_0_stopped_while_working_alone_is_still_reported(tmp_path):
    result, stall_to_end, leftovers = run_job(tmp_path, 3, "alone-stop", -1)
    assert result.returncode != 0 and "finished" not in result.stdout, result.stderr
    assert result.stderr.count("mnn: stall:") == 1, result.stderr
    assert "mnn: stall: ranks 1, 2 have waited " in result.stderr
    assert "rank 0 did not answer (stopped or lost)" in result.stderr
    # The first look finds rank 0 working alone; the next, a timeout later, finds it silent.
    assert TIMEOUT_S < stall_to_end < LATEST_END_S + 2 * TIMEOUT_S, f"ended {stall_to_end:.1f} s after the stall"
    assert leftovers == []
