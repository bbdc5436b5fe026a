"""A rank that dies: mnn-launch's one line naming the rank, its host, its process and how it
died, from what each launcher prints (the texts below are theirs, as they printed them for a
rank of mnn-train SIGKILLed), and on one machine for real under the MPI of this Python."""
import os
import signal
import socket
import sys
import time

import pytest

from mnn.distributed.launch.rank_deaths import EXPLAINED_NOTICE, DeathReader, LauncherDeath, death_line
from processes import LAUNCH, finish, mpiexec_family, needs_mpiexec, start, wait_for

RULE = "=" * 83
HYDRA_STDOUT = f"""
{RULE}
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 14379 RUNNING AT node2
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
{RULE}
"""
HYDRA_EXIT_STRING = ("YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)\n"
                     "This typically refers to a problem with your application.\n")
DASHES = "-" * 74
PRTE_SIGNAL = f"""{DASHES}
prterun noticed that process rank 1 with PID 11940 on node node2 exited on
signal 9 (Killed).
{DASHES}
"""
PRTE_PEER = f"""{DASHES}
An MPI communication peer process has unexpectedly disconnected.  This
usually indicates a failure in the peer process (e.g., a crash or
otherwise exiting without calling MPI_FINALIZE first).

  Local host: node1
  Local PID:  12568
  Peer host:  node2
{DASHES}
\0[node1:00000] *** An error occurred in Socket closed
{DASHES}
prterun has exited due to process rank 0 with PID 12568 on node node1 calling
"abort". This may have caused other processes in the application to be
terminated by signals sent by prterun (as reported here).
{DASHES}
"""
HOSTS = ["node1", "node2"]
BEGUN = {0: 12568, 1: 14379}


def notices(text, cut=7):
    """The reader's notices for ``text`` fed in pieces of ``cut`` bytes (notices cross reads)."""
    reader, found = DeathReader(), []
    data = text.encode()
    for start in range(0, len(data), cut):
        found += reader.feed(data[start:start + cut])
    return found


def deaths(text):
    return [LauncherDeath.decode(line) for line in notices(text) if line != EXPLAINED_NOTICE]


def test_hydra_names_the_process_and_host_and_mnn_launch_the_rank_and_signal():
    found = deaths(HYDRA_STDOUT)
    assert found == [LauncherDeath(pid=14379, host="node2", exit_code=9)]
    assert death_line(found, HOSTS, BEGUN, "head") == \
        "mnn-launch: rank 1 on node2 (process 14379) was killed by signal 9 (SIGKILL); the launcher ended the job"
    # On mpiexec's own machine hydra adds the signal; the rank's host is this machine.
    local = deaths(HYDRA_STDOUT.replace("node2", "vm") + HYDRA_EXIT_STRING)
    assert death_line(local, ["node1", None], BEGUN, "vm").startswith(
        "mnn-launch: rank 1 on vm (process 14379) was killed by signal 9 (SIGKILL)")
    # With two ranks on the host, the process hydra names may be one it stopped itself (with
    # SIGKILL too) after the other died: the line names the host's ranks, not a guess.
    assert death_line(local, [None, None], BEGUN, "vm") == (
        "mnn-launch: one of ranks 0, 1 on vm was killed by signal 9 (SIGKILL) (hydra ends a host's other ranks "
        "the same way and names only one); the launcher ended the job")


def test_an_exit_that_mnn_train_explains_is_no_death():
    """mnn-train's own ends (an error, 2; its abort, 1; an interrupt, 130) have their own line."""
    for status in (1, 2, 130):
        found = deaths(HYDRA_STDOUT.replace("EXIT CODE: 9", f"EXIT CODE: {status}"))
        assert death_line(found, HOSTS, BEGUN, "head") is None, status
    unexplained = deaths(HYDRA_STDOUT.replace("EXIT CODE: 9", "EXIT CODE: 120"))
    assert "exited with status 120;" in death_line(unexplained, HOSTS, BEGUN, "head")


def test_open_mpi_names_the_rank_when_it_heard_of_the_death_first():
    found = deaths(PRTE_SIGNAL)
    assert found == [LauncherDeath(pid=11940, host="node2", rank=1, signum=9)]
    assert death_line(found, HOSTS, {0: 1, 1: 11940}, "head") == \
        "mnn-launch: rank 1 on node2 (process 11940) was killed by signal 9 (SIGKILL); the launcher ended the job"


def test_open_mpi_blaming_the_peer_that_aborted_is_put_on_the_one_rank_of_the_peer_host():
    """prterun names rank 0 on node1, which aborted because rank 1 on node2 died."""
    found = deaths(PRTE_PEER)
    assert found == [LauncherDeath(host="node2")]
    line = death_line(found, HOSTS, BEGUN, "head")
    assert line.startswith("mnn-launch: rank 1 on node2 (process 14379) died without a word")
    # Which of two ranks on node2 died, Open MPI does not say: no line rather than a guess.
    assert death_line(found, ["node1", "node2", "node2"], BEGUN, "head") is None
    # A rank that said why it ends (and aborted) explains the closed connections too.
    explained = notices("rank 1 failed; aborting all 2 ranks\n" + PRTE_PEER)
    assert explained[0] == EXPLAINED_NOTICE
    assert death_line(found, HOSTS, BEGUN, "head", explained=True) is None


@needs_mpiexec
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ranks from /proc")
def test_a_rank_killed_on_this_machine_is_named_in_one_line_at_the_end(tmp_path):
    """Both MPIs: the rank that reported its start with its process id, killed by SIGKILL."""
    code = ("import os, sys, time\nfrom mnn.distributed.comm import get_communicator\n"
            "comm = get_communicator()\n"
            "open(os.path.join(sys.argv[1], f'rank{comm.rank}'), 'w').write(str(os.getpid()))\n"
            "time.sleep(120)\n")
    job = start([*LAUNCH, "-n", "2", "--", sys.executable, "-c", code, str(tmp_path)])
    pids = [tmp_path / "rank0", tmp_path / "rank1"]
    try:
        wait_for(lambda: all(path.exists() and path.read_text() for path in pids) or job.poll() is not None,
                 "the ranks to start")
    finally:
        if job.poll() is None and pids[1].exists():
            os.kill(int(pids[1].read_text()), signal.SIGKILL)
        killed = time.monotonic()
        status, stdout, stderr = finish(job, timeout=60)
        took = time.monotonic() - killed
    pid = int(pids[1].read_text())
    assert status not in (0, 130), stdout + stderr
    lines = stderr.strip().splitlines()
    if mpiexec_family() == "openmpi":  # prterun names the rank
        assert lines[-1] == (f"mnn-launch: rank 1 on {socket.gethostname()} (process {pid}) was killed by signal 9 "
                             "(SIGKILL); the launcher ended the job"), stdout + stderr
    else:  # hydra names one process of the host, which may be the rank it stopped after the kill
        assert lines[-1] == (f"mnn-launch: one of ranks 0, 1 on {socket.gethostname()} was killed by signal 9 "
                             "(SIGKILL) (hydra ends a host's other ranks the same way and names only one); the "
                             "launcher ended the job"), stdout + stderr
    assert sum(line.startswith("mnn-launch:") for line in lines) == 1
    assert took < 30
