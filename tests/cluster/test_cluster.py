"""The test cluster itself: sealed from the machine's network, real ssh with its own keys,
hosts that are told apart, capped links, and nothing left after it, even after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mnn.distributed.cluster import Cluster, remove_leftovers
from mnn.distributed.cluster.namespaces import NETNS_ETC, NETNS_RUN, STATE_ROOT

from cluster_jobs import CLUSTER_ENV, command_line

CLUSTER = [sys.executable, "-m", "mnn.scripts.cluster"]


def test_hosts_have_their_own_names_addresses_and_no_way_out(make_cluster):
    cluster = make_cluster(2)
    boot_ids = set()
    for host in ("head", *cluster.host_names):
        assert cluster.run(host, ["hostname"]).stdout.strip() == host
        boot_ids.add(cluster.run(host, ["cat", "/proc/sys/kernel/random/boot_id"]).stdout)
        routes = json.loads(cluster.run(host, ["ip", "-j", "route"]).stdout)
        assert [route["dst"] for route in routes] == ["10.77.0.0/24"], f"{host} has a route out: {routes}"
        addresses = json.loads(cluster.run(host, ["ip", "-j", "-4", "addr"]).stdout)
        assert {entry["addr_info"][0]["local"] for entry in addresses} == {"127.0.0.1", cluster.address(host)}
    # A boot id of their own: UCX (under MPICH) takes processes with one boot id for one machine.
    assert len(boot_ids) == 3
    # The machine's own names and addresses are not reachable from inside.
    assert cluster.run("head", ["ping", "-c", "1", "-W", "1", "192.0.2.1"], check=False).returncode != 0


def test_ssh_reaches_every_host_with_the_clusters_keys_only(make_cluster, tmp_path):
    cluster = make_cluster(2)
    for host in cluster.host_names:
        answer = cluster.run("head", ["ssh", host, "hostname; echo $SSH_CONNECTION"]).stdout.split()
        assert answer[0] == host and answer[-2] == cluster.address(host)
    # From one host to another too (launchers may start daemons from a host).
    assert cluster.run("node1", ["ssh", "node2", "hostname"]).stdout.strip() == "node2"
    # Strict host keys: a host whose key is not the cluster's is refused.
    wrong = cluster.run("head", ["ssh", "-o", f"UserKnownHostsFile={os.devnull}",
                                 "-o", f"GlobalKnownHostsFile={os.devnull}", "node1", "true"], check=False)
    assert wrong.returncode == 255 and "verification failed" in wrong.stderr
    # And a user key other than the cluster's is refused (BatchMode: no password prompt).
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True)
    other = cluster.run("head", ["ssh", "-F", os.devnull, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                                 "-i", str(tmp_path / "key"), "-o", f"UserKnownHostsFile={cluster.state}/known_hosts",
                                 "node1", "true"], check=False)
    assert other.returncode == 255 and "Permission denied" in other.stderr


def test_a_capped_link_carries_no_more_than_its_rate(make_cluster):
    """12.5 MB through a 100 Mbit/s link take at least a second to arrive; the counters see every byte."""
    cluster = make_cluster(1, rate="100mbit")
    size = 12_500_000
    receiver = ("import socket, time\nlisten = socket.create_server(('', 5000))\nprint('listening', flush=True)\n"
                "connection, _ = listen.accept()\nreceived = len(connection.recv(1 << 20))\n"
                "started = time.monotonic()\nwhile chunk := connection.recv(1 << 20):\n    received += len(chunk)\n"
                "print(received, time.monotonic() - started)\n")
    server = cluster.popen("node1", [sys.executable, "-c", receiver], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        received_before = cluster.traffic("node1")[0]
        cluster.run("head", [sys.executable, "-c", "import socket\nconnection = socket.create_connection(('node1', 5000))\n"
                             f"connection.sendall(bytes({size}))\nconnection.close()\n"], timeout=60)
        received, seconds = server.communicate(timeout=30)[0].split()
    finally:
        server.kill()
    assert int(received) == size
    # The token bucket lets its depth (256 KiB) through at once; the rest comes at the rate.
    assert float(seconds) >= (size - 256 * 1024) * 8 / 100e6
    assert cluster.traffic("node1")[0] - received_before >= size


def test_two_clusters_at_once_do_not_clash(make_cluster):
    one, two = make_cluster(1), make_cluster(1)
    assert one.name != two.name
    for cluster in (one, two):
        boot_id = cluster.run("head", ["ssh", "node1", "cat /proc/sys/kernel/random/boot_id"]).stdout
        assert boot_id == (cluster.state / "boot_id-node1").read_text()


def start_run(*args):
    """``mnn-cluster run ARGS`` in the background, once its cluster is up: (process, cluster name)."""
    process = subprocess.Popen([*CLUSTER, "run", *args], env=CLUSTER_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    assert " is up: " in line, line + process.stderr.read()
    return process, line.split()[2]


def gone(name):
    return not (STATE_ROOT / name).exists() and not any(
        entry.name.startswith(f"mnnc-{name}-") for folder in (NETNS_RUN, NETNS_ETC) if folder.is_dir()
        for entry in folder.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_run_stopped_by_a_signal_brings_its_cluster_down(machine_network_unchanged, signum):
    process, name = start_run("--hosts", "1", "--", "sleep", "60")
    machine_network_unchanged.add(name)
    process.send_signal(signum)
    assert process.wait(timeout=30) == 128 + signum  # the command's status: it got the signal
    assert gone(name)


def test_a_killed_runs_cluster_is_removed_by_the_next_one(machine_network_unchanged):
    process, name = start_run("--hosts", "1", "--", "sleep", "60")
    machine_network_unchanged.add(name)
    cluster = Cluster(1, name=name)
    deadline = time.monotonic() + 30
    while not (sleepers := [pid for pid in cluster.pids("head") if command_line(pid).startswith("sleep")]):
        assert time.monotonic() < deadline, "the command never started in the head"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not gone(name)
    assert name in remove_leftovers()
    assert gone(name)
    time.sleep(0.2)
    assert not command_line(sleepers[0]), "the killed run's command is still running"


def test_a_kept_cluster_stays_until_down(machine_network_unchanged):
    name = f"t{os.getpid()}"
    machine_network_unchanged.add(name)
    up = subprocess.run([*CLUSTER, "up", "--name", name, "--hosts", "2", "--slots", "2"], env=CLUSTER_ENV,
                        capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert name not in remove_leftovers()  # kept: its owner is gone on purpose
        listed = subprocess.run([*CLUSTER, "list"], capture_output=True, text=True, timeout=60).stdout
        assert f"{name}: 2 hosts x 2 slots, no cap, kept" in listed
        hosts = subprocess.run([*CLUSTER, "run", "--name", name, "--", "sh", "-c", "ssh node2 hostname; echo {hosts}"],
                               env=CLUSTER_ENV, capture_output=True, text=True, timeout=60)
        assert hosts.stdout.split() == ["node2", "node1:2,node2:2"], hosts.stderr
        reshaped = subprocess.run([*CLUSTER, "run", "--name", name, "--hosts", "3", "--", "true"],
                                  capture_output=True, text=True, timeout=60)
        assert reshaped.returncode == 2 and "--hosts shape a new cluster" in reshaped.stderr
    finally:
        down = subprocess.run([*CLUSTER, "down", name], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and gone(name)
    again = subprocess.run([*CLUSTER, "down", name], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and f"no cluster named {name}" in again.stderr
