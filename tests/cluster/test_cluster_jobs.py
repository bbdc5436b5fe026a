"""Real jobs across the hosts of a test cluster: mnn-launch in the head, ranks on node1 ... node3.

What a job across hosts must get right, checked with the work it does:

* mnn-train ends with the parameters that one process gets (float64, so that only the
  order of the sums differs): the digits MLP on 2 and 3 hosts with 1 and 2 ranks each,
  an attention net and a GPT on one layout each;
* ``mnn-launch --check`` hears every host, and its hello's rank ``i`` answers from host ``i``;
* ranks on different hosts talk over the hosts' links, never through shared memory: each
  host's link carries at least the bytes that the all-reduces must bring in and send out,
  and MPI puts only the ranks of one host in one shared-memory communicator;
* every rank, on every host, gets the BLAS threads that ``mnn-launch --dry-run`` plans
  (its cores over the ranks of the busiest host).

One cluster of three hosts serves the whole module; a job on two of them uses node1 and
node2. The file system is shared by all hosts, so rank 0 (on node1) writes into tmp_path.
"""
import json
import os
import platform
import re
import sys
from pathlib import Path

import mpi4py
import numpy as np
import pytest
import tomli_w

from cluster_jobs import CLUSTER_ENV, TRAIN, assert_nothing_left, launch
from mnn.distributed.cluster import Cluster
from mnn.distributed.cluster.namespaces import NETNS_RUN
from mnn.distributed.environment import THREAD_VARIABLES
from mnn.distributed.training.config import load_toml
from mnn.io import load_arrays
from processes import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# A few float64 steps of each model: enough for every all-reduce to matter, a few seconds a job.
DIGITS = ["--config", str(EXAMPLES / "digits.toml"), "--dtype", "float64", "--max-steps", "5", "--eval-every", "0"]
ATTENTION = ["--config", str(EXAMPLES / "attention.toml"), "--dtype", "float64", "--max-steps", "3",
             "--eval-every", "0"]
GPT_STEPS = 3
# The sums of a float64 all-reduce come in another order than one process's: rounding, no more.
ATOL = 1e-9
# Each rank of the probe job writes down its host, the ranks that MPI says share its memory,
# its thread variables and the threads its BLAS runs (which counts the cores it is bound to).
PROBE = """\
import json, os, socket, sys
import numpy  # loads its BLAS, which threadpoolctl then reports
from mpi4py import MPI
from threadpoolctl import threadpool_info
world = MPI.COMM_WORLD
shared = world.Split_type(MPI.COMM_TYPE_SHARED)
facts = {"host": socket.gethostname(), "same_memory": sorted(shared.allgather(world.rank)),
         "threads": {name: os.environ.get(name) for name in sys.argv[2:]},
         "blas": [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]}
with open(os.path.join(sys.argv[1], f"rank{world.rank}.json"), "w") as out:
    json.dump(facts, out)
"""


@pytest.fixture(scope="module")
def cluster(machine_network_unchanged):
    """Three hosts with two slots each (its hostfile: node1:2 ... node3:2), for every job here."""
    with Cluster(3, slots=2) as made:
        machine_network_unchanged.add(made.name)
        yield made
    assert not (NETNS_RUN / made.namespace("head")).exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(name, args)``: model.npz of the job ``args`` trained by one process without MPI,
    outside the cluster; once per model."""
    models = {}

    def trained(name, args):
        if name not in models:
            output = tmp_path_factory.mktemp(f"one-process-{name}")
            result = run([*args, "--output", str(output)], MNN_NO_MPI="1")
            assert result.returncode == 0, result.stderr
            models[name] = load_arrays(output / "model.npz")
        return models[name]
    return trained


def hosts_of(layout):
    """[(host, ranks)] of a layout written as ranks per host: (2, 1) is node1 with 2, node2 with 1."""
    return [(f"node{index}", ranks) for index, ranks in enumerate(layout, start=1)]


def host_options(cluster, layout, given, folder):
    """mnn-launch's options for ``layout``: ``--hosts``, a hostfile of our own in Open MPI's
    format (``host slots=N``), or the cluster's own hostfile (``host:N``, every host)."""
    hosts = hosts_of(layout)
    if given == "hosts":
        return ["--hosts", ",".join(f"{host}:{ranks}" for host, ranks in hosts)]
    if given == "cluster hostfile":
        assert layout == (cluster.slots,) * cluster.hosts
        return ["--hostfile", str(cluster.hostfile)]
    hostfile = folder / "hostfile"
    hostfile.write_text("".join(f"{host} slots={ranks}\n" for host, ranks in hosts))
    return ["--hostfile", str(hostfile)]


def launched(cluster, args, env=None):
    """``mnn-launch ARGS`` in the head, to its end; then nothing of the job may be left on any host
    (the next test's traffic is its own)."""
    result = launch(cluster, args, env=env)
    assert_nothing_left(cluster, timeout=60)
    return result


def assert_same_model(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == np.float64, key
        np.testing.assert_allclose(got[key], value, rtol=0, atol=ATOL, err_msg=key)


def model_bytes(model):
    return sum(value.nbytes for value in model.values())


def train_across_hosts(cluster, layout, given, folder, args):
    """mnn-train with ``args`` on ``layout``; its model, summary, and each host's (rx, tx) bytes during it."""
    output = folder / "out"
    before = {host: cluster.traffic(host) for host in cluster.host_names}
    result = launched(cluster, [*host_options(cluster, layout, given, folder), "--", *TRAIN, *args,
                                "--output", str(output)])
    assert result.returncode == 0, result.stdout + result.stderr
    after = {host: cluster.traffic(host) for host in cluster.host_names}
    moved = {host: (after[host][0] - before[host][0], after[host][1] - before[host][1]) for host in before}
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == sum(layout)
    return load_arrays(output / "model.npz"), summary, moved


@pytest.mark.parametrize("layout, given", [((1, 1), "hosts"), ((2, 2), "own hostfile"),
                                           ((1, 1, 1), "hosts"), ((2, 2, 2), "cluster hostfile")],
                         ids=["2x1-hosts", "2x2-own-hostfile", "3x1-hosts", "3x2-cluster-hostfile"])
def test_digits_across_hosts_ends_as_one_process_and_its_all_reduces_cross_the_links(
        cluster, reference, tmp_path, layout, given):
    """Each all-reduce sums every parameter's gradient (summary: reduced_bytes in all), so each host
    must receive at least that many bytes (the sums depend on the other hosts' gradients) and send
    as many (theirs depend on its own); ranks that shared memory across hosts would move none. A
    host outside the job sees less than that: the counters are the job's."""
    model, summary, moved = train_across_hosts(cluster, layout, given, tmp_path, DIGITS)
    assert summary["steps"] == 5
    assert_same_model(model, reference("digits", DIGITS))

    reduced = summary["timings"]["reduced_bytes"]
    assert reduced >= 5 * model_bytes(model)
    in_job = [host for host, _ in hosts_of(layout)]
    for host, (received, sent) in moved.items():
        if host in in_job:
            assert received >= reduced and sent >= reduced, (host, received, sent, reduced)
        else:
            assert received + sent < reduced, (host, received, sent, reduced)


def test_attention_net_across_hosts_ends_as_one_process(cluster, reference, tmp_path):
    """A described net (reshape, residual self-attention, MLP) from its job file, on 2 hosts with 1 rank each."""
    model, summary, _ = train_across_hosts(cluster, (1, 1), "own hostfile", tmp_path, ATTENTION)
    assert summary["steps"] == 3
    assert "1.Residual.0.MultiHeadAttention.w_q" in model
    assert_same_model(model, reference("attention", ATTENTION))


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    """examples/gpt.toml with one narrow block, short windows and small batches, in float64."""
    job = load_toml(EXAMPLES / "gpt.toml")
    job["model"]["gpt"].update(n_layers=1, d_model=16, n_heads=2, context=16)
    job.update(batch_size=8, steps_per_epoch=GPT_STEPS, epochs=1, dtype="float64", log_every=1)
    path = tmp_path_factory.mktemp("gpt") / "gpt.toml"
    path.write_text(tomli_w.dumps(job))
    return ["--config", str(path)]


def test_gpt_across_hosts_ends_as_one_process(cluster, reference, tmp_path, tiny_gpt):
    """A GPT on 3 hosts with 1 rank each: the batch of 8 windows splits unevenly over the ranks."""
    model, summary, _ = train_across_hosts(cluster, (1, 1, 1), "hosts", tmp_path, tiny_gpt)
    assert summary["steps"] == GPT_STEPS
    assert_same_model(model, reference("gpt", tiny_gpt))


@pytest.mark.parametrize("layout, given", [((1, 1), "hosts"), ((2, 2, 2), "cluster hostfile")],
                         ids=["2-hosts", "3-cluster-hostfile"])
def test_check_hears_every_host_and_the_hello_crosses_them(cluster, tmp_path, layout, given):
    """Every line OK; the versions are this Python's; every host resolves and answers ssh; the hello
    runs one rank per host whatever its slots, rank i on host i, and all of them join one job."""
    options = host_options(cluster, layout, given, tmp_path)
    result = launched(cluster, ["--check", *options])
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines and all(line.startswith("OK ") for line in lines), result.stdout
    hosts = [host for host, _ in hosts_of(layout)]
    assert f"OK Python {platform.python_version()} ({sys.executable})" in lines
    assert f"OK NumPy {np.__version__}" in lines
    assert f"OK mpi4py {mpi4py.__version__}" in lines
    assert f"OK hosts resolve: {', '.join(f'{host} ({cluster.address(host)})' for host in hosts)}" in lines
    assert f"OK ssh answers from {', '.join(hosts)}" in lines
    hello = [line for line in lines if line.startswith("OK host ")]
    assert hello == [f"OK host {host}: rank {rank} answered from {host}" for rank, host in enumerate(hosts)]


@pytest.mark.parametrize("layout, given", [((1, 2), "hosts"), ((1, 1, 1), "own hostfile")],
                         ids=["1+2-hosts", "1+1+1-own-hostfile"])
def test_ranks_share_memory_only_within_a_host_and_get_the_planned_threads(cluster, tmp_path, layout, given):
    """Ranks fill the hosts in order; MPI's shared-memory communicator of each rank holds exactly the
    ranks of its host; and with no thread variable set by the caller, every rank on every host
    gets what --dry-run plans: this machine's cores (each host has as many) over the busiest
    host's ranks, and its BLAS runs that many threads (Open MPI bound a rank to one core, so
    a rank alone on its host ran one thread where two were planned, until mnn-launch passed
    --bind-to none)."""
    env = {name: value for name, value in CLUSTER_ENV.items() if name not in THREAD_VARIABLES}
    options = host_options(cluster, layout, given, tmp_path)
    plan = launch(cluster, ["--dry-run", *options, "--", "true"], env=env)
    assert plan.returncode == 0, plan.stderr
    planned = dict(re.findall(r"(\w+)=(\S+)", plan.stdout.splitlines()[0].removeprefix("environment: ")))
    threads = max(1, len(os.sched_getaffinity(0)) // max(layout))
    assert planned == {name: str(threads) for name in THREAD_VARIABLES}, plan.stdout

    facts_folder = tmp_path / "facts"
    facts_folder.mkdir()
    result = launched(cluster, [*options, "--", sys.executable, "-c", PROBE, str(facts_folder), *THREAD_VARIABLES],
                      env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    placed = [host for host, ranks in hosts_of(layout) for _ in range(ranks)]
    for rank, host in enumerate(placed):
        facts = json.loads((facts_folder / f"rank{rank}.json").read_text())
        assert facts["host"] == host, (rank, facts)
        assert facts["same_memory"] == [other for other, where in enumerate(placed) if where == host], (rank, facts)
        assert facts["threads"] == planned, (rank, facts)
        assert facts["blas"] and all(count == threads for count in facts["blas"]), (rank, facts)
