"""examples/fashion_cnn.toml end to end: mnn-train on 2 ranks under mnn-launch, on a
small MNIST-format folder made here (the real Fashion-MNIST is `make fashion`'s).

Each class is a bright 7x7 square at its own place on a noisy 28x28 image, which the
example's convolutional net learns in two short epochs. That the ranks train the model
one process trains, BatchNorm's global statistics included, is tests/mpi/test_batchnorm.py's.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mnn.io import load_arrays
from mnn.distributed.training.config import resolve_config
from processes import ENV, LAUNCH, TRAIN, needs_mpiexec
from test_datasets import write_idx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_cnn.toml"
IDX_NAMES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def squares(count, rng):
    """``count`` noisy images, each with its class's bright square, and the classes."""
    labels = rng.integers(0, 10, size=count)
    images = rng.integers(0, 60, size=(count, 28, 28))
    for image, label in zip(images, labels):
        row, column = 7 * (label // 4) + 2, 7 * (label % 4)
        image[row:row + 7, column:column + 7] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_squares(directory, n_train=512, n_test=128, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir()
    arrays = dict(zip(("x_train", "y_train"), squares(n_train, rng))) | dict(
        zip(("x_test", "y_test"), squares(n_test, rng)))
    for key, name in IDX_NAMES.items():
        write_idx(directory / name, arrays[key], 0x00000803 if key.startswith("x") else 0x00000801, gz=True)
    return directory


def test_the_example_describes_a_net_with_global_batch_statistics():
    layers = [layer["type"] for layer in resolve_config(EXAMPLE).model["layers"]]
    assert layers.count("Conv2DLayer") == 2 and layers.count("BatchNormLayer") == 2
    assert layers.count("MaxPool2DLayer") == 2 and layers[-1] == "CrossEntropyLossLayer"


@needs_mpiexec
@pytest.mark.slow
def test_the_fashion_example_trains_on_two_ranks_with_mnn_launch(tmp_path):
    data = write_squares(tmp_path / "squares")
    output = tmp_path / "run"
    result = subprocess.run(LAUNCH + ["-n", "2", "--"] + TRAIN + [
        "--config", str(EXAMPLE), "--dataset", str(data), "--epochs", "2", "--batch-size", "32",
        "--output", str(output)], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.9
    model = load_arrays(output / "model.npz")
    # The running statistics travel with the model, and they moved away from their start.
    assert model["2.BatchNormLayer.running_mean"].shape == (32,)
    assert np.abs(model["6.BatchNormLayer.running_var"] - 1).max() > 1e-3


@needs_mpiexec
@pytest.mark.slow
def test_a_resumed_cnn_run_ends_with_the_model_and_running_statistics_of_an_uninterrupted_one(tmp_path):
    data = write_squares(tmp_path / "squares", n_train=192, n_test=64)
    job = ["--config", str(EXAMPLE), "--dataset", str(data), "--epochs", "2", "--batch-size", "32",
           "--dtype", "float64"]

    def train(output, *more):
        result = subprocess.run(LAUNCH + ["-n", "2", "--"] + TRAIN + job + ["--output", str(output), *more],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert result.returncode == 0, result.stdout + result.stderr

    train(tmp_path / "whole")
    train(tmp_path / "halves", "--max-steps", "7")  # stops inside the second epoch, with a checkpoint
    train(tmp_path / "halves", "--resume")
    assert json.loads((tmp_path / "halves" / "summary.json").read_text())["resumed_from"].endswith("checkpoint.npz")
    whole, halves = load_arrays(tmp_path / "whole" / "model.npz"), load_arrays(tmp_path / "halves" / "model.npz")
    assert sorted(whole) == sorted(halves) and any("running_var" in name for name in whole)
    for name in whole:
        np.testing.assert_array_equal(halves[name], whole[name], err_msg=name)
