"""Every layer's backward against float64 central finite differences, and gradient semantics.

Non-loss layers are differentiated through a random projection of their output
(see ``assert_layer_gradients`` in conftest.py); loss layers as they are.
"""

import numpy as np
import pytest

from mnn import (
    CrossEntropyLossLayer,
    DropoutLayer,
    EmbeddingLayer,
    GeluLayer,
    LayerNormLayer,
    LinearLayer,
    LogLayer,
    LogSoftmaxLayer,
    MatrixProduct,
    MSELossLayer,
    MultiHeadAttention,
    NllLossLayer,
    PositionalEmbeddingLayer,
    ReluLayer,
    SequentialLayers,
    SoftmaxLayer,
)

F64 = np.float64


def away_from_zero(rng, shape):
    """Normal samples pushed at least 0.1 away from ReLU's kink at 0."""
    values = rng.standard_normal(shape)
    return np.sign(values) * (0.1 + np.abs(values))


def labels_for(rng, batch_size, n_classes):
    return rng.integers(0, n_classes, size=batch_size)


# Each case: rng, batch size -> (layer, inputs, targets), with (B, n) inputs.
ROW_CASES = {
    "linear": lambda rng, b: (LinearLayer(5, 3, dtype=F64, rng=rng), rng.standard_normal((b, 5)), None),
    "linear_no_bias": lambda rng, b: (LinearLayer(5, 3, bias=False, dtype=F64, rng=rng),
                                      rng.standard_normal((b, 5)), None),
    "relu": lambda rng, b: (ReluLayer(dtype=F64), away_from_zero(rng, (b, 6)), None),
    "log": lambda rng, b: (LogLayer(dtype=F64), rng.uniform(0.5, 2.0, (b, 6)), None),
    "softmax": lambda rng, b: (SoftmaxLayer(dtype=F64), 2 * rng.standard_normal((b, 5)), None),
    "log_softmax": lambda rng, b: (LogSoftmaxLayer(dtype=F64), 2 * rng.standard_normal((b, 5)), None),
    "mse": lambda rng, b: (MSELossLayer(dtype=F64), rng.standard_normal((b, 4)), rng.standard_normal((b, 4))),
    "nll": lambda rng, b: (NllLossLayer(dtype=F64), rng.standard_normal((b, 5)), labels_for(rng, b, 5)),
    "cross_entropy": lambda rng, b: (CrossEntropyLossLayer(dtype=F64), 2 * rng.standard_normal((b, 5)),
                                     labels_for(rng, b, 5)),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_row_layer_gradients(case, batch_size, columns, assert_layer_gradients):
    rng = np.random.default_rng(batch_size)
    layer, inputs, targets = ROW_CASES[case](rng, batch_size)
    if columns:
        # The seed's per-sample column vectors (B, n, 1); MSE targets come the same way.
        inputs = inputs[:, :, None]
        if case == "mse":
            targets = targets[:, :, None]
    assert_layer_gradients(layer, inputs, targets)


@pytest.mark.parametrize("left_shape, right_shape", [
    ((3, 4), (4, 2)),            # plain matrices, as the seed's MatrixProduct took them
    ((4,), (4, 2)),              # a row vector on the left
    ((3, 4), (4,)),              # a column vector on the right
    ((5, 3, 4), (4, 2)),         # one right factor for every sample
    ((3, 4), (5, 4, 2)),         # one left factor for every sample
    ((5, 1, 3, 4), (2, 4, 2)),   # batch axes that stretch on both sides
])
def test_matrix_product_gradients_for_everything_matmul_accepts(left_shape, right_shape, assert_layer_gradients):
    rng = np.random.default_rng(len(left_shape) + len(right_shape))
    pair = (rng.standard_normal(left_shape), rng.standard_normal(right_shape))
    np.testing.assert_array_equal(MatrixProduct(dtype=F64).forward(pair), pair[0] @ pair[1])
    assert_layer_gradients(MatrixProduct(dtype=F64), pair)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_matrix_product_gradients(batch_size, assert_layer_gradients):
    rng = np.random.default_rng(batch_size)
    pair = (rng.standard_normal((batch_size, 3, 4)), rng.standard_normal((batch_size, 4, 2)))
    assert_layer_gradients(MatrixProduct(dtype=F64), pair)


def test_matrix_product_gradients_with_head_axis(assert_layer_gradients):
    rng = np.random.default_rng(3)
    pair = (rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 5, 2)))
    assert_layer_gradients(MatrixProduct(dtype=F64), pair)


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multi_head_attention_gradients(batch_size, causal, assert_layer_gradients):
    rng = np.random.default_rng(batch_size)
    layer = MultiHeadAttention(6, 2, causal=causal, dtype=F64, rng=rng)
    # Non-zero biases, so that their gradients flow through every path.
    for key in ("b_q", "b_k", "b_v", "b_o"):
        layer.params[key][...] = 0.3 * rng.standard_normal(6)
    assert_layer_gradients(layer, rng.standard_normal((batch_size, 4, 6)))


def test_multi_head_attention_gradients_with_padding_mask(numerical_gradient):
    rng = np.random.default_rng(5)
    layer = MultiHeadAttention(4, 2, dtype=F64, rng=rng)
    inputs = rng.standard_normal((2, 3, 4))
    mask = np.ones((2, 3, 3), dtype=bool)
    mask[1, :, 2] = False  # the second sample's last position is padding
    projection = rng.standard_normal((2, 3, 4))

    def loss():
        return np.sum(projection * layer.forward(inputs, mask=mask))

    loss()
    input_gradients = layer.backward(projection)
    np.testing.assert_allclose(input_gradients, numerical_gradient(loss, inputs), rtol=1e-6, atol=1e-8)
    for key, param in layer.params.items():
        np.testing.assert_allclose(layer.grads[key], numerical_gradient(loss, param), rtol=1e-6, atol=1e-8)


def make_net(dtype=F64, input_grad=False):
    rng = np.random.default_rng(0)
    return SequentialLayers([LinearLayer(4, 6, dtype=dtype, rng=rng), ReluLayer(dtype=dtype),
                             LinearLayer(6, 3, dtype=dtype, rng=rng), CrossEntropyLossLayer(dtype=dtype)],
                            input_grad=input_grad)


def net_data(batch_size=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, 4)), rng.integers(0, 3, size=batch_size)


def test_sequential_gradients_match_finite_differences_of_the_net(numerical_gradient):
    net = make_net(input_grad=True)
    inputs, labels = net_data()
    net(inputs, labels)
    input_gradients = net.backward()[0]  # entry 0: the gradient with respect to the net's input
    np.testing.assert_allclose(input_gradients, numerical_gradient(lambda: net(inputs, labels), inputs),
                               rtol=1e-6, atol=1e-8)
    for name, param, grad in net.named_params():
        np.testing.assert_allclose(grad, numerical_gradient(lambda: net(inputs, labels), param),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


def test_net_grads_are_the_mean_of_per_sample_grads():
    net = make_net()
    inputs, labels = net_data(batch_size=4)
    per_sample = []
    for index in range(4):
        net.zero_grads()
        net(inputs[index:index + 1], labels[index:index + 1])
        net.backward()
        per_sample.append({name: grad.copy() for name, _, grad in net.named_params()})
    net.zero_grads()
    net(inputs, labels)
    net.backward()
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, np.mean([sample[name] for sample in per_sample], axis=0), rtol=1e-12)


def test_grads_accumulate_until_zero_grads():
    net = make_net()
    inputs, labels = net_data()
    net(inputs, labels)
    net.backward()
    once = {name: grad.copy() for name, _, grad in net.named_params()}
    live = {name: grad for name, _, grad in net.named_params()}
    net(inputs, labels)
    net.backward()
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12)
        assert grad is live[name], f"{name}: the grads array was rebound instead of written in place"
    net.zero_grads()
    for name, _, grad in net.named_params():
        assert not grad.any(), name
    net(inputs, labels)
    net.backward()
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, once[name], rtol=1e-12)


def test_attention_grads_accumulate_until_zero_grads():
    rng = np.random.default_rng(0)
    layer = MultiHeadAttention(4, 2, dtype=F64, rng=rng)
    inputs, projection = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 4))
    layer.forward(inputs)
    layer.backward(projection)
    once = {key: grad.copy() for key, grad in layer.grads.items()}
    layer.forward(inputs)
    layer.backward(projection)
    for key, grad in layer.grads.items():
        np.testing.assert_allclose(grad, 2 * once[key], rtol=1e-12, err_msg=key)
    layer.zero_grads()
    assert not any(grad.any() for grad in layer.grads.values())


# ------------------------------------------------------------------ loss weight
LOSS_CASES = ["cross_entropy", "mse", "nll"]
# Powers of two scale every rounding step exactly, so the weighted gradient is
# bitwise w times the unweighted one; other weights agree up to rounding.
EXACT_WEIGHTS = [2.0, 0.25, -8.0]
ROUNDED_WEIGHTS = [0.3, -1.7, np.float64(1e-3), np.array(7.5)]


def weighted_allclose(actual, weight, unweighted):
    """``actual == weight * unweighted`` up to a few roundings of the terms involved."""
    tolerance = 8 * np.finfo(F64).eps * abs(float(weight)) * np.abs(unweighted).max()
    np.testing.assert_allclose(actual, float(weight) * unweighted, rtol=0, atol=tolerance)


@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_backward_with_a_weight_is_the_weight_times_backward(case):
    rng = np.random.default_rng(11)
    layer, inputs, targets = ROW_CASES[case](rng, 7)
    layer.forward(inputs, targets)
    unweighted = layer.backward()
    assert unweighted.dtype == F64
    np.testing.assert_array_equal(layer.backward(None), unweighted)
    np.testing.assert_array_equal(layer.backward(1.0), unweighted)
    for weight in EXACT_WEIGHTS:
        np.testing.assert_array_equal(layer.backward(weight), weight * unweighted, err_msg=f"weight {weight}")
    for weight in ROUNDED_WEIGHTS:
        weighted_allclose(layer.backward(weight), weight, unweighted)
    assert not layer.backward(0.0).any()


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("weight", [0.3, -2.0])
def test_weighted_loss_gradient_matches_finite_differences(case, weight, numerical_gradient):
    rng = np.random.default_rng(12)
    layer, inputs, targets = ROW_CASES[case](rng, 5)
    layer.forward(inputs, targets)
    analytic = layer.backward(weight)
    expected = numerical_gradient(lambda: weight * layer.forward(inputs, targets), inputs)
    np.testing.assert_allclose(analytic, expected, rtol=1e-6, atol=1e-8)


def test_net_backward_with_scale_gives_scale_times_the_grads(numerical_gradient):
    net = make_net(input_grad=True)
    inputs, labels = net_data()

    def gradients(**scale):
        net.zero_grads()
        net(inputs, labels)
        input_gradient = net.backward(**scale)[0]
        return {"input": input_gradient, **{name: grad.copy() for name, _, grad in net.named_params()}}

    unweighted = gradients()
    for scale in EXACT_WEIGHTS:
        for name, gradient in gradients(scale=scale).items():
            np.testing.assert_array_equal(gradient, scale * unweighted[name], err_msg=f"{name}, scale {scale}")
    for scale in ROUNDED_WEIGHTS:
        for name, gradient in gradients(scale=scale).items():
            weighted_allclose(gradient, scale, unweighted[name])

    # And against finite differences of the weighted loss itself.
    scale = -0.7
    weighted = gradients(scale=scale)
    for name, param, _ in net.named_params():
        np.testing.assert_allclose(weighted[name], numerical_gradient(lambda: scale * net(inputs, labels), param),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 2, 4)])
def test_linear_gradients_on_sequences_apply_the_map_at_every_position(shape, assert_layer_gradients):
    rng = np.random.default_rng(len(shape))
    layer, inputs = LinearLayer(4, 3, dtype=F64, rng=rng), rng.standard_normal(shape)
    outputs = layer.forward(inputs)
    assert outputs.shape == shape[:-1] + (3,)
    np.testing.assert_allclose(outputs, inputs @ layer.params["w"].T + layer.params["b"], rtol=1e-13)
    assert_layer_gradients(layer, inputs)


# ------------------------------------------------------------------ the layers of a GPT
# (the layers one by one; tests/test_gpt_layers.py checks them stacked into a model)

@pytest.mark.parametrize("shape", [(5, 6), (2, 4, 6), (2, 3, 2, 6)], ids=["rows", "sequence", "two_axes"])
def test_layer_norm_gradients(shape, assert_layer_gradients):
    rng = np.random.default_rng(len(shape))
    layer = LayerNormLayer(6, dtype=F64)
    # A gain and bias away from their initial ones and zeros, inputs far from mean 0 and variance 1.
    layer.params["g"][...] = 1 + 0.5 * rng.standard_normal(6)
    layer.params["b"][...] = rng.standard_normal(6)
    assert_layer_gradients(layer, 3 + 2 * rng.standard_normal(shape))


def test_layer_norm_gradients_with_a_large_eps(assert_layer_gradients):
    """eps comparable to the variance: its place inside the square root matters."""
    rng = np.random.default_rng(1)
    assert_layer_gradients(LayerNormLayer(4, eps=0.5, dtype=F64), 0.5 * rng.standard_normal((3, 4)))


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
def test_gelu_gradients(shape, assert_layer_gradients):
    inputs = 3 * np.random.default_rng(len(shape)).standard_normal(shape)
    assert_layer_gradients(GeluLayer(dtype=F64), inputs)


@pytest.mark.parametrize("length", [4, 6], ids=["shorter_than_the_context", "the_whole_context"])
def test_positional_embedding_gradients(length, assert_layer_gradients):
    rng = np.random.default_rng(length)
    layer = PositionalEmbeddingLayer(6, 5, dtype=F64, rng=rng)
    assert_layer_gradients(layer, rng.standard_normal((3, length, 5)))
    if length < 6:
        assert not layer.grads["w"][length:].any(), "positions beyond the input got a gradient"


@pytest.mark.parametrize("ids_shape", [(4, 6), (9,)], ids=["sequences", "one_id_per_sample"])
def test_embedding_gradients_add_every_use_of_a_row(ids_shape, numerical_gradient):
    rng = np.random.default_rng(len(ids_shape))
    layer = EmbeddingLayer(7, 3, dtype=F64, rng=rng)
    ids = rng.integers(0, 5, size=ids_shape)  # ids 5 and 6 never occur; most others several times
    projection = rng.standard_normal(ids_shape + (3,))

    def loss():
        return np.sum(projection * layer.forward(ids))

    loss()
    assert layer.backward(projection) is None  # the ids have no gradient
    np.testing.assert_allclose(layer.grads["w"], numerical_gradient(loss, layer.params["w"]), rtol=1e-6, atol=1e-8)
    assert not layer.grads["w"][5:].any()


def test_embedding_grads_accumulate_until_zero_grads():
    rng = np.random.default_rng(3)
    layer = EmbeddingLayer(5, 2, dtype=F64, rng=rng)
    ids, projection = np.array([[1, 1, 4], [0, 1, 4]]), rng.standard_normal((2, 3, 2))
    layer.forward(ids)
    layer.backward(projection)
    once = layer.grads["w"].copy()
    live = layer.grads["w"]
    layer.forward(ids)
    layer.backward(projection)
    np.testing.assert_allclose(layer.grads["w"], 2 * once, rtol=1e-12)
    assert layer.grads["w"] is live
    layer.zero_grads()
    layer.forward(ids[:1])
    layer.backward(projection[:1])
    expected = np.zeros((5, 2))
    expected[1] = projection[0, 0] + projection[0, 1]
    expected[4] = projection[0, 2]
    np.testing.assert_array_equal(layer.grads["w"], expected)


@pytest.mark.parametrize("batch_size, length", [(1, 1), (3, 4)])
def test_cross_entropy_gradients_over_every_position_of_a_sequence(batch_size, length, assert_layer_gradients):
    rng = np.random.default_rng(length)
    logits, labels = 2 * rng.standard_normal((batch_size, length, 5)), rng.integers(0, 5, (batch_size, length))
    assert_layer_gradients(CrossEntropyLossLayer(dtype=F64), logits, labels)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 4)])
def test_dropout_gradients_with_a_fixed_mask(shape, numerical_gradient):
    rng = np.random.default_rng(len(shape))
    layer = DropoutLayer(0.4, seed=9, dtype=F64)
    inputs, projection = rng.standard_normal(shape), rng.standard_normal(shape)

    def loss():
        layer.start_batch(step=3, first_sample=10)  # the same mask in every forward
        return np.sum(projection * layer.forward(inputs))

    loss()
    analytic = layer.backward(projection)
    np.testing.assert_allclose(analytic, numerical_gradient(loss, inputs), rtol=1e-6, atol=1e-8)
    assert 0 < np.count_nonzero(analytic) < analytic.size, "expected some values dropped and some kept"
