"""The trainer's pieces on the single-process communicator: position, reporter, stop
requests, task, learning rate and preflight; and train() with a net and arrays of one's own."""
import json
import os
import signal

import numpy as np
import pytest

from mnn import CrossEntropyLossLayer, LinearLayer, MSELossLayer, ReluLayer, SequentialLayers
from mnn.datasets import Dataset, load_dataset
from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.event_file import event_files, tensorboard_installed
from mnn.distributed.training.position import Position
from mnn.distributed.training.preflight import JobConfigError, prepare_job
from mnn.distributed.environment import PROGRESS_ENV
from mnn.distributed.training.reporting import Reporter
from mnn.distributed.training.stopping import StopRequests
from mnn.distributed.training.task import build_job_net, choose_task, evaluate, learning_rate
from mnn.distributed.training.trainer import train

COMM = SingleProcessCommunicator()


# --- Position ---------------------------------------------------------------------

def test_position_advances_by_steps_and_epochs_and_is_told_one_way():
    position = Position()
    assert position.shown(steps_per_epoch=3) == (1, 0)
    for _ in range(3):
        position = position.after_step(global_batch_size=64)
    assert position == Position(epochs_done=0, step_in_epoch=3, global_step=3, samples_seen=192)
    assert position.shown(3) == (1, 3) and position.text(3, epochs=2) == "the end of epoch 1/2"
    position = position.after_epoch()
    assert position == Position(epochs_done=1, step_in_epoch=0, global_step=3, samples_seen=192)
    assert position.shown(3) == (1, 3)  # the end of epoch 1, never epoch 2 step 0
    position = position.after_step(10)
    assert position.text(3, epochs=2) == "epoch 2/2 step 1/3"


# --- Reporter ---------------------------------------------------------------------

@pytest.fixture(name="lines_only")
def lines_only_fixture(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "lines")


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reporter_writes_each_event_as_a_line_and_a_json_object(tmp_path, capsys, lines_only):
    reporter = Reporter(True, tmp_path, epochs=2, steps_per_epoch=4)
    (tmp_path / "metrics.jsonl").write_text('{"event": "old run"}\n')
    reporter.start(Position(), total_steps=8, resumed=False)
    at = Position(0, 2, 2, 128)
    reporter.train(at, loss=0.5, lr=0.1, samples_per_s=1000.0)
    reporter.eval(Position(1, 0, 4, 256), {"loss": 0.25, "accuracy": 0.875, "samples": 8})
    reporter.eval(at, {"loss": 0.5, "accuracy": None, "samples": 8})
    reporter.summary({"world_size": 1, "epochs": 1, "steps": 4, "test_loss": 0.25, "test_accuracy": None,
                      "samples_per_s": 1000.0, "wall_s": 1.0})
    assert capsys.readouterr().out.splitlines() == [
        "epoch 1/2 step 2/4 | loss 0.5000 | lr 0.1 | 1000 samples/s",
        "epoch 1/2 | test loss 0.2500 | test accuracy 0.8750",
        "epoch 1/2 (partial, step 2/4) | test loss 0.5000",
        "done: test loss 0.2500 | 1000 samples/s | wall 1.0 s | 1 rank | 4 steps, 1 epoch done"]
    events = read_events(tmp_path / "metrics.jsonl")  # the old run's line is gone
    assert [event["event"] for event in events] == ["train", "eval", "eval", "summary"]
    assert events[0] == {"event": "train", "epoch": 1, "step_in_epoch": 2, "global_step": 2, "loss": 0.5,
                         "lr": 0.1, "samples_per_s": 1000.0}
    assert events[2]["test_accuracy"] is None and "null" in (tmp_path / "metrics.jsonl").read_text()


def test_reporter_appends_on_resume_and_names_changed_settings(tmp_path, capsys, lines_only):
    (tmp_path / "metrics.jsonl").write_text('{"event": "train"}\n')
    reporter = Reporter(True, tmp_path, epochs=3, steps_per_epoch=5)
    reporter.start(Position(1, 2, 7, 70), total_steps=15, resumed=True)
    reporter.resume("runs/a/checkpoint.npz", Position(1, 2, 7, 70), {"lr": [0.1, 0.2]})
    assert capsys.readouterr().out.splitlines() == [
        "resumed from runs/a/checkpoint.npz at epoch 2/3 step 2/5",
        "settings changed since the checkpoint: lr 0.1 -> 0.2"]
    events = read_events(tmp_path / "metrics.jsonl")
    assert events[1] == {"event": "resume", "checkpoint": "runs/a/checkpoint.npz", "epoch": 2, "step_in_epoch": 2,
                         "epochs_done": 1, "global_step": 7, "changed": {"lr": [0.1, 0.2]}}


def test_reporter_on_other_ranks_says_and_writes_nothing(tmp_path, capsys):
    reporter = Reporter(False, tmp_path, epochs=1, steps_per_epoch=1)
    reporter.start(Position(), total_steps=1, resumed=False)
    reporter.message("hello")
    reporter.train(Position(0, 1, 1, 1), 0.5, 0.1, 1.0)
    assert capsys.readouterr().out == "" and not (tmp_path / "metrics.jsonl").exists()


# --- stop requests -------------------------------------------------------------------

def test_stop_requests_count_signals_and_all_ranks_agree():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as requests:
        assert not requests.vote(COMM).stop
        os.kill(os.getpid(), signal.SIGTERM)   # counted, not raised
        os.kill(os.getpid(), signal.SIGINT)    # the same stop, arriving twice
        assert requests.count == 2 and requests.vote(COMM).stop
        assert requests.vote(COMM, nonfinite=True).nonfinite and not requests.vote(COMM).nonfinite
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_long_after_the_first_stops_at_once():
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGINT)
        requests.first_at -= 2 * StopRequests._REPEAT_AFTER_S  # the first came two seconds ago
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- task and learning rate ----------------------------------------------------------------

def test_task_gives_labels_or_one_hot_rows_and_counts_correct_predictions():
    digits = load_dataset("digits")
    cross_entropy = choose_task(build_job_net(TrainConfig()), digits, "float32")
    mse = choose_task(build_job_net(TrainConfig(loss="mse")), digits, "float64")
    labels = np.array([3, 0])
    assert cross_entropy.targets(labels) is labels and cross_entropy.n_classes == 10
    np.testing.assert_array_equal(mse.targets(labels), np.eye(10)[[3, 0]])
    assert mse.targets(labels).dtype == np.float64
    assert cross_entropy.correct(np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([1, 1])) == 1


def test_evaluation_of_regression_reports_the_loss_and_no_accuracy():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    data = Dataset.from_arrays(x[:6], y[:6], x[6:], y[6:])
    net = SequentialLayers([LinearLayer(3, 2, dtype=np.float64, rng=0), MSELossLayer(dtype=np.float64)])
    metrics = evaluate(net, data.test, choose_task(net, data, "float64"), COMM)
    expected = np.mean((x[6:] @ net.layers[0].params["w"].T - y[6:]) ** 2)
    assert metrics == {"loss": pytest.approx(expected, rel=1e-12), "accuracy": None, "samples": 4}


def test_learning_rate_warms_up_and_scales_with_the_ranks():
    config = TrainConfig(lr=0.1, warmup_epochs=1.0, lr_scaling="linear")
    assert [learning_rate(config, 2, step, steps_per_epoch=4) for step in range(6)] == pytest.approx(
        [0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_learning_rate_decays_along_a_cosine_after_warm_up():
    config = TrainConfig(lr=0.1, epochs=3, warmup_epochs=1.0, lr_decay="cosine")
    rates = [learning_rate(config, 1, step, steps_per_epoch=2) for step in range(7)]
    # Warm-up for 2 steps, then half a cosine over the other 4: 1, cos^2(pi/8), 1/2, cos^2(3 pi/8).
    cosine = [0.1 * np.cos(np.pi * k / 8) ** 2 for k in range(4)]
    assert rates == pytest.approx([0.05, 0.1, *cosine, 0.0], abs=1e-15)
    assert TrainConfig(lr=0.1, epochs=3, lr_decay="none").lr_decay == "none"
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear").validate()


# --- preflight and train() -------------------------------------------------------------

def own_net():
    rng = np.random.default_rng(0)
    return SequentialLayers([LinearLayer(64, 16, rng=rng), ReluLayer(), LinearLayer(16, 10, rng=rng),
                             CrossEntropyLossLayer()])


def digits_arrays():
    digits = load_dataset("digits")
    return digits.train.batch(np.arange(200)) + digits.test.batch(np.arange(100))


def test_preflight_prepares_the_job_it_was_given():
    job = prepare_job(TrainConfig(batch_size=50), COMM, net=own_net(), data=digits_arrays())
    assert job.position == Position() and job.resumed_from is None
    assert job.config.model == own_net().get_config() and job.config.dataset == "arrays"
    assert job.sampler.steps_per_epoch == 4 and job.task.n_classes == 10
    assert len(job.dataset.train) == 200 and job.dataset.train.mean is None  # arrays are used as they are


@pytest.mark.parametrize("config, net, message", [
    (TrainConfig(layers=[64, 10]), own_net, "layers: the job describes an MLP, but a net was given too"),
    (TrainConfig(model={"layers": [{"type": "MSELossLayer"}]}), own_net,
     "model: the job's \\[model\\] describes another net"),
    (TrainConfig(dtype="float64"), own_net, "dtype: the net is float32 but the job says float64"),
    (TrainConfig(dataset="data/mnist"), own_net, "dataset: the job names 'data/mnist', but arrays were given"),
    (TrainConfig(), lambda: [LinearLayer(64, 10)], "net: expected a SequentialLayers, got list"),
])
def test_preflight_refuses_a_job_that_contradicts_its_net_or_data(config, net, message):
    with pytest.raises(JobConfigError, match=message):
        prepare_job(config, COMM, net=net(), data=digits_arrays())


def test_train_with_own_net_and_arrays_writes_every_output_and_resumes(tmp_path, lines_only, capsys):
    config = dict(batch_size=50, epochs=2, optimizer="adam", lr=0.01, output=str(tmp_path))
    first = train(TrainConfig(**config, max_steps=5), COMM, net=own_net(), data=digits_arrays())
    assert first["stopped_early"] and first["steps"] == 5
    resumed = train(TrainConfig(**config, resume=True), COMM, net=own_net(), data=digits_arrays())
    assert resumed["steps"] == 8 and resumed["resumed_from"] == str(tmp_path / "checkpoint.npz")
    assert resumed["test_loss"] < first["test_loss"]
    # Where TensorBoard is installed, each of the two starts writes an event file too (by default).
    events = event_files(tmp_path)
    assert len(events) == (2 if tensorboard_installed() else 0)
    assert sorted(path.name for path in tmp_path.iterdir() if path not in events) == [
        "checkpoint.npz", "config.toml", "metrics.jsonl", "model.npz", "summary.json"]
    assert "resumed from" in capsys.readouterr().out
