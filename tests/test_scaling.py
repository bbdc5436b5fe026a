"""mnn-scaling: a tiny real run writes well-formed outputs; the plan is mnn-launch's; bad arguments stop it.

The run is real (1 and 2 ranks under the mpiexec beside this Python, a few
steps of a tiny MLP, the micro-benchmark up to 1 KiB) and takes a few
seconds. The PNG part needs matplotlib (the optional extra "plot") and is
skipped without it; everything else runs without it. Nothing here asserts a
speed: speed is measured by running mnn-scaling, not in a test.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from mnn.distributed.experiments.collectives import available_allreduces
from mnn.distributed.experiments.costmodel import NETWORKS, Network
from mnn.distributed.environment import install_hint
from mnn.distributed.launch.plan import as_rank
from mnn.distributed.launch import MpiSetup
from mnn.distributed.experiments.scaling.settings import Experiment, Point, ScalingSettings, build_workload, summarise
from mnn.distributed.experiments.scaling.driver import ChildJobs, capacity, turns, worker_command
from mnn.distributed.experiments.scaling import report as scaling_report
from mnn.scripts.scaling import main, parse_settings
from processes import MPIEXEC

TINY = ["--ranks", "1,2", "--layers", "12,8,3", "--batch-per-rank", "4", "--repeats", "2", "--steps", "3",
        "--warmup-steps", "1", "--max-bytes", "1024", "--seconds-per-size", "0.01", "--max-ranks", "64"]
PNGS = ("speedup.png", "efficiency.png", "breakdown.png", "collectives.png", "model.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec beside this Python")
    out = tmp_path_factory.mktemp("scaling")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run([sys.executable, "-m", "mnn.scripts.scaling", *TINY, "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.slow
def test_tiny_run_prints_a_progress_line_per_run(tiny_run):
    _, stdout = tiny_run
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert "2 rank(s)" in progress[1] and "ms/step" in progress[1]
    assert "wrote report.md" in stdout


@pytest.mark.slow
def test_tiny_run_writes_one_csv_row_per_rank_count(tiny_run):
    out, _ = tiny_run
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["ranks"] for row in rows] == ["1", "2"]
    for row in rows:
        assert row["oversubscribed"] == "False" and row["turns"] == "2"
        assert float(row["samples_per_s_min"]) <= float(row["samples_per_s"]) <= float(row["samples_per_s_max"])
        assert float(row["ms_per_step"]) > 0 and int(row["grad_bytes"]) == (12 * 8 + 8 + 8 * 3 + 3) * 4
        parts = sum(float(row[key]) for key in ("compute_ms", "comm_ms", "wait_ms", "optimizer_ms", "other_ms"))
        assert parts == pytest.approx(float(row["ms_per_step"]), rel=1e-3)
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[0]["efficiency"]) == 1.0
    assert float(rows[1]["efficiency"]) == pytest.approx(float(rows[1]["speedup"]) / 2, rel=1e-3)


@pytest.mark.slow
def test_tiny_run_writes_every_record_as_json(tiny_run):
    out, _ = tiny_run
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = [record["kind"] for record in records]
    assert kinds[:2] == ["settings", "machine"]
    assert kinds.count("run") == 4 and kinds.count("point") == 2
    # 4 B ... 1 KiB is 9 sizes, for each available all-reduce.
    assert kinds.count("collective") == 9 * len(available_allreduces())
    assert {"fit", "prediction", "projection"} <= set(kinds)
    runs = [record for record in records if record["kind"] == "run"]
    assert [(run["turn"], run["ranks"]) for run in runs] == [(0, 1), (0, 2), (1, 1), (1, 2)]  # interleaved
    assert all(len(run["peak_rss_mb"]) == run["ranks"] and len(run["per_rank"]) == run["ranks"] for run in runs)
    machine = records[1]
    assert machine["mpi_library"] and machine["blas"] and machine["numpy"] and machine["date"]
    projection = [record for record in records if record["kind"] == "projection"]
    assert max(record["ranks"] for record in projection) == 64
    assert {record["network"] for record in projection} >= set(NETWORKS)


@pytest.mark.slow
def test_tiny_run_report_has_machine_tables_and_assumptions(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    for heading in ("## Machine", "## Results", "## All-reduce micro-benchmark", "## Cost model"):
        assert heading in report
    assert "| ranks | samples/s | speed-up | efficiency | ms/step |" in report
    assert "Predicted against measured" in report and "Projected efficiency" in report
    assert "MPICH's choice" in report and "none of it hidden behind backward" in report
    assert "Oversubscribed" not in report
    table = [line for line in report.splitlines() if line.startswith("| 2 |")]
    assert table and table[0].count("|") == 13


@pytest.mark.slow
def test_tiny_run_draws_the_plots_with_matplotlib(tiny_run):
    pytest.importorskip("matplotlib")
    out, _ = tiny_run
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in (out / "report.md").read_text()


# -------------------------------------------------------------------- outputs without MPI or matplotlib

def _run(ranks, samples_per_s, turn):
    ms = 1000.0 * ranks * 8 / samples_per_s
    return {"ranks": ranks, "turn": turn, "steps": 10, "global_batch": 8 * ranks, "ms_per_step": ms,
            "samples_per_s": samples_per_s, "compute_ms": 0.7 * ms, "comm_ms": 0.05 * ms, "wait_ms": 0.15 * ms,
            "optimizer_ms": 0.05 * ms, "other_ms": 0.05 * ms, "grad_bytes": 1000, "bucket_bytes": [1000],
            "peak_rss_mb": [50.0] * ranks, "per_rank": []}


def _experiment(tmp_path):
    settings = ScalingSettings(ranks=[1, 2, 4], layers=(12, 8, 3), per_rank_batch=8, repeats=2, out=tmp_path)
    points = [Point(1, False, [_run(1, 1000.0, 0), _run(1, 900.0, 1)]),
              Point(2, False, [_run(2, 1800.0, 0), _run(2, 1700.0, 1)]),
              Point(4, True, [_run(4, 1500.0, 0), _run(4, 1400.0, 1)])]
    summarise(points)
    machine = {"date": "2026-01-01T00:00:00", "host": "h", "cpu": "cpu", "cores": 2, "ranks_that_fit": 2,
               "mpi_library": "MPICH", "mpi4py": "4", "mpiexec": "mpiexec", "blas": "openblas", "python": "3",
               "numpy": "2", "mnn": "0.1", "platform": "linux", "command": "mnn-scaling"}
    experiment = Experiment(settings, machine, points)
    build_workload(experiment)
    return experiment


def test_speedup_is_taken_turn_by_turn_against_the_same_turns_baseline(tmp_path):
    points = _experiment(tmp_path).points
    two = points[1].summary
    assert two["speedup_min"] == pytest.approx(1.8) and two["speedup_max"] == pytest.approx(1700 / 900)
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)


def test_oversubscribed_points_are_kept_apart_and_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling_report, "plots_available", lambda: False)
    lines = []
    experiment = _experiment(tmp_path)
    written = scaling_report.write_outputs(experiment, log=lines.append)
    assert lines == [f"plots skipped: matplotlib is not installed ({install_hint('plot')})"]
    assert not [path for path in written if path.suffix == ".png"]
    report = (tmp_path / "report.md").read_text()
    results, oversubscribed = report.split("### Oversubscribed")
    assert "| 2 |" in results and "| 4 |" not in results
    assert "| 4 |" in oversubscribed
    with (tmp_path / "results.csv").open() as file:
        assert [row["oversubscribed"] for row in csv.DictReader(file)] == ["False", "False", "True"]
    # Without a micro-benchmark the presets still project, and nothing pretends to predict this machine.
    assert "Projected efficiency" in report and "Predicted against measured" not in report


# -------------------------------------------------------------------- what the plots show (no rendering)

def test_message_sizes_read_in_binary_units():
    plots = pytest.importorskip("mnn.distributed.experiments.scaling.plots")
    assert [plots.format_bytes(size) for size in (4, 512, 1024, 1536, 256 * 2**10, 64 * 2**20, 2**30)] == \
        ["4 B", "512 B", "1 KiB", "1.5 KiB", "256 KiB", "64 MiB", "1 GiB"]
    major, minor = plots.size_ticks([4, 64 * 2**20])  # the micro-benchmark's default sizes
    assert [plots.format_bytes(size) for size in major] == \
        ["4 B", "64 B", "1 KiB", "16 KiB", "256 KiB", "4 MiB", "64 MiB"]
    assert minor == [2**k for k in range(2, 27)]
    major, _ = plots.size_ticks([4, 16 * 2**20])  # a span no step divides: the largest size keeps its label
    assert len(major) <= 7 and major[-1] == 16 * 2**20
    assert plots.size_ticks([2**19, 2**24])[0] == [2**k for k in range(19, 25)]  # few sizes: every one


def test_projection_lines_differ_by_colour_per_network_and_style_per_allreduce():
    plots = pytest.importorskip("mnn.distributed.experiments.scaling.plots")
    pairs = [("here (mpi fit)", "mpi"), ("here (ring fit)", "ring"), ("here (ring-fp16 fit)", "ring-fp16")]
    fitted = [Network(name, 5e-6, 1e-9, "fitted here") for name, _ in pairs]
    networks = fitted + [NETWORKS["10gbe"], NETWORKS["25gbe"]]
    pairs += [(name, algorithm) for name in ("10gbe", "25gbe") for algorithm in ("ring", "mpi")]
    projections = [{"network": network, "algorithm": algorithm, "ranks": ranks, "efficiency": 0.5}
                   for network, algorithm in pairs for ranks in (1, 2)]
    lines, colors = plots.projection_styles(projections, networks, [network.name for network in fitted])
    assert list(lines) == pairs and len(set(lines.values())) == len(pairs)  # no two lines look alike
    assert {lines[(name, "mpi")][1] for name in ("10gbe", "25gbe", "here (mpi fit)")} == {"-"}
    assert {lines[(name, "ring")][1] for name in ("10gbe", "25gbe", "here (ring fit)")} == {"--"}
    assert lines[("here (ring-fp16 fit)", "ring-fp16")] == ("black", ":")
    assert lines[("10gbe", "mpi")][0] == lines[("10gbe", "ring")][0] != lines[("25gbe", "ring")][0]
    # One legend entry per network, the fitted ones as this machine; the presets with their alpha and bandwidth.
    assert list(colors) == ["this machine (α, β fitted to each all-reduce)", "10gbe: α 25 µs, 1.17 GB/s",
                            "25gbe: α 25 µs, 2.9 GB/s"]
    assert colors["this machine (α, β fitted to each all-reduce)"] == "black"


# -------------------------------------------------------------------- the launcher's plan

def test_each_run_is_the_plan_mnn_launch_would_make_under_slurm():
    settings = ScalingSettings()
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "PATH": os.environ.get("PATH", "")}
    mpi = MpiSetup("4.1", "MPICH", "mpich", "/usr/bin/mpiexec")
    plan = ChildJobs(settings.launch_settings(), env, mpi).plan(4, worker_command("point", {"a": 1}))
    assert plan.argv[:3] == ["srun", "-n", "4"]
    assert plan.argv[3:6] == as_rank([])  # every rank starts through the script of torchrun's variables
    assert plan.argv[6:9] == [sys.executable, "-m", "mnn.distributed.experiments.scaling.worker"]
    assert capacity(settings, env) == 8


def test_a_plan_that_would_start_fewer_ranks_is_refused():
    # Without MPI the launcher runs one process: a 2-rank point would measure 1 rank.
    jobs = ChildJobs(ScalingSettings().launch_settings(), {"PATH": ""}, MpiSetup(None, "no mpi4py", None, None))
    assert jobs.plan(1, ["true"]).argv == ["true"]
    with pytest.raises(RuntimeError, match="cannot start 2 ranks: no MPI"):
        jobs.plan(2, ["true"])


def test_rank_counts_take_turns():
    assert list(turns([1, 2, 4], 2)) == [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 4)]


def test_hosts_go_to_the_launcher_and_set_the_capacity():
    settings = ScalingSettings(hosts=[("localhost", 3)])
    mpi = MpiSetup("4.1", "MPICH", "mpich", "/usr/bin/mpiexec")
    plan = ChildJobs(settings.launch_settings(), {"PATH": ""}, mpi).plan(3, ["true"])
    assert plan.argv[:3] == ["/usr/bin/mpiexec", "-n", "3"] and "-hosts" in plan.argv
    assert capacity(settings, {}) == 3
    assert capacity(ScalingSettings(), {}, cores=2) == 2
    assert capacity(ScalingSettings(threads_per_rank=2), {}, cores=8) == 4


# -------------------------------------------------------------------- bad arguments: one clear error, exit 2

@pytest.mark.parametrize("argv, message", [
    (["--ranks", "0"], "expected every rank count >= 1, got 0"),
    (["--ranks", "1,x"], "expected comma-separated integers"),
    (["--mode", "strong", "--ranks", "1,4", "--global-batch", "2"],
     "--global-batch 2 is smaller than 4 ranks"),
    (["--mode", "strong"], "--mode strong needs --global-batch"),
    (["--network", "40gbe"], "unknown network preset '40gbe': expected 10gbe, 25gbe, 100gb-ib"),
    (["--alpha", "1e-6"], "--alpha and --beta go together"),
    (["--ranks", "1,1"], "each rank count once"),
    (["--max-bytes", "1000"], "must be a power of two"),
    (["--grad-compression", "fp16"], "needs --train-allreduce ring"),
])
def test_bad_arguments_are_one_clear_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert len([line for line in error.splitlines() if "error:" in line]) == 1


def test_networks_default_to_every_preset_and_alpha_beta_add_one():
    assert [n.name for n in parse_settings([]).networks] == list(NETWORKS)
    assert [n.name for n in parse_settings(["--alpha", "2e-6", "--beta", "1e-10"]).networks] == ["custom"]
    chosen = parse_settings(["--network", "25gbe", "--alpha", "2e-6", "--beta", "1e-10"]).networks
    assert [n.name for n in chosen] == ["25gbe", "custom"] and chosen[1].alpha == 2e-6
