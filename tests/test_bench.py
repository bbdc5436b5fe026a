"""mnn-bench runs and reports what it promises, for the MLP and the GPT: one process and
under mpiexec -n 2; the GPT's PyTorch twin computes mnn's losses; --quality writes its curves.

These check the JSON lines' keys and that the numbers are sane, never a speed:
speed is measured by running the benchmark, not asserted in a test. The PyTorch
parts are skipped where PyTorch is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnn.scripts.bench import main
from processes import MPIEXEC, exit_status

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
@pytest.mark.slow
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


def test_bad_batch_list_is_a_usage_error(capsys):
    assert exit_status(main, ["--batch", "0,x"]) == 2
    assert "expected" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--target-ms", "-5"], ["--target-ms", "nan"]])
def test_nonpositive_settings_are_usage_errors(args, capsys):
    assert exit_status(main, args) == 2
    assert "expected a positive" in capsys.readouterr().err


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
@pytest.mark.slow
def test_scaling_reports_weak_scaling_efficiency():
    records = run_bench(["--scaling", "1,2", "--repeats", "2", *QUICK, "--no-torch"])
    compare = [record for record in records if "weak_scaling_efficiency" in record]
    assert [record["batch_per_rank"] for record in compare] == [8, 32]
    for record in compare:
        assert record["weak_scaling_efficiency"] == pytest.approx(record["speedup"] / 2, abs=1e-3)


# ------------------------------------------------------------------ --model gpt
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 60
TINY_GPT = ["--model", "gpt", "--batch", "4", "--context", "8", "--d-model", "16", "--heads", "2", "--layers", "1",
            "--rounds", "2", "--target-ms", "5"]


@pytest.fixture(name="text_file")
def text_file_fixture(tmp_path):
    path = tmp_path / "code.py"
    path.write_text(TEXT)
    return path


def test_gpt_one_process_prints_well_formed_lines(text_file):
    records = run_bench([*TINY_GPT, "--text", str(text_file), "--no-torch"])
    header, *rest = records
    assert header["model"] == "gpt" and header["vocab"] == len(set(TEXT))
    [mnn] = measurements(records, "mnn")
    assert BASE_KEYS | {"tokens_per_s", "ms_min", "ms_max", "round_ms"} <= set(mnn)
    assert mnn["ranks"] == 1 and mnn["batch_per_rank"] == 4 and len(mnn["round_ms"]) == 2
    assert mnn["ms_min"] <= mnn["ms_per_step"] <= mnn["ms_max"]
    assert mnn["tokens_per_s"] == pytest.approx(mnn["samples_per_s"] * 8, rel=1e-3)
    assert not measurements(records, "torch") and not [record for record in records if "compare" in record]


def test_gpt_beside_pytorch_when_installed(text_file):
    pytest.importorskip("torch")
    records = run_bench([*TINY_GPT, "--text", str(text_file)])
    [torch_record] = measurements(records, "torch")
    assert BASE_KEYS | {"tokens_per_s"} <= set(torch_record)
    [compare] = [record for record in records if "compare" in record]
    assert compare["model"] == "gpt" and compare["ratio_min"] <= compare["ratio_max"]
    assert compare["throughput_ratio"] > 0


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
def test_gpt_two_ranks_report_the_unhidden_allreduce(text_file):
    records = run_bench([*TINY_GPT, "--text", str(text_file), "--no-torch", "--bucket-kb", "4"], ranks=2)
    [mnn] = measurements(records, "mnn")
    assert mnn["ranks"] == 2 and mnn["bucket_kb"] == 4 and mnn["buckets"] > 1
    assert 0 <= mnn["wait_ms"] <= mnn["comm_ms"] < mnn["ms_per_step"]
    assert mnn["samples_per_s"] == pytest.approx(2 * 4 / mnn["ms_per_step"] * 1e3, rel=1e-3)


def test_quality_needs_the_gpt():
    result = subprocess.run([sys.executable, "-m", "mnn.scripts.bench", "--quality"], capture_output=True, text=True)
    assert result.returncode == 2 and "--model gpt" in result.stderr


def tiny_gpt(text_file, seed=0):
    from mnn.distributed.experiments.gpt_bench import GptSizes, build_gpt
    from mnn.text import load_text

    sizes = GptSizes(batch=4, context=8, d_model=16, n_heads=2, n_layers=2)
    text = load_text(text_file, context=sizes.context)
    return sizes, text, build_gpt(sizes, len(text.vocab), seed)


def train_both(mnn_pair, torch_pair, x, y):
    """One training step of an mnn net and of its PyTorch twin (each with its optimizer) on
    the batch ``(x, y)``; their losses before the step."""
    import torch

    (net, optimizer), (model, torch_optimizer) = mnn_pair, torch_pair
    net.zero_grads()
    mnn_loss = float(net(x, y))
    net.backward()
    optimizer.step()
    torch_optimizer.zero_grad()
    torch_loss = model(torch.from_numpy(x), torch.from_numpy(y))
    torch_loss.backward()
    torch_optimizer.step()
    return mnn_loss, torch_loss.item()


def test_pytorch_copy_of_the_weights_gives_the_same_losses(text_file):
    torch = pytest.importorskip("torch")
    from mnn import Adam
    from mnn.distributed.comm import SingleProcessCommunicator
    from mnn.distributed.experiments.gpt_bench import drawn_windows, torch_gpt

    sizes, text, net = tiny_gpt(text_file)
    model = torch_gpt(net)
    mnn_adam, torch_adam = Adam(net, lr=1e-2), torch.optim.Adam(model.parameters(), lr=1e-2)
    # Equal at step 0, and still after a few Adam steps on the batches mnn-train would draw.
    for step in range(3):
        x, y, _ = drawn_windows(text, sizes, SingleProcessCommunicator(), step=step)
        mnn_loss, torch_loss = train_both((net, mnn_adam), (model, torch_adam), x, y)
        assert mnn_loss == pytest.approx(torch_loss, rel=1e-5), f"step {step}"


def test_a_float64_gpt_has_a_float64_twin(text_file):
    torch = pytest.importorskip("torch")
    from mnn.distributed.comm import SingleProcessCommunicator
    from mnn.distributed.experiments.gpt_bench import drawn_windows, torch_gpt

    sizes, text, net = tiny_gpt(text_file)
    net.astype(np.float64)
    x, y, _ = drawn_windows(text, sizes, SingleProcessCommunicator())
    model = torch_gpt(net)
    assert model.head.weight.dtype == torch.float64
    assert float(net(x, y)) == pytest.approx(model(torch.from_numpy(x), torch.from_numpy(y)).item(), rel=1e-12)


def test_only_a_gpt_without_dropout_has_a_pytorch_twin():
    pytest.importorskip("torch")
    from mnn.distributed.experiments.gpt_bench import torch_gpt
    from mnn.model import build_net, gpt_description

    with pytest.raises(ValueError, match="gpt_description without dropout"):
        torch_gpt(build_net(gpt_description(20, n_layers=1, d_model=8, n_heads=2, context=4, dropout=0.1)))
    with pytest.raises(ValueError, match="gpt_description without dropout"):
        torch_gpt(build_net({"layers": [{"type": "LinearLayer", "shape": [4, 2]}]}))


def test_quality_runs_track_each_other_and_write_their_outputs(text_file, tmp_path):
    pytest.importorskip("torch")
    from mnn.distributed.experiments.gpt_quality import QualityRun, compare
    from mnn.distributed.experiments.gpt_bench import GptSizes

    run = QualityRun(sizes=GptSizes(batch=4, context=8, d_model=16, n_heads=2, n_layers=1), steps=6,
                     log_every=2, eval_every=3, text=str(text_file))
    summary = compare(run, tmp_path / "out", log=lambda line: None)
    untrained = summary["untrained_validation_bits_per_char"]
    assert untrained["mnn"] == pytest.approx(untrained["torch"], rel=1e-6)
    assert abs(summary["relative_difference"]) < 1e-3
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"curves.csv", "quality.json", "report.md"} <= files
    rows = (tmp_path / "out" / "curves.csv").read_text().splitlines()
    # a header, then per implementation 3 training losses (steps 2, 4, 6) and 3 evaluations (0, 3, 6)
    assert rows[0] == "impl,series,step,loss,bits_per_char" and len(rows) == 1 + 2 * (3 + 3)


def test_the_example_job_trains_the_benchmarked_gpt():
    from mnn.distributed.training.config import resolve_config
    from mnn.distributed.experiments.gpt_bench import GptSizes

    config = resolve_config(Path(__file__).resolve().parents[1] / "examples" / "gpt.toml")
    sizes = GptSizes()
    assert config.dataset == "text" and config.optimizer == "adam"
    assert {**config.model["gpt"], "vocab": 1} == sizes.model(1)["gpt"]
    assert config.batch_size == 2 * sizes.batch  # the benchmark's windows per rank, on 2 ranks


def test_waiting_for_idle_cpus_returns_or_gives_up():
    from mnn.distributed.experiments.bench import wait_for_idle_cpus

    assert wait_for_idle_cpus(min_idle=0.0, timeout_s=5, sample_s=0.05) is (Path("/proc/stat").exists())
    assert wait_for_idle_cpus(min_idle=1.01, timeout_s=0.2, sample_s=0.05) is False


# ------------------------------------------------------------------ --model cnn
TINY_CNN = ["--model", "cnn", "--batch", "4", "--rounds", "1", "--target-ms", "5"]


def test_cnn_one_process_prints_well_formed_lines_and_its_profile():
    records = run_bench([*TINY_CNN, "--no-torch", "--profile"])
    assert records[0]["model"] == "cnn"
    [mnn] = measurements(records, "mnn")
    assert BASE_KEYS | {"ms_min", "ms_max", "round_ms"} <= set(mnn)
    assert mnn["ranks"] == 1 and mnn["batch_per_rank"] == 4 and len(mnn["round_ms"]) == 1
    parts = {record["layer"]: record for record in records if record.get("profile") == "mnn"}
    assert {"Conv2DLayer", "BatchNormLayer", "ReluLayer", "MaxPool2DLayer", "LinearLayer", "CrossEntropyLossLayer",
            "SGD update", "Conv2DLayer GEMMs", "Conv2DLayer im2col/col2im"} <= set(parts)
    for part in parts.values():
        assert part["ms"] == pytest.approx(part["forward_ms"] + part["backward_ms"], abs=2e-3)
    whole = [part["share"] for name, part in parts.items() if not name.startswith("Conv2DLayer ")]
    assert sum(whole) == pytest.approx(1, abs=0.01)
    assert not measurements(records, "torch")


def test_cnn_beside_pytorch_when_installed():
    pytest.importorskip("torch")
    records = run_bench(TINY_CNN)
    assert measurements(records, "torch")
    [compare] = [record for record in records if "compare" in record]
    assert compare["model"] == "cnn" and compare["throughput_ratio"] > 0


def test_profile_needs_the_cnn():
    result = subprocess.run([sys.executable, "-m", "mnn.scripts.bench", "--profile"], capture_output=True, text=True)
    assert result.returncode == 2 and "--model cnn" in result.stderr


def test_pytorch_copy_of_the_cnn_gives_the_same_losses_and_running_statistics():
    torch = pytest.importorskip("torch")
    from mnn import SGD
    from mnn.distributed.experiments.cnn_bench import build_cnn, random_images, torch_cnn

    net = build_cnn(seed=3)
    model = torch_cnn(net)
    mnn_sgd = SGD(net, lr=0.05, momentum=0.9)
    torch_sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Equal at step 0, and still after a few momentum steps on other batches.
    for step in range(3):
        x, y = random_images(6, rank=step)
        mnn_loss, torch_loss = train_both((net, mnn_sgd), (model, torch_sgd), x, y)
        assert mnn_loss == pytest.approx(torch_loss, rel=1e-4), f"step {step}"
    norms = [layer for layer in net.layers if layer.name == "BatchNormLayer"]
    torch_norms = [module for module in model.layers if isinstance(module, torch.nn.BatchNorm2d)]
    for norm, torch_norm in zip(norms, torch_norms, strict=True):
        np.testing.assert_allclose(norm.buffers["running_mean"], torch_norm.running_mean.numpy(), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(norm.buffers["running_var"], torch_norm.running_var.numpy(), rtol=1e-4)


def test_the_example_job_trains_the_benchmarked_cnn():
    from mnn.distributed.training.config import resolve_config
    from mnn.distributed.experiments.cnn_bench import cnn_description

    example = Path(__file__).resolve().parents[1] / "examples" / "fashion_cnn.toml"
    assert resolve_config(example).model == cnn_description(dropout=0.25)


# ------------------------------------------------------------------ the measurement kit
def test_the_timed_loop_warms_up_probes_and_keeps_the_count_within_bounds():
    from mnn.distributed.comm import SingleProcessCommunicator
    from mnn.distributed.experiments.timing import Spread, agree_on_count, time_calls

    comm, calls = SingleProcessCommunicator(), []
    count = agree_on_count(lambda: calls.append(1), comm, target_s=10.0, minimum=5, maximum=40, warmup=2, probe=3)
    assert count == 40 and len(calls) == 2 + 3  # a call of microseconds would fill 10 s many times over
    assert agree_on_count(lambda: None, comm, target_s=0.0, minimum=5) == 5
    for each in (False, True):
        assert time_calls(lambda: calls.append(1), 4, comm, each_after_barrier=each) >= 0
    assert len(calls) == 5 + 8
    spread = Spread.of([3.0, 1.0, 2.0])
    assert spread == (2.0, 1.0, 3.0) and spread.fields("ms") == {"ms": 2.0, "ms_min": 1.0, "ms_max": 3.0}


def test_one_step_builder_runs_plainly_or_through_data_parallel():
    from mnn import SGD
    from mnn.distributed.comm import SingleProcessCommunicator
    from mnn.distributed.experiments.bench import build_step
    from mnn.model import build_net, mlp_description

    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 6)), rng.integers(0, 3, 4)) for _ in range(2)]
    nets = [build_net(mlp_description([6, 5, 3]), dtype=np.float64, rng=0) for _ in range(2)]
    plain, none = build_step(nets[0], SGD(nets[0], lr=0.1), batches, 4, SingleProcessCommunicator())
    parallel, data_parallel = build_step(nets[1], SGD(nets[1], lr=0.1), batches, 4, SingleProcessCommunicator(),
                                         parallel=True)
    assert none is None and data_parallel is not None
    for _ in range(3):  # both cycle through the batches: 1, 2, 1
        plain()
        parallel()
    for (name, param, _), (_, other, _) in zip(nets[0].named_params(), nets[1].named_params()):
        np.testing.assert_allclose(param, other, rtol=1e-12, err_msg=name)
    assert data_parallel.timings["steps"] == 3


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
def test_restarts_report_what_each_failure_cost_and_what_the_checkpoints_cost():
    records = run_bench(["--model", "mlp", "--restarts", "2", "--gap", "100", "--checkpoint-steps", "10",
                         "--rounds", "1"])
    failures = [record for record in records if "restart" in record]
    assert [record["restart"] for record in failures] == [1, 2]
    for record in failures:
        assert 0 <= record["redo_steps"] < 2 * 10 and record["detect_s"] >= 0 and record["restart_s"] > 0
        assert record["lost_s"] == pytest.approx(record["detect_s"] + record["restart_s"] + record["redo_s"], abs=2e-3)
    cost, = [record for record in records if "ratio" in record]
    assert cost["checkpoint_every_steps"] == 10 and cost["step_ms_with"] > 0 and cost["step_ms_without"] > 0
