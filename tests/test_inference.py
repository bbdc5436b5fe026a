"""Evaluation is inference: a forward in evaluation mode gives what a training forward gives
(dropout aside), keeps nothing for backward, and a backward after it says so."""

import numpy as np
import pytest

from mnn import (CrossEntropyLossLayer, DropoutLayer, EmbeddingLayer, GeluLayer, LayerNormLayer, LinearLayer,
                 LogLayer, LogSoftmaxLayer, MatrixProduct, MSELossLayer, MultiHeadAttention, NllLossLayer,
                 PositionalEmbeddingLayer, ReluLayer, ReshapeLayer, Residual, SequentialLayers, SoftmaxLayer)
from mnn.layer import Layer
from mnn.model import build_net, gpt_description

F64 = np.float64
RNG = np.random.default_rng(0)
FEATURES = RNG.standard_normal((4, 6))
SEQUENCE = RNG.standard_normal((2, 5, 8))
LABELS = np.array([0, 5, 2, 3])

# (layer, inputs, feedbacks): every layer type, in float64.
CASES = {
    "linear": (LinearLayer(6, 3, dtype=F64, rng=0), FEATURES, None),
    "linear-sequence": (LinearLayer(8, 3, dtype=F64, rng=0), SEQUENCE, None),
    "relu": (ReluLayer(dtype=F64), FEATURES, None),
    "log": (LogLayer(dtype=F64), np.abs(FEATURES) + 0.1, None),
    "gelu": (GeluLayer(dtype=F64), SEQUENCE, None),
    "softmax": (SoftmaxLayer(dtype=F64), FEATURES, None),
    "log-softmax": (LogSoftmaxLayer(dtype=F64), FEATURES, None),
    "layer-norm": (LayerNormLayer(8, dtype=F64), SEQUENCE, None),
    "reshape": (ReshapeLayer(3, 2, dtype=F64), FEATURES, None),
    "dropout-0": (DropoutLayer(0.0, seed=1, dtype=F64), FEATURES, None),
    "embedding": (EmbeddingLayer(7, 4, dtype=F64, rng=0), np.array([[1, 6, 0], [2, 2, 5]]), None),
    "positions": (PositionalEmbeddingLayer(6, 8, dtype=F64, rng=0), SEQUENCE, None),
    "attention": (MultiHeadAttention(8, 2, causal=True, dtype=F64, rng=0), SEQUENCE, None),
    "matrix-product": (MatrixProduct(dtype=F64), (SEQUENCE, SEQUENCE.transpose(0, 2, 1)), None),
    "residual": (Residual([LayerNormLayer(8, dtype=F64), GeluLayer(dtype=F64)]), SEQUENCE, None),
    "cross-entropy": (CrossEntropyLossLayer(dtype=F64), FEATURES, LABELS),
    "cross-entropy-sequence": (CrossEntropyLossLayer(dtype=F64), SEQUENCE, np.arange(10).reshape(2, 5) % 8),
    "nll": (NllLossLayer(dtype=F64), FEATURES, LABELS),
    "mse": (MSELossLayer(dtype=F64), FEATURES, FEATURES[::-1]),
}


def arrays_held(layer, where="net"):
    """Where ``layer`` (and every layer inside it, at any depth) holds an array outside
    its parameters, gradients and buffers: what a forward kept for backward."""
    found = []
    for name, value in vars(layer).items():
        if name in ("params", "grads", "buffers"):
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, Layer):
                found += arrays_held(item, f"{where}.{name}")
            elif isinstance(item, np.ndarray):
                found.append(f"{where}.{name}")
    return found


def backward_of(layer, outputs):
    """A backward of ``layer`` after a forward that gave ``outputs``."""
    if np.ndim(outputs) == 0:
        return layer.backward()
    return layer.backward(np.ones_like(outputs))


@pytest.mark.parametrize("case", CASES)
def test_a_forward_in_evaluation_gives_the_training_output_and_keeps_nothing(case):
    layer, inputs, feedbacks = CASES[case]
    trained = layer.forward(inputs, feedbacks)
    backward_of(layer, trained)  # a training forward keeps what backward needs
    layer.set_training(False)
    evaluated = layer.forward(inputs, feedbacks)
    np.testing.assert_array_equal(evaluated, trained)
    assert arrays_held(layer) == []
    with pytest.raises(ValueError, match=f"{layer.name}: backward called after a forward in evaluation mode, "
                                         f"which keeps nothing for backward; call set_training\\(True\\)"):
        backward_of(layer, evaluated)
    layer.set_training(True)
    # The training forward before evaluation is gone: backward needs a new one.
    with pytest.raises(ValueError, match="backward called before forward \\(a forward in evaluation mode"):
        backward_of(layer, evaluated)
    np.testing.assert_array_equal(layer.forward(inputs, feedbacks), trained)
    backward_of(layer, trained)


def gpt(dropout=0.0):
    return build_net(gpt_description(vocab=11, n_layers=2, d_model=16, n_heads=2, context=8, dropout=dropout),
                     dtype=F64, rng=0)


IDS = np.arange(24).reshape(3, 8) % 11
NEXT = (IDS + 1) % 11


def test_a_gpt_evaluates_as_it_trains_without_dropout_and_keeps_nothing():
    net = gpt()
    trained_logits, trained_loss = net(IDS), net(IDS, NEXT)
    with net.evaluating():
        np.testing.assert_array_equal(net(IDS), trained_logits)
        assert net(IDS, NEXT) == trained_loss
        assert arrays_held(net) == []
        with pytest.raises(ValueError, match="CrossEntropyLossLayer: backward called after a forward in "
                                             "evaluation mode"):
            net.backward()


def test_training_after_evaluation_matches_training_alone():
    evaluated, plain = gpt(dropout=0.1), gpt(dropout=0.1)
    with evaluated.evaluating():
        evaluated(IDS, NEXT)
    for net in (evaluated, plain):
        net.start_batch(0, 0)
        net(IDS, NEXT)
        net.backward()
    for (name, _, grad), (_, _, other) in zip(evaluated.named_params(), plain.named_params()):
        np.testing.assert_array_equal(grad, other, err_msg=name)


def test_an_mlp_evaluates_as_it_trains_and_keeps_nothing():
    net = SequentialLayers([LinearLayer(6, 5, dtype=F64, rng=0), ReluLayer(dtype=F64),
                            LinearLayer(5, 6, dtype=F64, rng=1), CrossEntropyLossLayer(dtype=F64)])
    loss = net(FEATURES, LABELS)
    with net.evaluating():
        assert net(FEATURES, LABELS) == loss
        assert arrays_held(net) == []
    net(FEATURES, LABELS)
    net.backward()
