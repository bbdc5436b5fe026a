"""Train a net of your own on arrays of your own, data-parallel: mnn's Python API.

    mnn-launch -n 2 -- python examples/custom_net.py       # on 2 ranks
    python examples/custom_net.py --epochs 3               # one process, without MPI

Every rank runs this same script. It builds the same net (the same seeds) and
the same arrays; train() gives each rank its shard of every global batch,
averages the gradients and writes checkpoints, metrics.jsonl and the summary
from rank 0, as mnn-train does. Integer labels are classes (accuracy is
reported); floating-point targets are regression (the loss is the metric).
The arrays are used as they are: scale them yourself.
"""
import argparse

import numpy as np
from sklearn.datasets import load_digits

from mnn import (
    CrossEntropyLossLayer,
    LinearLayer,
    MultiHeadAttention,
    ReluLayer,
    ReshapeLayer,
    Residual,
    SequentialLayers,
)
from mnn.distributed.training import TrainConfig, train


def digits_as_sequences():
    """The 8x8 digits as sequences of 8 rows of 8 pixels in [0, 1]; every fifth image is a test image."""
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    test = np.arange(len(labels)) % 5 == 4
    return images[~test], labels[~test], images[test], labels[test]


def attention_net(seed=0):
    """Self-attention over the rows, then an MLP with a residual block."""
    rng = np.random.default_rng(seed)
    return SequentialLayers([
        Residual([MultiHeadAttention(d_model=8, n_heads=2, rng=rng)]),
        ReshapeLayer(64),
        LinearLayer(64, 64, rng=rng), ReluLayer(),
        Residual([LinearLayer(64, 64, rng=rng), ReluLayer()]),
        LinearLayer(64, 10, rng=rng),
        CrossEntropyLossLayer(),
    ])


def main():
    parser = argparse.ArgumentParser(description="Train an attention net on the digits with mnn's Python API.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--output", default="runs/custom-net", help="where checkpoints and metrics go")
    args = parser.parse_args()
    config = TrainConfig(epochs=args.epochs, batch_size=64, optimizer="adam", lr=3e-3, output=args.output)
    train(config, net=attention_net(), data=digits_as_sequences())


if __name__ == "__main__":
    main()
