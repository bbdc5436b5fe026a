"""Layer forward values against independent references, dtypes, and the errors users get."""

import math

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

EXTREME_LOGITS = np.array([
    [1e4, 1e4 - 1, -1e4, 1e4 - 30],
    [-1e4, -1e4 + 2, -1e4 + 0.5, -1e4 - 100],
    [1e4, -1e4, 0.0, 5e3],
])


def reference_log_softmax(row):
    """log-softmax of one row in float64: differences to the maximum first (exact for
    nearby values), the sum taken with math.fsum."""
    row = [float(value) for value in row]
    top = max(row)
    log_sum = math.log(math.fsum(math.exp(value - top) for value in row))
    return np.array([(value - top) - log_sum for value in row])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_log_softmax_of_extreme_logits_are_finite_and_correct(dtype):
    logits = EXTREME_LOGITS.astype(dtype)
    expected_log = np.array([reference_log_softmax(row) for row in logits])
    softmax = SoftmaxLayer(dtype=dtype).forward(logits)
    log_softmax = LogSoftmaxLayer(dtype=dtype).forward(logits)
    assert softmax.dtype == dtype and log_softmax.dtype == dtype
    assert np.all(np.isfinite(softmax)) and np.all(np.isfinite(log_softmax))
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    # Entries differ by up to 2e4, so compare log-probabilities relative to that scale.
    np.testing.assert_allclose(log_softmax, expected_log, rtol=tolerance, atol=tolerance * 10)
    np.testing.assert_allclose(softmax, np.exp(expected_log), rtol=tolerance * 10, atol=1e-30)
    np.testing.assert_allclose(softmax.sum(axis=1), 1, rtol=tolerance * 10)


def test_static_softmax_functions_agree_with_the_layers_on_any_axis():
    logits = np.random.default_rng(0).standard_normal((3, 4, 5))
    log_softmax, softmax = LogSoftmaxLayer.stable_log_softmax(logits, axis=1)
    np.testing.assert_allclose(softmax, SoftmaxLayer.stable_softmax(logits, axis=1), rtol=1e-14)
    np.testing.assert_allclose(np.exp(log_softmax), softmax, rtol=1e-14)
    np.testing.assert_allclose(softmax.sum(axis=1), 1, rtol=1e-14)
    rows = logits[:, :, 0]
    np.testing.assert_allclose(SoftmaxLayer(dtype=np.float64).forward(rows), softmax[:, :, 0], rtol=1e-14)


def test_extreme_logits_give_finite_gradients():
    logits = EXTREME_LOGITS.astype(np.float32)
    labels = np.array([2, 3, 1])
    for net in (SequentialLayers([LogSoftmaxLayer(), NllLossLayer()], input_grad=True),
                SequentialLayers([CrossEntropyLossLayer()], input_grad=True)):
        loss = net(logits, labels)
        assert np.isfinite(loss)
        assert np.all(np.isfinite(net.backward()[0]))


def test_log_softmax_then_nll_equals_cross_entropy():
    rng = np.random.default_rng(1)
    logits, labels = 3 * rng.standard_normal((6, 4)), rng.integers(0, 4, size=6)
    split = SequentialLayers([LogSoftmaxLayer(dtype=np.float64), NllLossLayer(dtype=np.float64)], input_grad=True)
    fused = SequentialLayers([CrossEntropyLossLayer(dtype=np.float64)], input_grad=True)
    assert split(logits, labels) == pytest.approx(fused(logits, labels), rel=1e-13)
    np.testing.assert_allclose(split.backward()[0], fused.backward()[0], rtol=1e-12, atol=1e-15)
    expected = -np.mean([reference_log_softmax(row)[label] for row, label in zip(logits, labels)])
    assert fused(logits, labels) == pytest.approx(expected, rel=1e-13)


def test_mse_is_the_mean_over_all_elements():
    rng = np.random.default_rng(2)
    inputs, targets = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    layer = MSELossLayer(dtype=np.float64)
    loss = layer.forward(inputs, targets)
    assert loss == pytest.approx(sum((a - b) ** 2 for a, b in zip(inputs.ravel(), targets.ravel())) / 15, rel=1e-13)
    np.testing.assert_allclose(layer.backward(), 2 * (inputs - targets) / 15, rtol=1e-14)
    # Seed-style columns on either side give the same loss.
    assert layer.forward(inputs[:, :, None], targets) == pytest.approx(loss, rel=1e-14)
    assert layer.forward(inputs, targets[:, :, None]) == pytest.approx(loss, rel=1e-14)


def test_log_layer_values_and_zero():
    layer = LogLayer(dtype=np.float64)
    np.testing.assert_allclose(layer.forward(np.array([[1.0, np.e, 0.5]])), [[0.0, 1.0, np.log(0.5)]], rtol=1e-15)
    with np.errstate(divide="ignore"):
        assert layer.forward(np.array([[0.0, 1.0]]))[0, 0] == -np.inf


def test_matrix_product_forward_per_sample():
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 3, 5))
    outputs = MatrixProduct(dtype=np.float64).forward((left, right))
    for index in range(4):
        np.testing.assert_allclose(outputs[index], left[index] @ right[index], rtol=1e-14)


def reference_attention(layer, inputs, allowed):
    """Multi-head attention written out per sample and head, with plain loops."""
    p = {key: value.astype(np.float64) for key, value in layer.params.items()}
    batch_size, length, d_model = inputs.shape
    d_head = d_model // layer.n_heads
    outputs = np.zeros((batch_size, length, d_model))
    for b in range(batch_size):
        x = inputs[b].astype(np.float64)
        q, k, v = x @ p["w_q"].T + p["b_q"], x @ p["w_k"].T + p["b_k"], x @ p["w_v"].T + p["b_v"]
        heads = []
        for h in range(layer.n_heads):
            columns = slice(h * d_head, (h + 1) * d_head)
            context = np.zeros((length, d_head))
            for t in range(length):
                keys = [s for s in range(length) if allowed[b, t, s]]
                scores = np.array([q[t, columns] @ k[s, columns] for s in keys]) / math.sqrt(d_head)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                context[t] = sum(w * v[s, columns] for w, s in zip(weights, keys))
            heads.append(context)
        outputs[b] = np.concatenate(heads, axis=1) @ p["w_o"].T + p["b_o"]
    return outputs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multi_head_attention_matches_a_loop_reference(causal):
    rng = np.random.default_rng(4)
    layer = MultiHeadAttention(8, 2, causal=causal, dtype=np.float64, rng=rng)
    for key in ("b_q", "b_k", "b_v", "b_o"):
        layer.params[key][...] = rng.standard_normal(8)
    inputs = rng.standard_normal((3, 5, 8))
    allowed = np.broadcast_to(np.tri(5, dtype=bool) if causal else np.ones((5, 5), dtype=bool), (3, 5, 5))
    np.testing.assert_allclose(layer.forward(inputs), reference_attention(layer, inputs, allowed), rtol=1e-12)


def test_multi_head_attention_mask_combines_with_causal():
    rng = np.random.default_rng(5)
    layer = MultiHeadAttention(4, 2, causal=True, dtype=np.float64, rng=rng)
    inputs = rng.standard_normal((2, 4, 4))
    mask = np.ones((2, 4, 4), dtype=bool)
    mask[1, :, 1] = False
    mask[1, 1, 0] = True  # query 1 keeps key 0, so no query is left without a key
    allowed = mask & np.tri(4, dtype=bool)
    np.testing.assert_allclose(layer.forward(inputs, mask=mask), reference_attention(layer, inputs, allowed),
                               rtol=1e-12)


def test_causal_attention_ignores_later_positions():
    rng = np.random.default_rng(6)
    layer = MultiHeadAttention(4, 2, causal=True, dtype=np.float64, rng=rng)
    inputs = rng.standard_normal((1, 5, 4))
    changed = inputs.copy()
    changed[0, 3:] += 10
    before, after = layer.forward(inputs), layer.forward(changed)
    np.testing.assert_allclose(before[0, :3], after[0, :3], rtol=1e-14)
    assert not np.allclose(before[0, 3:], after[0, 3:])


# --- dtypes ---------------------------------------------------------------

def dtype_cases(dtype, rng):
    """(layer, inputs, targets) for every layer, in ``dtype``."""
    x = rng.standard_normal((3, 4)).astype(dtype)
    positive = rng.uniform(0.5, 2, (3, 4)).astype(dtype)
    labels = np.array([0, 3, 1])
    return [
        (LinearLayer(4, 2, dtype=dtype, rng=rng), x, None),
        (ReluLayer(dtype=dtype), x, None),
        (LogLayer(dtype=dtype), positive, None),
        (SoftmaxLayer(dtype=dtype), x, None),
        (LogSoftmaxLayer(dtype=dtype), x, None),
        (MSELossLayer(dtype=dtype), x, rng.standard_normal((3, 4))),
        (NllLossLayer(dtype=dtype), x, labels),
        (CrossEntropyLossLayer(dtype=dtype), x, labels),
        (MatrixProduct(dtype=dtype), (x[:, :, None], x[:, None, :]), None),
        (MultiHeadAttention(4, 2, dtype=dtype, rng=rng), x[None], None),
        (PositionalEmbeddingLayer(5, 4, dtype=dtype, rng=rng), x[None], None),
        (LayerNormLayer(4, dtype=dtype), x, None),
        (GeluLayer(dtype=dtype), x, None),
        (DropoutLayer(0.5, seed=0, dtype=dtype), x, None),
        (CrossEntropyLossLayer(dtype=dtype), x[None], labels[None]),  # a sequence of 3 positions
    ]


def assert_all_dtype(values, dtype):
    for value in values if isinstance(values, tuple) else (values,):
        assert value.dtype == dtype, f"expected {np.dtype(dtype)}, got {value.dtype}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_keep_their_dtype_end_to_end(dtype):
    for layer, inputs, targets in dtype_cases(dtype, np.random.default_rng(7)):
        if targets is None:
            outputs = layer.forward(inputs)
            assert_all_dtype(outputs, dtype)
            assert_all_dtype(layer.backward(np.ones_like(outputs)), dtype)
        else:
            assert_all_dtype(np.asarray(layer.forward(inputs, targets)), dtype)
            assert_all_dtype(layer.backward(), dtype)
        for key in layer.params:
            assert_all_dtype((layer.params[key], layer.grads[key]), dtype)


def test_float64_inputs_do_not_upcast_a_float32_layer():
    for layer, inputs, targets in dtype_cases(np.float32, np.random.default_rng(8)):
        wide = tuple(part.astype(np.float64) for part in inputs) if isinstance(inputs, tuple) \
            else inputs.astype(np.float64)
        outputs = layer.forward(wide, targets)
        assert_all_dtype(np.asarray(outputs) if targets is not None else outputs, np.float32)


def test_attention_astype_casts_parameters_and_computation():
    layer = MultiHeadAttention(4, 2, rng=0).astype(np.float64)
    outputs = layer.forward(np.ones((1, 3, 4), dtype=np.float32))
    assert outputs.dtype == np.float64
    assert_all_dtype(layer.backward(np.ones_like(outputs)), np.float64)
    assert all(grad.dtype == np.float64 for grad in layer.grads.values())


# --- errors users can cause -------------------------------------------------

def test_wrong_feature_count_names_the_layer_and_both_counts():
    with pytest.raises(ValueError, match=r"LinearLayer: expected 4 features per sample, got 5"):
        LinearLayer(4, 2, rng=0).forward(np.ones((3, 5)))


@pytest.mark.parametrize("layer_type", [NllLossLayer, CrossEntropyLossLayer])
@pytest.mark.parametrize("labels, message", [
    ([0, 1, 4], r"expected class indices in \[0, 4\), got label 4"),
    ([0, -1, 2], r"expected class indices in \[0, 4\), got label -1"),
    ([0.0, 1.5, 2.0], r"expected integer class indices"),
    ([[0, 1, 2]], r"expected labels of shape \(3,\) or \(3, 1\), got \(1, 3\)"),
    (None, r"expected integer class labels"),
])
def test_bad_labels_raise_naming_the_layer(layer_type, labels, message):
    with pytest.raises(ValueError, match=layer_type.__name__ + ": " + message):
        layer_type().forward(np.zeros((3, 4)), labels)


def test_whole_float_and_column_labels_are_accepted():
    layer = NllLossLayer(dtype=np.float64)
    inputs = np.log(np.full((3, 4), 0.25))
    assert layer.forward(inputs, np.array([0.0, 3.0, 1.0])) == pytest.approx(np.log(4))
    assert layer.forward(inputs, np.array([[0], [3], [1]])) == pytest.approx(np.log(4))


@pytest.mark.parametrize("targets_shape", [(3,), (3, 4), (2, 2), (3, 1, 2)])
def test_mse_targets_of_the_wrong_shape_raise(targets_shape):
    with pytest.raises(ValueError, match=r"MSELossLayer: expected targets of shape \(3, 2\) or \(3, 2, 1\)"):
        MSELossLayer().forward(np.zeros((3, 2)), np.zeros(targets_shape))
    with pytest.raises(ValueError, match="MSELossLayer: expected targets"):
        MSELossLayer().forward(np.zeros((3, 2)), None)


@pytest.mark.parametrize("layer", [
    LinearLayer(3, 2, rng=0), ReluLayer(), LogLayer(), SoftmaxLayer(), LogSoftmaxLayer(),
    MatrixProduct(), MultiHeadAttention(4, 2, rng=0), EmbeddingLayer(3, 2, rng=0),
    PositionalEmbeddingLayer(3, 2, rng=0), LayerNormLayer(2), GeluLayer(), DropoutLayer(0.5, seed=0),
], ids=lambda layer: layer.name)
def test_backward_before_forward_raises(layer):
    with pytest.raises(ValueError, match=f"{layer.name}: backward called before forward"):
        layer.backward(np.ones((2, 2)))


@pytest.mark.parametrize("layer", [MSELossLayer(), NllLossLayer(), CrossEntropyLossLayer()],
                         ids=lambda layer: layer.name)
def test_loss_backward_before_forward_raises(layer):
    with pytest.raises(ValueError, match=f"{layer.name}: backward called before forward"):
        layer.backward()


@pytest.mark.parametrize("layer, inputs, targets", [
    (MSELossLayer(), np.zeros((3, 2)), np.ones((3, 2))),
    (NllLossLayer(), np.zeros((3, 2)), np.array([0, 1, 1])),
    (CrossEntropyLossLayer(), np.zeros((3, 2)), np.array([0, 1, 1])),
], ids=["mse", "nll", "cross_entropy"])
def test_loss_weight_must_be_a_scalar(layer, inputs, targets):
    layer.forward(inputs, targets)
    for weight in (np.ones(3), np.ones((3, 1)), [0.5]):
        with pytest.raises(ValueError, match=f"{layer.name}: backward takes no gradient or a scalar loss "
                                             f"weight, got an array of shape"):
            layer.backward(weight)
    with pytest.raises(TypeError, match=f"{layer.name}: the loss weight passed to backward must be a real "
                                        f"number, got str 'half'"):
        layer.backward("half")
    layer.backward(np.array(0.5))  # a 0-d array is a scalar


def test_gradients_of_the_wrong_shape_raise():
    layer = SoftmaxLayer()
    layer.forward(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"SoftmaxLayer: expected gradients of shape \(3, 4\)"):
        layer.backward(np.zeros((3, 5)))
    attention = MultiHeadAttention(4, 2, rng=0)
    attention.forward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: expected gradients of shape \(2, 3, 4\)"):
        attention.backward(np.zeros((2, 4, 4)))


def test_log_of_negative_inputs_raises():
    with pytest.raises(ValueError, match="LogLayer: expected inputs >= 0, got minimum -1"):
        LogLayer().forward(np.array([[1.0, -1.0]]))


@pytest.mark.parametrize("layer_type", [SoftmaxLayer, LogSoftmaxLayer])
def test_unsupported_softmax_axis_raises(layer_type):
    with pytest.raises(ValueError, match=f"{layer_type.__name__}: only the feature axis 1"):
        layer_type(axis=0)


@pytest.mark.parametrize("pair, message", [
    (np.zeros((2, 3, 3)), r"expected a pair \(Q, P\)"),
    ((np.zeros(()), np.zeros((3, 3))), r"expected vectors or matrices"),
    ((np.zeros((2, 3, 4)), np.zeros((2, 5, 2))), r"got shapes \(2, 3, 4\) and \(2, 5, 2\)"),
    ((np.zeros((2, 3, 4)), np.zeros((3, 4, 2))), r"batch axes that broadcast, got shapes \(2, 3, 4\) and \(3, 4, 2\)"),
])
def test_matrix_product_bad_pairs_raise(pair, message):
    with pytest.raises(ValueError, match="MatrixProduct: .*" + message):
        MatrixProduct().forward(pair)


def test_multi_head_attention_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="expected d_model divisible by n_heads, got d_model=6, n_heads=4"):
        MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match="expected n_heads a positive int, got 0"):
        MultiHeadAttention(6, 0)
    layer = MultiHeadAttention(4, 2, rng=0)
    with pytest.raises(ValueError, match=r"MultiHeadAttention: expected inputs of shape \(batch, time, 4\), "
                                         r"got shape \(2, 3, 5\)"):
        layer.forward(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"expected a boolean mask of shape \(3, 3\) or \(2, 3, 3\)"):
        layer.forward(np.zeros((2, 3, 4)), mask=np.ones((4, 4), dtype=bool))
    no_keys = np.ones((3, 3), dtype=bool)
    no_keys[1] = False
    with pytest.raises(ValueError, match="leaves a query position with no key"):
        layer.forward(np.zeros((2, 3, 4)), mask=no_keys)


def test_an_empty_batch_raises_instead_of_a_nan_loss():
    rng = np.random.default_rng(0)
    net = SequentialLayers([LinearLayer(5, 3, rng=rng), CrossEntropyLossLayer()])
    with pytest.raises(ValueError, match=r"LinearLayer: expected at least one sample.*\(0, 5\)"):
        net(np.zeros((0, 5)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="CrossEntropyLossLayer: expected at least one sample"):
        CrossEntropyLossLayer().forward(np.zeros((0, 3)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("make", [lambda: LinearLayer(True, 4), lambda: LinearLayer(3, 0),
                                  lambda: LinearLayer(3.0, 4)])
def test_layer_sizes_must_be_positive_ints_not_bools(make):
    with pytest.raises(ValueError, match="LinearLayer: expected shape"):
        make()


# --- the layers of a GPT ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_keeps_its_dtype_and_gives_no_input_gradient(dtype):
    layer = EmbeddingLayer(5, 3, dtype=dtype, rng=0)
    outputs = layer.forward(np.array([[0, 4], [2, 2]], dtype=np.uint8))
    assert outputs.dtype == dtype and outputs.shape == (2, 2, 3)
    np.testing.assert_array_equal(outputs[1, 0], layer.params["w"][2])
    assert layer.backward(np.ones_like(outputs)) is None
    assert layer.grads["w"].dtype == dtype
    assert layer.forward(np.array([1, 3])).shape == (2, 3)  # one id per sample


def test_embedding_takes_whole_float_ids_as_a_pipeline_in_the_training_dtype_gives_them():
    layer = EmbeddingLayer(5, 3, dtype=np.float64, rng=0)
    np.testing.assert_array_equal(layer.forward(np.array([[1.0, 4.0]], dtype=np.float32)),
                                  layer.forward(np.array([[1, 4]])))


@pytest.mark.parametrize("ids, message", [
    (np.array([[0, 5]]), r"expected token ids in \[0, 5\), got id 5"),
    (np.array([[-1, 2]]), r"expected token ids in \[0, 5\), got id -1"),
    (np.array([[0.5, 2.0]]), r"expected integer token ids, got non-integer ids of dtype float64"),
    (np.array([[np.nan, 2.0]]), r"expected integer token ids, got non-integer ids of dtype float64"),
    (np.array([["a", "b"]]), r"expected integer token ids, got non-integer ids of dtype <U1"),
    (np.array([[2**70, 1]], dtype=object), r"expected integer token ids, got non-integer ids of dtype object"),
    (np.array([[1e30, 1.0]]), r"expected token ids in \[0, 5\), got id 1e\+30"),
    (np.zeros((0, 4), dtype=int), r"expected a non-empty batch of token ids"),
    (np.array(3), r"expected a non-empty batch of token ids"),
])
def test_bad_token_ids_raise_naming_the_layer(ids, message):
    with pytest.raises(ValueError, match="EmbeddingLayer: " + message):
        EmbeddingLayer(5, 3, rng=0).forward(ids)


def test_positional_embedding_refuses_more_positions_than_its_context():
    layer = PositionalEmbeddingLayer(4, 3, rng=0)
    assert layer.forward(np.zeros((2, 4, 3))).shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"PositionalEmbeddingLayer: expected at most 4 positions \(the context "
                                         r"it was built for\), got 5"):
        layer.forward(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"expected a non-empty batch of shape \(batch, time, 3\), got shape \(2, 4\)"):
        layer.forward(np.zeros((2, 4)))


def test_layer_norm_is_exact_in_float32_far_from_zero():
    """Two passes: a mean of 1e4 with a spread of 1 still normalises to float32 precision."""
    rows = 1e4 + np.random.default_rng(0).standard_normal((5, 64))
    centered = rows - rows.mean(axis=1, keepdims=True)
    expected = centered / np.sqrt((centered**2).mean(axis=1, keepdims=True) + 1e-5)
    got = LayerNormLayer(64).forward(rows.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float32 holds 1e4 + x to 1e-3


def test_layer_norm_and_gelu_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match=r"LayerNormLayer: expected 4 features on the last axis, got 5"):
        LayerNormLayer(4).forward(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="LayerNormLayer: expected eps > 0"):
        LayerNormLayer(4, eps=0)
    with pytest.raises(ValueError, match="LayerNormLayer: d: expected an integer >= 1, got 0"):
        LayerNormLayer(0)
    with pytest.raises(ValueError, match="GeluLayer: approximate: expected one of tanh, got 'none'"):
        GeluLayer(approximate="none")


@pytest.mark.parametrize("arguments, error, message", [
    ({"p": 1.0}, ValueError, r"expected 0 <= p < 1 \(the probability of dropping a value\), got 1.0"),
    ({"p": -0.1}, ValueError, r"expected 0 <= p < 1"),
    ({"p": "0.1"}, TypeError, r"DropoutLayer: p: expected a number"),
    ({"p": 0.1, "seed": -1}, ValueError, r"DropoutLayer: seed: expected an integer >= 0, got -1"),
    ({"p": 0.1, "seed": 2**63}, ValueError, r"expected a seed below 2\*\*63 \(a TOML integer\)"),
    ({"p": 0.1, "seed": 1.5}, TypeError, r"DropoutLayer: seed: expected an integer"),
])
def test_bad_dropout_configuration_raises(arguments, error, message):
    with pytest.raises(error, match=message):
        DropoutLayer(**arguments)


def test_bad_hook_arguments_raise_naming_the_layer():
    net = SequentialLayers([LinearLayer(2, 2, rng=0), DropoutLayer(0.5, seed=0)])
    with pytest.raises(TypeError, match=r"SequentialLayers.set_training: expected True \(training\) or False "
                                        r"\(evaluation\), got 'no'"):
        net.set_training("no")
    with pytest.raises(TypeError, match=r"DropoutLayer.set_training: expected True"):
        DropoutLayer(0.5, seed=0).set_training(1)
    with pytest.raises(ValueError, match=r"SequentialLayers.start_batch: step: expected an integer >= 0, got -1"):
        net.start_batch(-1, 0)
    with pytest.raises(TypeError, match=r"LinearLayer.start_batch: first_sample: expected an integer"):
        LinearLayer(2, 2, rng=0).start_batch(0, 1.5)


def test_sequence_cross_entropy_is_the_mean_over_every_position():
    rng = np.random.default_rng(9)
    logits, labels = rng.standard_normal((3, 4, 5)), rng.integers(0, 5, (3, 4))
    layer = CrossEntropyLossLayer(dtype=np.float64)
    rows = CrossEntropyLossLayer(dtype=np.float64)
    assert layer.forward(logits, labels) == pytest.approx(rows.forward(logits.reshape(12, 5), labels.ravel()),
                                                          rel=1e-14)
    np.testing.assert_allclose(layer.backward(), rows.backward().reshape(3, 4, 5), rtol=1e-14)


def test_cross_entropy_tells_seed_columns_from_sequences_by_the_labels():
    rng = np.random.default_rng(10)
    layer = CrossEntropyLossLayer(dtype=np.float64)
    columns = rng.standard_normal((3, 4, 1))  # the seed's (B, C, 1): 4 classes per sample
    loss = layer.forward(columns, np.array([0, 3, 1]))
    assert loss == pytest.approx(layer.forward(columns[:, :, 0], np.array([0, 3, 1])), rel=1e-14)
    assert layer.forward(columns, np.array([[0], [3], [1]])) == loss
    # The same logits with a label per position: 4 positions of a single class each.
    assert layer.forward(columns, np.zeros((3, 4), dtype=int)) == 0
    assert layer.backward().shape == (3, 4, 1)


@pytest.mark.parametrize("labels, message", [
    (np.zeros(2, dtype=int), r"expected labels of shape \(2, 3\), got \(2,\)"),
    (np.zeros((3, 2), dtype=int), r"expected labels of shape \(2, 3\), got \(3, 2\)"),
    (np.full((2, 3), 4), r"expected class indices in \[0, 4\), got label 4"),
    (None, r"expected integer class labels as feedbacks, got None"),
])
def test_bad_sequence_labels_raise(labels, message):
    with pytest.raises(ValueError, match="CrossEntropyLossLayer: " + message):
        CrossEntropyLossLayer().forward(np.zeros((2, 3, 4)), labels)
    with pytest.raises(ValueError, match="expected at least one sample and one position"):
        CrossEntropyLossLayer().forward(np.zeros((2, 0, 4)), np.zeros((2, 0), dtype=int))
