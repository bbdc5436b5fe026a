"""mnn-bench runs and reports what it promises: one process and under mpiexec -n 2.

These check the JSON lines' keys and that the numbers are sane, never a speed:
speed is measured by running the benchmark, not asserted in a test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MPIEXEC = Path(sys.executable).parent / "mpiexec"
QUICK = ["--batch", "8,32", "--rounds", "2", "--target-ms", "5"]
BASE_KEYS = {"impl", "ranks", "batch_per_rank", "ms_per_step", "samples_per_s", "peak_rss_mb"}


def run_bench(args, ranks=None):
    command = [sys.executable, "-m", "mnn.scripts.bench", *args]
    if ranks:
        command = [str(MPIEXEC), "-n", str(ranks), *command]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def measurements(records, impl):
    return [record for record in records if record.get("impl") == impl]


def test_one_process_reports_every_batch_size():
    records = run_bench([*QUICK, "--no-torch"])
    mnn = measurements(records, "mnn")
    assert [record["batch_per_rank"] for record in mnn] == [8, 32]
    for record in mnn:
        assert BASE_KEYS <= set(record)
        assert record["ranks"] == 1
        assert record["ms_per_step"] > 0
        assert record["samples_per_s"] == pytest.approx(
            record["batch_per_rank"] / record["ms_per_step"] * 1e3, rel=1e-3)
    assert not measurements(records, "torch")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
def test_two_ranks_report_the_communication_breakdown():
    records = run_bench([*QUICK, "--no-torch"], ranks=2)
    mnn = measurements(records, "mnn")
    assert len(mnn) == 2
    for record in mnn:
        assert record["ranks"] == 2
        assert BASE_KEYS | {"compute_ms", "comm_ms", "wait_ms", "sync_ms", "allreduce_ms"} <= set(record)
        assert 0 < record["compute_ms"] < record["ms_per_step"]
        assert record["sync_ms"] > 0 and record["allreduce_ms"] > 0
        # Global throughput counts both ranks' samples.
        assert record["samples_per_s"] == pytest.approx(
            2 * record["batch_per_rank"] / record["ms_per_step"] * 1e3, rel=1e-3)


def test_pytorch_side_by_side_when_installed():
    pytest.importorskip("torch")
    records = run_bench(["--batch", "16", "--rounds", "2", "--target-ms", "5"])
    assert measurements(records, "torch")
    compare = [record for record in records if "compare" in record]
    assert compare and compare[0]["throughput_ratio"] > 0


def test_bad_batch_list_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "mnn.scripts.bench", "--batch", "0,x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "expected" in result.stderr


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--target-ms", "-5"], ["--target-ms", "nan"]])
def test_nonpositive_settings_are_usage_errors(args):
    result = subprocess.run([sys.executable, "-m", "mnn.scripts.bench", *args],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "expected a positive" in result.stderr


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
def test_scaling_reports_weak_scaling_efficiency():
    records = run_bench(["--scaling", "1,2", "--repeats", "2", *QUICK, "--no-torch"])
    compare = [record for record in records if "weak_scaling_efficiency" in record]
    assert [record["batch_per_rank"] for record in compare] == [8, 32]
    for record in compare:
        assert record["weak_scaling_efficiency"] == pytest.approx(record["speedup"] / 2, abs=1e-3)
