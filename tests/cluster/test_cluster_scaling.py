"""mnn-scaling across two hosts of the test cluster, their links capped at 1 Gbit/s.

One tiny experiment, run in the head as a user would run it: each rank count a job
started through the launcher's plan on the cluster's hostfile, then the all-reduce
micro-benchmark over the link, its α–β fit and the cost model's prediction. The
sizes start at 512 KiB: smaller messages fit the token bucket's 256 KiB burst and
pass at the speed of the machine, not of the cap. At 1 Gbit/s a byte takes 8 ns on
the wire (about 8.4 ns with the TCP/IP headers); on two ranks every all-reduce
model's bandwidth term is nβ, so a fitted β within a factor of two of 8 ns/B says
that the bytes went over the capped link.
"""
import json
import sys

from cluster_jobs import CLUSTER_ENV

SCALING = [sys.executable, "-m", "mnn.scripts.scaling"]
CAP_NS_PER_BYTE = 8.0  # 1 Gbit/s
NOTE = "links capped at 1 Gbit/s by tc tbf; no latency emulated"


def _records(folder):
    by_kind = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_kind.setdefault(record.pop("kind"), []).append(record)
    return by_kind


def test_scaling_across_two_hosts_fits_the_capped_link(make_cluster, tmp_path):
    cluster = make_cluster(2, rate="1gbit")
    received = [cluster.traffic(host)[0] for host in cluster.host_names]
    result = cluster.run("head", [
        *SCALING, "--hostfile", str(cluster.hostfile), "--ranks", "1,2", "--layers", "64,32,10",
        "--batch-per-rank", "16", "--repeats", "1", "--steps", "3", "--warmup-steps", "1",
        "--allreduce", "mpi,ring", "--min-bytes", str(512 * 1024), "--max-bytes", str(4 * 2**20),
        "--seconds-per-size", "0.05", "--network", "10gbe", "--max-ranks", "8", "--note", NOTE,
        "--out", str(tmp_path)], env=CLUSTER_ENV, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = _records(tmp_path)
    assert records["machine"][0]["hosts"] == ["node1:1", "node2:1"]
    assert [run["ranks"] for run in records["run"]] == [1, 2]
    assert {(row["allreduce"], row["ranks"]) for row in records["collective"]} == {("mpi", 2), ("ring", 2)}
    fits = {fit["allreduce"]: fit for fit in records["fit"]}
    for name in ("mpi", "ring"):
        beta_ns = fits[name]["beta_s_per_byte"] * 1e9
        assert CAP_NS_PER_BYTE / 2 < beta_ns < CAP_NS_PER_BYTE * 2, (name, beta_ns, result.stdout)
    assert [row["ranks"] for row in records["prediction"]] == [1, 2]

    report = (tmp_path / "report.md").read_text()
    for heading in ("## Machine", "## Results", "## All-reduce micro-benchmark", "## Cost model",
                    "**Predicted against measured**", "## Notes", "## Child jobs"):
        assert heading in report, heading
    assert "- hosts: node1:1, node2:1" in report and f"- {NOTE}" in report
    # Each host received at least the timed and warm-up iterations of the largest size, of each all-reduce:
    # 20 calls that each bring in half the vector twice (reduce-scatter, then all-gather).
    grown = [cluster.traffic(host)[0] - before for host, before in zip(cluster.host_names, received)]
    assert min(grown) > 2 * 20 * 4 * 2**20, grown
