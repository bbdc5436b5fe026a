"""mnn-train end to end: real processes under ``mpiexec -n 2``, real files on disk."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mnn.distributed.comm import RankFailure
from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.training.config import TrainConfig, resolve_config
from mnn.io import load_arrays
from mnn.scripts.train import main
from processes import ENV, LAUNCH, MPIEXEC, TRAIN, exit_status, mpiexec_family, needs_mpiexec, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "digits.toml"
SUMMARY_KEYS = {"world_size", "epochs", "steps", "train_loss", "test_accuracy", "samples_per_s",
                "wall_s"}

@pytest.fixture(name="two_rank_run", scope="module")
def two_rank_run_fixture(tmp_path_factory):
    """One 2-rank training run on digits, from a job file plus command-line overrides."""
    folder = tmp_path_factory.mktemp("cli")
    job = folder / "job.toml"
    job.write_text('layers = [64, 128, 10]\noptimizer = "momentum"\nepochs = 9\nlr = 0.1\n')
    output = folder / "out"
    result = run(["--config", str(job), "--epochs", "4", "--log-every", "10",
                  "--output", str(output)], ranks=2)
    return result, output, job


@needs_mpiexec
@pytest.mark.slow
def test_two_ranks_learn_digits_and_write_every_output(two_rank_run):
    result, output, _ = two_rank_run
    assert result.returncode == 0, result.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == 2 and summary["epochs"] == 4
    assert summary["test_accuracy"] >= 0.95
    assert summary["steps"] == 4 * 23  # ceil(1438 / 64) steps per epoch

    # Rank 0 alone prints: one summary line, giving accuracy, rate, time and ranks.
    done = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1
    assert "test accuracy" in done[0] and "samples/s" in done[0] and "2 ranks" in done[0]

    events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds.count("eval") == 4 and kinds[-1] == "summary" and "train" in kinds
    # One convention: `epoch` is the 1-based epoch trained in, in every event.
    assert {event["epoch"] for event in events if event["event"] == "train"} == {1, 2, 3, 4}
    assert [(event["epoch"], event["epochs_done"]) for event in events
            if event["event"] == "eval"] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if "test loss" in line] == [
        "epoch 1/4", "epoch 2/4", "epoch 3/4", "epoch 4/4"]

    model = load_arrays(output / "model.npz")
    assert model["0.LinearLayer.w"].shape == (128, 64)
    checkpoint = load_checkpoint(output / "checkpoint.npz")
    assert (checkpoint.position.epochs_done, checkpoint.position.step_in_epoch, checkpoint.world_size) == (4, 0, 2)
    for key, value in model.items():
        np.testing.assert_array_equal(checkpoint.model_state[key], value)


@needs_mpiexec
@pytest.mark.slow
def test_written_config_is_the_resolved_job(two_rank_run):
    result, output, job = two_rank_run
    assert result.returncode == 0, result.stderr
    written = resolve_config(output / "config.toml")
    assert written.epochs == 4                      # command line over the file
    assert written.optimizer == "momentum"          # the file over the default
    assert written == resolve_config(job, {"epochs": 4, "log_every": 10, "output": str(output)})


@needs_mpiexec
@pytest.mark.slow
def test_unwritable_output_fails_before_training(tmp_path):
    # Below a regular file no directory can be made, even by root.
    (tmp_path / "file").write_text("")
    result = run(["--layers", "64,16,10", "--output", str(tmp_path / "file" / "run")], ranks=2)
    assert result.returncode == 2
    assert "is not writable" in result.stderr
    assert result.stderr.count("mnn-train: error") == 1      # printed by rank 0 only
    assert "epoch" not in result.stdout                      # no step was trained


@needs_mpiexec
@pytest.mark.slow
def test_layers_not_matching_the_dataset_fail_cleanly_on_two_ranks():
    result = run(["--layers", "784,10"], ranks=2)
    assert result.returncode == 2
    assert "64 features" in result.stderr and "layers[0] = 784" in result.stderr


def test_single_process_without_mpi4py_gives_the_same_summary(tmp_path):
    # mpi4py made unimportable: the run must fall back to one process by itself.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mpi4py"] = None
        from mnn.scripts.train import main
        code = main(["--layers", "64,32,10", "--epochs", "1", "--output", {str(tmp_path)!r}])
        assert sys.modules["mpi4py"] is None
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == 1 and summary["steps"] == 23


@pytest.mark.slow
def test_single_process_summary_has_the_shape_of_the_mpi_one(tmp_path, two_rank_run):
    result = run(["--layers", "64,32,10", "--epochs", "1", "--output", str(tmp_path)],
                 MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    alone = json.loads((tmp_path / "summary.json").read_text())
    if not two_rank_run[0].returncode == 0:
        pytest.skip("the 2-rank run failed (reported by another test)")
    distributed = json.loads((two_rank_run[1] / "summary.json").read_text())
    assert alone.keys() == distributed.keys()
    assert alone["timings"].keys() == distributed["timings"].keys()


@pytest.mark.without_mpi
def test_output_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run(["--epochs", "1", "--output", str(tmp_path / "afile")], MNN_NO_MPI="1")
    assert result.returncode == 2
    assert "is a file, not a directory" in result.stderr and "Errno" not in result.stderr


@needs_mpiexec
def test_no_mpi_under_mpiexec_is_a_configuration_error():
    # Each rank is a world of its own there, so each one says it; nothing trains.
    result = run(["--epochs", "1"], ranks=2, MNN_NO_MPI="1")
    assert result.returncode == 2, result.stderr
    # Open MPI's mpiexec stops the other rank as soon as one exits non-zero, sometimes before it printed.
    expected = (1, 2) if mpiexec_family() == "openmpi" else (2,)
    assert result.stderr.count("mnn-train: error: the launcher started 2 ranks but MNN_NO_MPI=1") in expected
    assert "unset MNN_NO_MPI" in result.stderr and "epoch" not in result.stdout


@pytest.mark.parametrize("option", ["--lr=nan", "--lr=inf", "--weight-decay=nan", "--momentum=-inf"])
def test_non_finite_numbers_are_configuration_errors(option, capsys):
    assert exit_status(main, [option]) == 2
    assert "expected a finite number" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.without_mpi
def test_example_job_trains_afresh_each_time_and_learns_digits(tmp_path):
    # The example's own output must not be the one `make train` writes (runs/digits),
    # and running it twice must train twice, not "resume" a finished run.
    example = resolve_config(EXAMPLE)
    assert example.resume is False and example.output == "runs/digits-example"
    assert "--resume" in EXAMPLE.read_text()
    for _ in range(2):
        result = run(["--config", str(EXAMPLE), "--output", str(tmp_path)], MNN_NO_MPI="1")
        assert result.returncode == 0, result.stderr
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["resumed_from"] is None and summary["steps"] == 10 * 23
        assert summary["test_accuracy"] >= 0.97


@pytest.mark.slow
@pytest.mark.without_mpi
def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path):
    assert run(["--epochs", "2", "--output", str(tmp_path)], MNN_NO_MPI="1").returncode == 0
    result = run(["--epochs", "2", "--output", str(tmp_path), "--resume"], MNN_NO_MPI="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"checkpoint {tmp_path / 'checkpoint.npz'} is at the end of epoch 2 "
                             f"of 2: nothing left to train; raise --epochs to train further\n")


@pytest.mark.without_mpi
def test_partial_last_epoch_is_labelled_as_such(tmp_path):
    # 23 steps per epoch: 30 steps are epoch 1 and 7 steps of epoch 2.
    result = run(["--epochs", "2", "--max-steps", "30", "--output", str(tmp_path)],
                 MNN_NO_MPI="1", MNN_PROGRESS="lines")
    assert result.returncode == 0, result.stderr
    evaluations = [line.split(" |")[0] for line in result.stdout.splitlines() if "test loss" in line]
    assert evaluations == ["epoch 1/2", "epoch 2/2 (partial, step 7/23)"]


@pytest.mark.without_mpi
def test_ctrl_c_exits_130_with_one_line_and_no_traceback(tmp_path):
    # SIGINT as the default action (a shell may start background jobs ignoring it).
    process = subprocess.Popen(
        TRAIN + ["--epochs", "100000", "--output", str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**ENV, "MNN_NO_MPI": "1", "MNN_PROGRESS": "lines"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stdout:  # training has started once a step is logged
            if line.startswith("epoch 2/"):
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = stderr.splitlines()
    # "at epoch 2/100000 step 14/23", or "at the end of epoch 2/100000" when the stop lands on
    # an epoch's last step (a loaded machine: seen in a fresh-clone .ci/run)
    assert len(lines) == 1 and lines[0].startswith(("mnn-train: interrupted at epoch ",
                                                    "mnn-train: interrupted at the end of epoch ")), stderr
    assert lines[0].endswith(f"; checkpoint saved to {tmp_path / 'checkpoint.npz'}; continue with --resume")
    position = load_checkpoint(tmp_path / "checkpoint.npz").position
    assert position.epochs_done >= 1  # the stop came after a step of epoch 2


def interrupt_after_first_log_line(command, signum, env):
    """Run ``command``, send ``signum`` to it once a training line is printed;
    return (exit status, stdout, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        out = []
        for line in process.stdout:
            out.append(line)
            if " step " in line and "| loss " in line:
                break
        process.send_signal(signum)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, "".join(out) + rest, stderr


def launched(launcher, ranks, command):
    """``command`` on ``ranks`` ranks under plain mpiexec or under mnn-launch."""
    if launcher == "mpiexec":
        return [str(MPIEXEC), "-n", str(ranks), *command]
    return [*LAUNCH, "-n", str(ranks), "--", *command]


def assert_interrupt_line(stderr, output, position, epochs):
    """One line from mnn-train on stderr, naming where it stopped and the checkpoint to resume from."""
    assert "Traceback" not in stderr and "BAD TERMINATION" not in stderr
    assert "exited with non-zero status" not in stderr and "PMIX ERROR" not in stderr  # prterun's, dropped
    assert "[warn] Epoll" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("mnn-train:")]
    assert len(lines) == 1, stderr
    steps_per_epoch = -(-1438 // 64)
    # The checkpoint counts epochs done; the line names the epoch trained in.
    epoch, step = (position.epochs_done + 1, position.step_in_epoch) if position.step_in_epoch \
        else (position.epochs_done, steps_per_epoch)
    expected = (f"mnn-train: interrupted at epoch {epoch}/{epochs} step {step}/{steps_per_epoch}"
                if step < steps_per_epoch else f"mnn-train: interrupted at the end of epoch {epoch}/{epochs}")
    assert lines[0].startswith(expected), (lines[0], position)
    assert lines[0].endswith(f"; checkpoint saved to {output / 'checkpoint.npz'}; continue with --resume")


# The signal tests' job: long enough that a signal after the first training line lands mid-run.
SIGNAL_EPOCHS = 15
SIGNAL_JOB = ["--epochs", str(SIGNAL_EPOCHS), "--log-every", "5", "--batch-size", "64"]


@pytest.fixture(name="uninterrupted_model", scope="module")
def uninterrupted_model_fixture(tmp_path_factory):
    """``uninterrupted_model(ranks)``: the weights of SIGNAL_JOB trained on ``ranks`` ranks without a
    stop, which every interrupted and resumed run must end with. Trained once per rank count (the
    launcher does not change the weights), not once per signal and launcher."""
    models = {}

    def uninterrupted_model(ranks):
        if ranks not in models:
            output = tmp_path_factory.mktemp(f"uninterrupted-{ranks}-ranks")
            full = subprocess.run(launched("mnn-launch", ranks, [*TRAIN, *SIGNAL_JOB, "--output", str(output)]),
                                  capture_output=True, text=True, timeout=120, env=ENV)
            assert full.returncode == 0, full.stderr
            models[ranks] = load_arrays(output / "model.npz")
        return models[ranks]
    return uninterrupted_model


@needs_mpiexec
@pytest.mark.slow
@pytest.mark.parametrize("launcher, ranks", [("mpiexec", 2), ("mnn-launch", 2), ("mnn-launch", 3)])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_stops_all_ranks_at_one_step_and_resume_is_exact(tmp_path, signum, launcher, ranks,
                                                                                 uninterrupted_model):
    """MPICH's mpiexec forwards SIGINT and SIGTERM to every rank and waits for them; under Open MPI,
    mnn-launch hands them to the ranks itself (plain mpiexec: see the next test)."""
    if launcher == "mpiexec" and mpiexec_family() == "openmpi":
        pytest.skip("Open MPI's mpiexec aborts the job instead: test_open_mpi_mpiexec_aborts_on_a_signal")
    interrupted = tmp_path / "interrupted"
    status, stdout, stderr = interrupt_after_first_log_line(
        launched(launcher, ranks, [*TRAIN, *SIGNAL_JOB, "--output", str(interrupted)]), signum, ENV)

    assert status == 130, stderr
    assert "BAD TERMINATION" not in stdout
    position = load_checkpoint(interrupted / "checkpoint.npz").position
    assert_interrupt_line(stderr, interrupted, position, epochs=SIGNAL_EPOCHS)
    assert 5 <= position.global_step < SIGNAL_EPOCHS * -(-1438 // 64)
    assert not (interrupted / "model.npz").exists()

    resumed = subprocess.run(launched(launcher, ranks, [*TRAIN, *SIGNAL_JOB, "--output", str(interrupted),
                                                        "--resume"]),
                             capture_output=True, text=True, timeout=120, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {interrupted / 'checkpoint.npz'}" in resumed.stdout
    got, expected_model = load_arrays(interrupted / "model.npz"), uninterrupted_model(ranks)
    assert got.keys() == expected_model.keys()
    for key in expected_model:
        assert got[key].tobytes() == expected_model[key].tobytes(), key


@needs_mpiexec
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_open_mpi_mpiexec_aborts_on_a_signal(tmp_path, signum):
    """What plain ``mpiexec`` of Open MPI (prterun) does with SIGINT or SIGTERM, as the README says:
    it aborts the job (the ranks get SIGCONT, SIGTERM about 0.25 s later, then SIGKILL), drops
    their last output, mnn-train's line included, and exits 1. mnn-launch does not (test above)."""
    if mpiexec_family() != "openmpi":
        pytest.skip("Open MPI's mpiexec only")
    job = ["--epochs", "30", "--log-every", "5", "--output", str(tmp_path)]
    status, _, stderr = interrupt_after_first_log_line(
        launched("mpiexec", 2, [*TRAIN, *job]), signum, {**ENV, "MNN_PROGRESS": "lines"})
    assert status == 1, stderr
    assert "mnn-train: interrupted" not in stderr


@needs_mpiexec
@pytest.mark.slow
def test_ctrl_c_in_a_terminal_under_mnn_launch_exits_130_with_one_line(tmp_path):
    """The user's way: mnn-launch in a terminal, Ctrl-C. The terminal signals mnn-launch's process
    group; whatever the MPI, every rank stops after the same step and mnn-train says so once."""
    pty = pytest.importorskip("pty")
    import select
    import time
    argv = [*LAUNCH, "-n", "2", "--", *TRAIN, "--epochs", "300", "--log-every", "5", "--output", str(tmp_path)]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own with the pseudo-terminal as its terminal
        try:
            os.execve(argv[0], argv, {**ENV, "MNN_PROGRESS": "lines"})
        finally:
            os._exit(127)
    output, sent, status = b"", False, None
    try:
        deadline = time.monotonic() + 120
        while status is None and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    output += os.read(terminal, 4096)  # keep draining, so nobody blocks on a full terminal
                except OSError:  # every writer has closed the terminal
                    time.sleep(0.1)
            if not sent and b"| loss " in output:
                os.write(terminal, b"\x03")  # the terminal turns this into SIGINT for the foreground group
                sent = True
            finished, wait_status = os.waitpid(pid, os.WNOHANG)
            if finished:
                status = os.waitstatus_to_exitcode(wait_status)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    # The terminal echoes Ctrl-C as ^C, ahead of what comes next on the line.
    text = output.decode(errors="replace").replace("\r\n", "\n").replace("^C", "")
    assert sent and status == 130, text
    position = load_checkpoint(tmp_path / "checkpoint.npz").position
    assert_interrupt_line(text, tmp_path, position, epochs=300)


def test_usage_and_config_errors_exit_with_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNN_NO_MPI", "1")
    bad_job = tmp_path / "job.toml"
    bad_job.write_text("epochs = 2\nlearning_rate = 0.1\n")
    assert exit_status(main, ["--config", str(bad_job)]) == 2
    stderr = capsys.readouterr().err
    assert "'learning_rate'" in stderr and "valid keys are" in stderr

    assert exit_status(main, ["--optimizer", "rmsprop"]) == 2
    assert "invalid choice" in capsys.readouterr().err

    assert exit_status(main, ["--resume"]) == 2
    assert "output is not set" in capsys.readouterr().err


def test_a_usage_error_is_a_short_usage_line_and_the_error_with_a_suggestion(capsys, monkeypatch):
    monkeypatch.setenv("MNN_NO_MPI", "1")
    assert exit_status(main, ["--batchsize", "32"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: mnn-train [options]  (mnn-train --help lists them)",
        "mnn-train: error: unrecognized arguments: --batchsize 32 (did you mean '--batch-size'?)"]
    # Only a close option is suggested: '--bogus' shares little with any.
    assert exit_status(main, ["--epochs", "1", "--bogus"]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == ["mnn-train: error: unrecognized arguments: --bogus"]
    assert exit_status(main, ["--lr-scale=linear"]) == 2
    assert "(did you mean '--lr-scaling'?)" in capsys.readouterr().err


def test_one_process_tells_its_errors_without_a_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNN_NO_MPI", "1")
    missing = tmp_path / "nonexistent"
    assert exit_status(main, ["--dataset", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"mnn-train: error: dataset {str(missing)!r} does not exist")
    # Several ranks keep naming theirs (test_bad_jobs runs them: "ranks 0, 1: model: ...").
    assert str(RankFailure({0: "bad", 1: "bad"}, world_size=2)) == "ranks 0, 1: bad"
    assert str(RankFailure({0: "bad"}, world_size=1)) == "bad"


def test_a_run_without_output_says_that_it_saved_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNN_NO_MPI", "1")
    monkeypatch.setenv("MNN_PROGRESS", "lines")
    assert exit_status(main, ["--epochs", "1", "--max-steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("done: ") and "nothing saved" not in lines[-2]
    assert lines[-1] == "nothing saved (no --output): add --output DIR to keep the model and checkpoints"

    assert exit_status(main, ["--epochs", "1", "--max-steps", "2", "--output", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("done: ") and not any("nothing saved" in line for line in lines)
    # The summary event is the summary, with no word of it.
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "summary" and SUMMARY_KEYS <= events[-1].keys()
    assert "nothing saved" not in (tmp_path / "metrics.jsonl").read_text()


def test_help_lists_options_and_examples(capsys):
    assert exit_status(main, ["--help"]) == 0
    stdout = capsys.readouterr().out
    for option in ["--layers", "--batch-size", "--lr-scaling", "--warmup-epochs", "--resume",
                   "--checkpoint-every", "--bucket-bytes", "--dtype", "examples:"]:
        assert option in stdout
    # Every setting is an option, but the model description, a table of the job file, and
    # the text the run records.
    assert set(TrainConfig.field_names()) - {"model", "text_fingerprint"} <= {
        word.lstrip("-").replace("-", "_") for word in stdout.split() if word.startswith("--")}
    assert "[[model.layers]]" in stdout


def write_npz(path, labels_max):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((40, 6)), y_train=np.arange(40) % (labels_max + 1),
             x_test=rng.random((10, 6)), y_test=np.arange(10) % (labels_max + 1))
    return path


@needs_mpiexec
@pytest.mark.parametrize("make_file, message", [
    (lambda path: path.write_bytes(b"PK\x03\x04 cut short"), "zip file"),
    (lambda path: write_npz(path, labels_max=12), "include 12, but the model has 10 classes"),
])
def test_bad_dataset_files_fail_cleanly_on_two_ranks(tmp_path, make_file, message):
    data = tmp_path / "data.npz"
    make_file(data)
    result = run(["--dataset", str(data), "--layers", "6,10", "--output", str(tmp_path / "run")],
                 ranks=2)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("mnn-train: error") == 1
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@needs_mpiexec
@pytest.mark.parametrize("progress, bar_expected", [("bar", True), ("lines", False), (None, False)])
@pytest.mark.slow
def test_progress_bar_follows_mnn_progress_under_mpiexec(progress, bar_expected):
    """Under mpiexec a rank's stderr is a pipe: mnn-launch's MNN_PROGRESS=bar asks for the bar."""
    env = {} if progress is None else {"MNN_PROGRESS": progress}
    base = {name: value for name, value in ENV.items() if name != "MNN_PROGRESS"}
    result = subprocess.run([str(MPIEXEC), "-n", "2", *TRAIN, "--epochs", "2", "--log-every", "5"],
                            capture_output=True, text=True, timeout=120, env={**base, **env})
    assert result.returncode == 0, result.stderr
    has_bar = "step/s" in result.stderr or "s/step" in result.stderr
    assert has_bar == bar_expected, result.stderr
    # Evaluation and the summary are there either way, once (rank 0 only).
    assert (result.stdout + result.stderr).count("test accuracy") == 3


@needs_mpiexec
@pytest.mark.slow
def test_described_attention_classifier_trains_on_two_ranks_with_mnn_launch(tmp_path):
    result = subprocess.run(LAUNCH + ["-n", "2", "--"] + TRAIN + [
        "--config", str(EXAMPLES / "attention.toml"), "--epochs", "8", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.9
    assert "[[model.layers]]" in (tmp_path / "config.toml").read_text()
    written = resolve_config(tmp_path / "config.toml")
    assert written.model == resolve_config(EXAMPLES / "attention.toml").model
    assert "1.Residual.0.MultiHeadAttention.w_q" in load_arrays(tmp_path / "model.npz")


@needs_mpiexec
@pytest.mark.slow
def test_python_api_custom_net_trains_on_two_ranks_with_mnn_launch(tmp_path):
    result = subprocess.run(LAUNCH + ["-n", "2", "--", sys.executable, str(EXAMPLES / "custom_net.py"),
                                      "--epochs", "6", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.9
    assert resolve_config(tmp_path / "config.toml").dataset == "arrays"
    assert len([line for line in result.stdout.splitlines() if line.startswith("done:")]) == 1


@needs_mpiexec
@pytest.mark.slow
def test_mistake_in_a_model_description_stops_both_ranks_with_one_message(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text((EXAMPLES / "attention.toml").read_text().replace('shape = [64, 64]', 'shape = [60, 64]'))
    result = run(["--config", str(job), "--output", str(tmp_path / "out")], ranks=2)
    assert result.returncode == 2
    assert result.stderr.count("mnn-train: error") == 1
    assert "layer 3 (LinearLayer) does not fit its input of shape (64,) per sample" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    job.write_text((EXAMPLES / "attention.toml").read_text().replace('n_heads = 2', 'heads = 2'))
    result = run(["--config", str(job)], ranks=2)
    assert result.returncode == 2 and result.stderr.count("mnn-train: error") == 1
    assert "model.layers[1] (Residual).layers[0] (MultiHeadAttention): unknown argument 'heads'" in result.stderr
