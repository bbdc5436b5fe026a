"""Restarts across the hosts of a test cluster: a host lost mid-run (its link down) ends the
start of the job with a stall report; mnn-launch, with --max-restarts, asks the hosts again,
leaves the lost one out and starts the job again on the two that answer; mnn-train continues
from its newest checkpoint and ends with the model of one process that was never interrupted
(float64, up to rounding). Once the lost host's link is up again, nothing of the job is left
there: its rank's own stall watchdog ended it, and its launcher daemon's session closes.
"""
import json
from pathlib import Path

import numpy as np

from cluster_jobs import Job, assert_nothing_left
from processes import run, wait_for

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.toml"
STALL_TIMEOUT_S = 5
# The sums of a float64 all-reduce come in another order than one process's: rounding, no more.
ATOL = 1e-9
# What the lost host's sessions take to notice, once its link is up again: TCP's retransmissions
# back off while the link is down, to about half a minute apart.
LOST_HOST_LEFTOVER_S = 90


def options(output):
    return ["--config", str(DIGITS), "--dtype", "float64", "--log-every", "23", "--eval-every", "0",
            "--epochs", "100", "--checkpoint-every-steps", "10", "--stall-timeout", str(STALL_TIMEOUT_S),
            "--output", str(output)]


def test_a_host_lost_mid_run_restarts_the_job_on_the_hosts_left_and_ends_with_one_processs_model(
        make_cluster, tmp_path):
    cluster = make_cluster(3)
    output = tmp_path / "run"
    job = Job(cluster, options(output), launch_options=["--max-restarts", "1", "--min-ranks", "2"])
    job.wait_for_line("epoch 3/100 step 23/23")
    cluster.set_link("node3", False)
    try:
        status, stdout, stderr = job.finish(timeout=240)
    finally:
        cluster.set_link("node3", True)
    assert status == 0, stdout + stderr
    assert "rank 2 on node3 did not answer (stopped or lost)" in stderr, stderr
    restart, = [line for line in stderr.splitlines() if line.startswith("mnn-launch: restart")]
    assert restart.startswith("mnn-launch: restart 1 of 1 after a rank's stall report (above): 3 ranks -> 2 (node3: ")
    assert restart.endswith(": left out); the job continues from its newest checkpoint"), restart
    event, = [event for line in (output / "metrics.jsonl").read_text().splitlines()
              for event in [json.loads(line)] if event["event"] == "restart"]
    print(json.dumps(event))  # with pytest -s: what losing a host cost (the README quotes it)
    assert (event["ranks_before"], event["ranks_after"]) == (3, 2)
    # The line of step 69 came before the link went down, so a checkpoint of step 60 at least
    # was on disk (the epoch's own, at 69, may still have been on its way when the host went).
    assert event["checkpoint_step"] >= 3 * 23 - 10 and 0 <= event["redo_steps"] < 2 * 10, event
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["restarts"] == 1 and summary["steps"] == 100 * 23

    alone = tmp_path / "alone"
    single = run([*options(alone)[:-2], "--output", str(alone)], timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    with np.load(output / "model.npz") as got, np.load(alone / "model.npz") as expected:
        for name in expected.files:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=ATOL, err_msg=name)

    assert_nothing_left(cluster, ["head", "node1", "node2"], timeout=5)
    assert_nothing_left(cluster, ["node3"], timeout=LOST_HOST_LEFTOVER_S)
