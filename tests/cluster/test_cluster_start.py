"""What goes wrong before a job across hosts has started, in a test cluster, under the MPI of
the Python that runs pytest: mnn-launch in the head, ranks on node1 and node2.

* a host whose sshd is stopped: named, and nothing started anywhere;
* a host that answers ssh but whose MPI daemon hangs in its start: the job is stopped at
  ``--start-timeout`` although no rank runs on the head (the ranks report their start to
  mnn-launch over the network), and nothing is left on any host;
* a job whose ranks all run on other hosts and start: mnn-launch hears that they are
  ready and stops watching at once (it would stop the job at the deadline otherwise);
* a host with another version of NumPy: refused at start, naming the host and the versions
  on both sides, exit status 2, nothing left; ``mnn-launch --check`` names it too.

A host is made different the way a real one is, by another file at the same path: a bind
mount in the mount namespace of that host's sshd (:meth:`Cluster.bind`), which the
sessions it starts inherit and nothing else on this machine sees.
"""
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cluster_jobs import PYTHON_BIN, TRAIN, assert_nothing_left, launch
from processes import mpiexec_family

# A few steps of the digits MLP: a job that starts as a real one does.
JOB = ["--max-steps", "2", "--eval-every", "0"]
# The launcher's daemon on each host: hydra's proxy, Open MPI's prted.
DAEMONS = {"mpich": "hydra_pmi_proxy", "openmpi": "prted"}
# A daemon that hangs in its start (it never calls back) until the ssh session that started it
# ends, as a daemon waiting on its launcher's connection does.
HANGING_DAEMON = f"""#!{sys.executable}
import os, time

def stat(pid):
    return open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()

session = os.getpid()
while session > 1 and not open(f"/proc/{{session}}/comm").read().startswith("sshd"):
    session = int(stat(session)[1])
try:
    while stat(session)[0] != "Z":
        time.sleep(0.1)
except OSError:
    pass
"""
# Ranks that report their start (get_communicator), after which rank 0 waits for mnn-launch
# to close the port they report to: it does once it heard that a rank is ready.
WAIT_FOR_READY_HEARD = """\
import os, socket, time
from mnn.distributed import get_communicator
comm = get_communicator()
host, _, port = os.environ["MNN_START_ADDR"].rpartition(":")
while comm.rank == 0:
    try:
        socket.create_connection((host, int(port)), 5).close()
    except ConnectionRefusedError:
        break
    time.sleep(0.1)
comm.barrier()
"""


def one_line(stderr):
    """mnn-launch's one line (Open MPI's launcher may warn that it could not move a remote shell
    into a process group)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "plm:ssh: Warning: setpgid" not in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_host_whose_sshd_is_stopped_is_named_and_nothing_starts(make_cluster):
    cluster = make_cluster(2)
    cluster.stop_sshd("node2")
    result = launch(cluster, ["--hosts", cluster.host_list, "--start-timeout", "20", "--", *TRAIN, *JOB])
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("mnn-launch: error: the job was not started: node2: ssh failed"), line
    assert "Connection refused" in line and "node1:" not in line, line
    assert_nothing_left(cluster)


def test_a_host_whose_mpi_daemon_hangs_is_stopped_at_the_start_timeout(make_cluster, tmp_path):
    """No rank runs on the head: the bound holds through the ranks' reports over the network."""
    cluster = make_cluster(2)
    daemon = os.path.realpath(shutil.which(DAEMONS[mpiexec_family()], path=str(PYTHON_BIN)))
    hanging = tmp_path / "daemon"
    hanging.write_text(HANGING_DAEMON)
    hanging.chmod(0o755)
    cluster.bind("node2", hanging, daemon)
    assert Path(daemon).read_bytes()[:4] == b"\x7fELF"  # the machine's own daemon is untouched
    started = time.monotonic()
    # Unbounded, it would hang until this call's own timeout.
    result = launch(cluster, ["--hosts", cluster.host_list, "--start-timeout", "4", "--", *TRAIN, *JOB], timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("mnn-launch: error: the job did not start within 4 s (--start-timeout): "), line
    assert "rank 1 on node2: no word from that host" in line and "mnn-launch ended every process" in line, line
    if mpiexec_family() == "mpich":  # hydra starts node1's rank, which reports it began, and waits in MPI_Init
        assert "rank 0 on node1 waited in MPI's start-up for the others" in line, line
    assert 4 <= elapsed < 60
    assert_nothing_left(cluster)


def test_ranks_all_on_other_hosts_report_that_they_are_ready(make_cluster):
    """Were their reports lost, the port would stay open until the start timeout (60 s)."""
    cluster = make_cluster(2)
    started = time.monotonic()
    result = launch(cluster, ["--hosts", cluster.host_list, "--start-timeout", "60", "--",
                              sys.executable, "-c", WAIT_FOR_READY_HEARD])
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    assert_nothing_left(cluster)


def test_a_host_with_another_version_of_numpy_is_refused_at_start(make_cluster, tmp_path):
    cluster = make_cluster(2)
    original = Path(np.__file__).with_name("version.py")
    other = tmp_path / "version.py"
    other.write_text(re.sub(r'^version = ".*"$', 'version = "1.99.0"', original.read_text(), count=1,
                            flags=re.MULTILINE))
    assert 'version = "1.99.0"' in other.read_text()
    cluster.bind("node2", other, original)
    assert 'version = "1.99.0"' not in original.read_text()  # only node2's sessions see it
    result = launch(cluster, ["--hosts", cluster.host_list, "--", *TRAIN, *JOB])
    assert result.returncode == 2, result.stderr
    assert f"rank 1 on node2: numpy 1.99.0 (rank 0: {np.__version__})" in result.stderr, result.stderr
    assert_nothing_left(cluster)
    # --check's hello finds it before any job runs.
    check = launch(cluster, ["--hosts", cluster.host_list, "--check"])
    fixes = [line for line in check.stdout.splitlines() if line.startswith("FIX: ")]
    assert check.returncode == 1 and len(fixes) == 1, check.stdout + check.stderr
    assert fixes[0].startswith(f"FIX: host node2 runs numpy 1.99.0 (this machine: {np.__version__}): "), fixes
    assert_nothing_left(cluster)
