"""Any layer stack through train(): model descriptions and a user's own nets and arrays.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_any_net.py`` for
N = 1, 2, 3. Every run on N ranks must end with the parameters one process gets
on the same global batches (float64, up to the order of floating-point sums).
"""
import json

import numpy as np
import pytest
from mpi4py import MPI

from mnn import (
    CrossEntropyLossLayer,
    LinearLayer,
    MSELossLayer,
    MultiHeadAttention,
    ReluLayer,
    ReshapeLayer,
    Residual,
    SequentialLayers,
)
from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.comm import get_communicator
from mnn.distributed.training.config import TrainConfig, load_toml
from mnn.distributed.training.preflight import JobConfigError
from mnn.distributed.training.trainer import train
from mnn.io import load_arrays

# Digits: 1438 training samples in global batches of 100, so uneven shards. SGD
# with momentum, not Adam: attention's key bias has an exactly-zero gradient
# (softmax ignores a shift of every score of a row), and Adam divides its
# rounding noise, ~1e-17, by a noise-sized root mean square, which turns the
# order of the ranks' sums into steps of 1e-11 in that bias.
BASE = dict(batch_size=100, epochs=1, lr=0.05, optimizer="momentum", dtype="float64", log_every=5)

LINEAR_HEAD = [{"type": "LinearLayer", "shape": [64, 32]}, {"type": "ReluLayer"},
               {"type": "LinearLayer", "shape": [32, 10]}]
# Between them these use every layer of the library; MatrixProduct works inside
# MultiHeadAttention (its input is a pair, which no layer before it gives).
DESCRIPTIONS = {
    "attention_classifier": [
        {"type": "ReshapeLayer", "shape": [8, 8]},
        {"type": "Residual", "layers": [{"type": "MultiHeadAttention", "d_model": 8, "n_heads": 2}]},
        {"type": "ReshapeLayer", "shape": [64]},
        *LINEAR_HEAD, {"type": "CrossEntropyLossLayer"}],
    "causal_attention_nested_residuals": [
        {"type": "ReshapeLayer", "shape": [8, 8]},
        {"type": "Residual", "layers": [
            {"type": "MultiHeadAttention", "d_model": 8, "n_heads": 4, "causal": True},
            {"type": "Residual", "layers": [{"type": "LinearLayer", "shape": [8, 8]}, {"type": "ReluLayer"}]}]},
        {"type": "ReshapeLayer", "shape": [64]},
        *LINEAR_HEAD, {"type": "LogSoftmaxLayer"}, {"type": "NllLossLayer"}],
    "softmax_then_log_then_nll": [*LINEAR_HEAD, {"type": "SoftmaxLayer"}, {"type": "LogLayer"},
                                  {"type": "NllLossLayer"}],
    "mse_on_one_hot_labels": [*LINEAR_HEAD, {"type": "MSELossLayer"}],
}


def assert_same_parameters(got, expected, **tolerance):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], err_msg=key, **tolerance)


def on_all_ranks_and_alone(comm, shared_dir, name, **kwargs):
    """Train on every rank of comm and, on each rank, alone; return both summaries and models."""
    make = kwargs.pop("make", lambda: {})
    together = train(TrainConfig(**{**BASE, "output": str(shared_dir / name), **kwargs}), comm, **make())
    alone = train(TrainConfig(**{**BASE, "output": str(shared_dir / f"{name}-alone{comm.rank}"), **kwargs}),
                  get_communicator(MPI.COMM_SELF), **make())
    comm.barrier()
    return (together, load_arrays(shared_dir / name / "model.npz"),
            alone, load_arrays(shared_dir / f"{name}-alone{comm.rank}" / "model.npz"))


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(DESCRIPTIONS))
def test_described_net_trains_the_same_on_any_number_of_ranks(comm, shared_dir, name):
    model = {"layers": DESCRIPTIONS[name]}
    together, got, alone, expected = on_all_ranks_and_alone(comm, shared_dir, name, model=model)
    assert_same_parameters(got, expected, rtol=1e-9, atol=1e-12)
    assert together["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1 / 359)
    assert together["test_accuracy"] > 0.3  # it learns: ten classes (chance 0.1), one epoch
    written = load_toml(shared_dir / name / "config.toml")
    assert written["model"]["layers"][0]["type"] == DESCRIPTIONS[name][0]["type"]


@pytest.mark.mpi
def test_model_description_errors_stop_every_rank_before_training(comm):
    wide = {"layers": [{"type": "LinearLayer", "shape": [64, 32]}, {"type": "ReluLayer"},
                       {"type": "LinearLayer", "shape": [30, 10]}, {"type": "CrossEntropyLossLayer"}]}
    with pytest.raises(JobConfigError, match=r"layer 2 \(LinearLayer\) does not fit its input of shape "
                                             r"\(32,\) per sample: LinearLayer: expected 30 features"):
        train(TrainConfig(**BASE, model=wide), comm)
    narrow = {"layers": [{"type": "LinearLayer", "shape": [64, 5]}, {"type": "CrossEntropyLossLayer"}]}
    with pytest.raises(JobConfigError, match=r"expected labels in \[0, 5\)"):
        train(TrainConfig(**BASE, model=narrow), comm)


# --- a user's own net and arrays, from Python ---------------------------------------

def regression_data():
    """y = (sin x0 + x1 x2, |x3|) + noise: 300 samples to train, 100 to test (float targets)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((400, 4))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1] * x[:, 2], np.abs(x[:, 3])], axis=1) + 0.01 * rng.standard_normal((400, 2))
    return x[:300], y[:300], x[300:], y[300:]


def regression_net():
    rng = np.random.default_rng(3)
    f64 = np.float64
    return SequentialLayers([
        LinearLayer(4, 16, dtype=f64, rng=rng), ReluLayer(dtype=f64),
        Residual([LinearLayer(16, 16, dtype=f64, rng=rng), ReluLayer(dtype=f64)]),
        LinearLayer(16, 2, dtype=f64, rng=rng), MSELossLayer(dtype=f64)])


def sequence_data():
    """Sequences of 6 tokens of 4 features; the class is the sign pattern of two token sums."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((260, 6, 4))
    y = (x[:, :3].sum(axis=(1, 2)) > 0).astype(int) + 2 * (x[:, 3:, 0].sum(axis=1) > 0)
    return x[:200], y[:200], x[200:], y[200:]


def sequence_net():
    f64 = np.float64
    return SequentialLayers([
        Residual([MultiHeadAttention(4, 2, dtype=f64, rng=5)]), ReshapeLayer(24, dtype=f64),
        LinearLayer(24, 4, dtype=f64, rng=6), CrossEntropyLossLayer(dtype=f64)])


@pytest.mark.mpi
@pytest.mark.parametrize("make_net, make_data, accuracy", [
    (regression_net, regression_data, False),
    (sequence_net, sequence_data, True),
], ids=["regression", "sequences"])
def test_own_net_and_arrays_train_the_same_on_any_number_of_ranks(comm, shared_dir, make_net, make_data,
                                                                  accuracy):
    name = make_net.__name__
    together, got, alone, expected = on_all_ranks_and_alone(
        comm, shared_dir, name, batch_size=32, epochs=3, make=lambda: {"net": make_net(), "data": make_data()})
    assert_same_parameters(got, expected, rtol=1e-9, atol=1e-12)
    assert together["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-9)
    assert (together["test_accuracy"] is not None) == accuracy
    written = load_toml(shared_dir / name / "config.toml")
    assert written["dataset"] == "arrays" and written["model"] == make_net().get_config()
    events = [json.loads(line) for line in (shared_dir / name / "metrics.jsonl").read_text().splitlines()]
    evals = [event for event in events if event["event"] == "eval"]
    assert len(evals) == 3 and (evals[-1]["test_accuracy"] is None) == (not accuracy)
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]


@pytest.mark.mpi
def test_own_net_resumes_bitwise_from_its_checkpoint(comm, shared_dir):
    config = dict(BASE, batch_size=32, epochs=2)
    full = train(TrainConfig(**config, output=str(shared_dir / "full")), comm,
                 net=regression_net(), data=regression_data())
    train(TrainConfig(**config, output=str(shared_dir / "part"), max_steps=13), comm,
          net=regression_net(), data=regression_data())
    resumed = train(TrainConfig(**config, output=str(shared_dir / "part"), resume=True), comm,
                    net=regression_net(), data=regression_data())
    comm.barrier()
    assert resumed["resumed_from"] and resumed["steps"] == full["steps"]
    got, expected = load_arrays(shared_dir / "part" / "model.npz"), load_arrays(shared_dir / "full" / "model.npz")
    for key in expected:
        assert got[key].tobytes() == expected[key].tobytes(), key
    checkpoint = load_checkpoint(shared_dir / "part" / "checkpoint.npz")
    assert checkpoint.config["model"] == regression_net().get_config()


@pytest.mark.mpi
def test_own_net_and_arrays_are_checked_before_training(comm):
    with pytest.raises(JobConfigError, match="layers: the job describes an MLP, but a net was given too"):
        train(TrainConfig(**BASE, layers=[4, 2]), comm, net=regression_net(), data=regression_data())
    with pytest.raises(JobConfigError, match="dtype: the net is float64 but the job says float32"):
        train(TrainConfig(**{**BASE, "dtype": "float32"}), comm, net=regression_net(), data=regression_data())
    with pytest.raises(JobConfigError, match="x_train has 300 samples but y_train has 299"):
        x_train, y_train, x_test, y_test = regression_data()
        train(TrainConfig(**BASE), comm, net=regression_net(), data=(x_train, y_train[:-1], x_test, y_test))
    with pytest.raises(JobConfigError, match=r"layer 4 \(MSELossLayer\) does not fit .*targets of shape"):
        x_train, y_train, x_test, y_test = regression_data()
        train(TrainConfig(**BASE), comm, net=regression_net(), data=(x_train, y_train[:, :1], x_test, y_test[:, :1]))
    with pytest.raises(JobConfigError, match="CrossEntropyLossLayer takes class labels, but the targets of "
                                             "arrays are floating-point numbers"):
        x_train, y_train, x_test, y_test = sequence_data()
        train(TrainConfig(**BASE), comm, net=sequence_net(), data=(x_train, y_train * 1.5, x_test, y_test * 1.5))
    with pytest.raises(JobConfigError, match="dataset 'arrays': the run was given its data as arrays"):
        train(TrainConfig(**{**BASE, "dataset": "arrays"}), comm, net=regression_net())
