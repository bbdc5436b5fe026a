"""The stall watchdog's serial parts: the report, the marks, the watched communicator,
and doing nothing on one process. Real stalls on real ranks are in tests/mpi/test_watchdog.py.
"""
import inspect
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from mnn.distributed.comm import Communicator, Request, SingleProcessCommunicator, run_on_root
from mnn.distributed.watchdog import RankStatus, StallWatchdog, stall_report


def watchdog_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("mnn-stall-watchdog")]


# --- the report --------------------------------------------------------------------------

def test_report_names_who_waits_where_who_is_late_and_who_is_silent():
    statuses = {0: RankStatus("gradient all-reduce", 37, 61.2), 1: RankStatus(None, 37, 65.4),
                2: RankStatus("gradient all-reduce", 37, 61.4), 3: None}
    assert stall_report(statuses, 60, 4) == (
        "mnn: stall: ranks 0, 2 have waited 61 s in the gradient all-reduce of step 37; "
        "rank 1 has not arrived (at step 37, busy for 65 s outside any collective); "
        "rank 3 did not answer (stopped or lost); aborting all 4 ranks (stall timeout 60 s)")


def test_report_groups_alike_ranks_and_shortens_runs_of_them():
    statuses = {rank: RankStatus("barrier", None, 300.0 + rank) for rank in range(9)}
    statuses[6] = RankStatus(None, 12, 4.5)
    statuses[8] = RankStatus("stop vote", 11, 2.25)
    assert stall_report(statuses, 300, 10) == (
        "mnn: stall: ranks 0-5, 7 have waited 300-307 s in the barrier; "
        "rank 8 has waited 2.2 s in the stop vote of step 11; "
        "rank 6 has not arrived (at step 12, busy for 4.5 s outside any collective); "
        "rank 9 was not asked; aborting all 10 ranks (stall timeout 300 s)")


def test_report_when_every_rank_waits_in_the_same_collective():
    statuses = {rank: RankStatus("all-reduce", 5, 2.5) for rank in range(3)}
    assert stall_report(statuses, 2, 3) == (
        "mnn: stall: ranks 0-2 have waited 2.5 s in the all-reduce of step 5; every rank is inside it, "
        "so the communication itself does not progress; aborting all 3 ranks (stall timeout 2.0 s)")


def test_report_of_a_rank_that_could_not_ask_the_others():
    report = stall_report({1: RankStatus("all-reduce", 3, 2.0)}, 2, 3, not_asked_because="no MPI here")
    assert report == ("mnn: stall: rank 1 has waited 2.0 s in the all-reduce of step 3; "
                      "ranks 0, 2 were not asked (no MPI here); aborting all 3 ranks (stall timeout 2.0 s)")


# --- the marks ---------------------------------------------------------------------------

def test_marks_say_where_the_main_thread_is():
    watchdog = StallWatchdog(SingleProcessCommunicator(), 60)
    assert (watchdog.status().what, watchdog.status().step) == (None, None)
    watchdog.progress(36)
    with watchdog.waiting("gradient all-reduce"):
        assert watchdog.status().what == "gradient all-reduce" and watchdog.status().step == 36
        with watchdog.waiting("all-reduce"):  # a nested wait keeps the outer name
            assert watchdog.status().what == "gradient all-reduce"
        assert watchdog.status().waiting
        time.sleep(0.05)
        assert watchdog.status().for_s >= 0.05  # timed from the first look at this wait
    assert watchdog.status().what is None and watchdog.status().step == 36
    with pytest.raises(RuntimeError):
        with watchdog.waiting("evaluation all-reduce", step=40):
            assert watchdog.status().step == 40
            raise RuntimeError("a failing collective ends the wait too")
    assert not watchdog.status().waiting
    watchdog.progress(37)
    assert watchdog.status() == RankStatus(None, 37, 0.0)


class PretendRanks(Communicator):
    """Rank 0 of a pretend world of ``size`` ranks that records, in each call,
    what the watchdog says the main thread is waiting in."""

    rank = 0

    def __init__(self, size=2):
        self.size = size
        self.watchdog = None
        self.seen = []

    def _record(self, result=None):
        self.seen.append(self.watchdog.status().what if self.watchdog else None)
        return result

    def allreduce(self, array, op="sum"):
        return self._record(array)

    def iallreduce(self, array, op="sum"):
        communicator = self

        class Pending(Request):
            def wait(self):
                communicator._record()
        return Pending()

    def broadcast(self, array, root=0):
        return self._record(array)

    def barrier(self):
        self._record()

    def allgather(self, value):
        return self._record([value] * self.size)

    def broadcast_object(self, value, root=0):
        return self._record(value)

    def abort(self, code=1):
        raise AssertionError("the watchdog aborted")


def test_the_watched_communicator_marks_every_blocking_call():
    comm = PretendRanks()
    watchdog = StallWatchdog(comm, 60)  # not started: the marks work all the same
    comm.watchdog = watchdog
    watched = watchdog.watched_comm
    assert watched is not comm and (watched.rank, watched.size) == (0, 2)
    array = np.zeros(3)
    assert watched.allreduce(array) is array and watched.broadcast(array) is array
    watched.barrier()
    assert watched.allgather(1) == [1, 1] and watched.broadcast_object("x") == "x"
    request = watched.iallreduce(array)  # starting one is no wait, waiting for it is
    Request.wait_all([request])
    with watchdog.waiting("gradient all-reduce"):
        watched.allreduce(array)
    assert comm.seen == ["all-reduce", "broadcast", "barrier", "all-gather", "broadcast", "all-reduce",
                         "gradient all-reduce"]
    assert not watchdog.status().waiting


class PretendRank1(PretendRanks):
    rank = 1


@pytest.mark.parametrize("comm", [PretendRanks(), PretendRank1()], ids=["rank 0", "rank 1"])
def test_run_on_root_marks_rank_0_working_alone_and_the_others_waiting_on_purpose(comm):
    watchdog = StallWatchdog(comm, 60)
    comm.watchdog = watchdog
    looks = []
    run_on_root(watchdog.watched_comm, lambda: looks.append((watchdog.status(), watchdog._waits_for_rank0_alone())))
    # rank 0 works alone outside any collective, then joins the others' wait as usual
    assert [(status.alone, waits) for status, waits in looks] == ([(True, False)] if comm.rank == 0 else [])
    assert comm.seen == ["all-gather"]
    assert not watchdog.status().alone and not watchdog._waits_for_rank0_alone()
    with watchdog.rank0_alone(), watchdog.waiting("all-gather"):
        assert not watchdog.status().alone  # a wait of rank 0 counts, alone or not
        assert watchdog._waits_for_rank0_alone() == (comm.rank != 0)


def test_the_watched_communicator_overrides_the_whole_interface():
    # A method added to Communicator must be watched too, or the base class's
    # NotImplementedError would answer for it.
    watched = type(StallWatchdog(PretendRanks(), 60).watched_comm)
    interface = [name for name, _ in inspect.getmembers(Communicator, inspect.isfunction) if not name.startswith("_")]
    assert interface and all(getattr(watched, name) is not getattr(Communicator, name) for name in interface)


# --- nothing to watch: one process, or no timeout ----------------------------------------

@pytest.mark.parametrize("comm, timeout_s", [(SingleProcessCommunicator(), 0.05), (PretendRanks(), None),
                                             (PretendRanks(), 0)])
def test_without_other_ranks_or_timeout_nothing_runs_and_nothing_is_reported(comm, timeout_s, capsys):
    before = watchdog_threads()
    with StallWatchdog(comm, timeout_s) as watchdog:
        assert not watchdog.enabled and watchdog_threads() == before
        assert watchdog.watched_comm is watchdog.comm
        with watchdog.waiting("all-reduce"):
            time.sleep(0.3)
    captured = capsys.readouterr()
    assert captured.err == captured.out == ""


@pytest.mark.parametrize("timeout_s, error", [(-1, ValueError), (float("nan"), ValueError), ("60", TypeError),
                                              (True, TypeError)])
def test_a_bad_timeout_says_what_was_expected(timeout_s, error):
    with pytest.raises(error, match="stall timeout"):
        StallWatchdog(SingleProcessCommunicator(), timeout_s)


STALLED_WITHOUT_MPI = """
import time
from mnn.distributed.comm import Communicator
from mnn.distributed.watchdog import StallWatchdog

class TwoRanks(Communicator):
    rank, size = 0, 2

with StallWatchdog(TwoRanks(), 0.4) as watchdog:
    watchdog.progress(4)
    with watchdog.waiting("gradient all-reduce"):
        time.sleep(30)
print("finished")
"""


def test_a_watchdog_that_cannot_ask_reports_its_own_rank_and_ends_the_process():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STALLED_WITHOUT_MPI)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "finished" not in result.stdout
    assert time.monotonic() - started < 10
    assert result.stderr.count("mnn: stall:") == 1
    assert "mnn: stall: rank 0 has waited" in result.stderr
    assert "s in the gradient all-reduce of step 4; rank 1 was not asked (TwoRanks is not an MPI communicator)" \
        in result.stderr
