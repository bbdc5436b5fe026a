"""The test cluster: hosts as network namespaces on this machine (``mnn.distributed.cluster``).

These tests start real jobs across hosts: ``mnn-launch`` runs in the cluster's head
and reaches ``node1`` ... ``nodeN`` through their sshd, under the MPI of the Python
that runs pytest (``make test-cluster`` runs them under MPICH and under Open MPI).
They need root, ``ip netns``, iproute2's ``tc`` and Debian's openssh-server
(``make setup-cluster`` installs what is missing); elsewhere every test here is
skipped with one line that says why.

After the last test the machine's own network namespace must have exactly the
interfaces, addresses and routes it had before, and no namespace of a cluster
made here may be left.
"""
import json
import os
import subprocess

import pytest

from mnn.distributed.cluster import Cluster, cluster_support, remove_leftovers
from mnn.distributed.cluster.namespaces import NETNS_RUN, PREFIX

_SUPPORT = cluster_support()


def pytest_collection_modifyitems(config, items):
    if _SUPPORT is None:
        return
    skip = pytest.mark.skip(reason=f"no test cluster on this machine: {_SUPPORT}")
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


def _network_state():
    """The machine's own interfaces, addresses and routes (IPv4 and IPv6), as ``ip`` lists them."""
    state = {}
    for name, argv in (("links", ["ip", "-j", "link"]), ("addresses", ["ip", "-j", "addr"]),
                       ("routes", ["ip", "-j", "route"]), ("routes6", ["ip", "-6", "-j", "route"])):
        state[name] = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout or "[]")
    return state


@pytest.fixture(scope="session", autouse=True)
def machine_network_unchanged():
    """Fails the session if the cluster tests changed the machine's own network namespace or left
    a namespace of a cluster they made."""
    if _SUPPORT is not None:
        yield
        return
    removed = remove_leftovers()
    before = _network_state()
    mine = set()
    yield mine
    after = _network_state()
    assert after == before, "the machine's own network namespace changed during the cluster tests"
    left = [entry.name for entry in NETNS_RUN.iterdir()
            if any(entry.name.startswith(f"{PREFIX}-{name}-") for name in mine)] if NETNS_RUN.is_dir() else []
    assert not left, f"namespaces left by the cluster tests: {left} (leftovers removed at start: {removed})"


@pytest.fixture
def make_cluster(machine_network_unchanged):
    """``make_cluster(hosts, slots=1, rate=None)``: a cluster, up, brought down after the test
    (which then checks that nothing of it is left)."""
    made = []

    def make(hosts, slots=1, rate=None):
        cluster = Cluster(hosts, slots=slots, rate=rate).up()
        made.append(cluster)
        machine_network_unchanged.add(cluster.name)
        return cluster

    yield make
    for cluster in made:
        cluster.down()
        assert not (NETNS_RUN / cluster.namespace("head")).exists()
