"""mnn-cluster's command line where no cluster can be made: what it says, and that it makes nothing.
(The cluster itself, and jobs in it, are tested in tests/cluster/, as root.)"""
import os

import pytest

from mnn.distributed.cluster import cluster_support
from mnn.scripts import cluster as cluster_cli

from processes import exit_status


@pytest.mark.parametrize("argv, said", [
    (["run", "--rate", "fast", "--", "true"], "expected a rate such as 1gbit, 100mbit or 500kbit, got 'fast'"),
    (["run", "--hosts", "0", "--", "true"], "--hosts: expected a positive integer"),
    (["up", "--name", "my-cluster"], "expected up to 12 letters and digits, got 'my-cluster'"),
    (["up"], "the following arguments are required: --name"),
    (["start"], "invalid choice: 'start'"),
])
def test_wrong_arguments_are_named(capsys, argv, said):
    assert exit_status(cluster_cli.main, argv) == 2
    assert said in capsys.readouterr().err


def test_without_root_it_says_so_and_makes_nothing(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cluster_support() == "a cluster of network namespaces needs root"
    assert exit_status(cluster_cli.main, ["run", "--", "true"]) == 2
    assert capsys.readouterr().err == "mnn-cluster: a cluster of network namespaces needs root\n"


def test_missing_tools_are_named_with_their_packages(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("mnn.distributed.cluster.namespaces._SYSTEM_PATH", "/nonexistent")
    said = cluster_support()
    assert said.startswith("missing: ip (iproute2), tc (iproute2)")
    assert "sshd (openssh-server)" in said and said.endswith("(make setup-cluster installs them)")
