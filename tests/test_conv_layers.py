"""Convolution and pooling (mnn.layer.conv, mnn.layer.pooling): gradients against float64
finite differences and, where torch is installed, PyTorch autograd; the arg-max tie rule;
input checks; descriptions and sizes."""
import sys

import numpy as np
import pytest
import tomli_w

from mnn import AvgPool2DLayer, Conv2DLayer, MaxPool2DLayer, ReshapeLayer
from mnn.model import build_net, check_fits, model_size

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

F64 = np.float64

# (kernel, stride, padding, bias) on 7 x 9 images: odd sizes, rectangular kernels and steps.
CONV_CASES = {
    "k3x2_s2_p1": ((3, 2), 2, 1, True),
    "k3_s1_p2x1_nobias": (3, 1, (2, 1), False),
    "k2x3_s1x2_p0": ((2, 3), (1, 2), 0, True),
    "k1": (1, 1, 0, True),
    "k7x9_whole_image": ((7, 9), 1, 0, True),
}

# (kernel, stride): tiling windows, overlapping ones (stride < kernel), gaps (stride > kernel).
POOL_CASES = {"k2": (2, None), "k3_s2_overlap": (3, 2), "k2x3_s1": ((2, 3), 1), "k2_s3_gaps": (2, 3)}


def distinct_values(rng, shape):
    """Inputs with no two values within 1e-3 of each other, so that no window's
    maximum is nearly tied and finite differences never cross an arg-max change."""
    values = rng.permutation(np.prod(shape)).reshape(shape) * 1e-2
    return values + 1e-3 * rng.uniform(-0.3, 0.3, shape)


def conv_layer(case, rng, in_channels=3, out_channels=4):
    kernel, stride, padding, bias = CONV_CASES[case]
    layer = Conv2DLayer(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias,
                        dtype=F64, rng=rng)
    if bias:  # a non-zero bias, so that its gradient meets something to check
        layer.params["b"][...] = rng.standard_normal(out_channels)
    return layer


# ------------------------------------------------------------------ finite differences (no torch needed)

@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_gradients_match_finite_differences(case, assert_layer_gradients):
    rng = np.random.default_rng(0)
    assert_layer_gradients(conv_layer(case, rng), rng.standard_normal((2, 3, 7, 9)))


@pytest.mark.parametrize("case", sorted(POOL_CASES))
@pytest.mark.parametrize("pool", [MaxPool2DLayer, AvgPool2DLayer])
def test_pool_gradients_match_finite_differences(pool, case, assert_layer_gradients):
    rng = np.random.default_rng(1)
    kernel, stride = POOL_CASES[case]
    assert_layer_gradients(pool(kernel, stride, dtype=F64), distinct_values(rng, (2, 3, 7, 9)))


def test_conv_input_grad_false_gives_the_same_parameter_gradients():
    rng = np.random.default_rng(2)
    layer, inputs = conv_layer("k3x2_s2_p1", rng), rng.standard_normal((2, 3, 7, 9))
    gradients = rng.standard_normal(layer.forward(inputs).shape)
    layer.zero_grads()
    layer.backward(gradients)
    expected = {key: grad.copy() for key, grad in layer.grads.items()}
    layer.zero_grads()
    assert layer.backward(gradients, input_grad=False) is None
    for key, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, expected[key])
    layer.backward(gradients, input_grad=False)  # gradients accumulate until cleared
    np.testing.assert_allclose(layer.grads["w"], 2 * expected["w"])


def test_max_pool_ties_go_to_the_first_entry_in_c_order():
    # One 3 x 3 window per sample; the maximum 5 appears at the listed offsets.
    images = np.zeros((3, 1, 3, 3))
    images[0, 0, [0, 2], [2, 0]] = 5           # (0, 2) and (2, 0): the first is (0, 2)
    images[1, 0, [1, 1, 2], [0, 2, 1]] = 5     # (1, 0), (1, 2), (2, 1): the first is (1, 0)
    images[2] = 5                              # every entry: the first is (0, 0)
    layer = MaxPool2DLayer(3, dtype=F64)
    np.testing.assert_array_equal(layer.forward(images), np.full((3, 1, 1, 1), 5.0))
    gradients = layer.backward(np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1))
    expected = np.zeros((3, 1, 3, 3))
    expected[0, 0, 0, 2], expected[1, 0, 1, 0], expected[2, 0, 0, 0] = 1, 2, 3
    np.testing.assert_array_equal(gradients, expected)


def test_max_pool_overlapping_windows_add_at_a_shared_arg_max():
    # Windows of 2 with stride 1 over [0, 9, 1]: both windows pick the 9.
    layer = MaxPool2DLayer((1, 2), stride=1, dtype=F64)
    outputs = layer.forward(np.array([0.0, 9.0, 1.0]).reshape(1, 1, 1, 3))
    np.testing.assert_array_equal(outputs.ravel(), [9, 9])
    np.testing.assert_array_equal(layer.backward(np.array([2.0, 3.0]).reshape(1, 1, 1, 2)).ravel(), [0, 5, 0])


def test_layers_keep_float32():
    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for layer in (Conv2DLayer(3, 5, 3, padding=1, rng=0), MaxPool2DLayer(2), AvgPool2DLayer(2)):
        outputs = layer.forward(inputs)
        assert outputs.dtype == np.float32
        assert layer.backward(np.ones_like(outputs)).dtype == np.float32
        assert all(grad.dtype == np.float32 for grad in layer.grads.values())


def test_conv_weights_are_he_initialised_and_seeded():
    layer = Conv2DLayer(16, 32, (3, 5), rng=0)
    assert layer.params["w"].shape == (32, 16, 3, 5) and layer.params["b"].shape == (32,)
    assert abs(layer.params["w"].std() - np.sqrt(2 / (16 * 3 * 5))) < 0.005
    np.testing.assert_array_equal(layer.params["w"], Conv2DLayer(16, 32, (3, 5), rng=0).params["w"])
    assert not np.any(layer.params["b"])
    assert "b" not in Conv2DLayer(1, 2, 3, bias=False).params


@pytest.mark.parametrize("make, inputs, message", [
    (lambda: Conv2DLayer(3, 4, 3), np.zeros((3, 7, 7)), r"expected images of shape \(batch, channels, height, "
                                                        r"width\), got shape \(3, 7, 7\)"),
    (lambda: Conv2DLayer(3, 4, 3), np.zeros((2, 2, 7, 7)), r"expected 3 input channels, got 2"),
    (lambda: Conv2DLayer(3, 4, 5, padding=1), np.zeros((2, 3, 2, 7)),
     r"the kernel \(5, 5\) is larger than the input's height and width \(4, 9\) \(padding \(1, 1\) included"),
    (lambda: Conv2DLayer(3, 4, 3), np.zeros((0, 3, 7, 7)), r"expected at least one sample"),
    (lambda: MaxPool2DLayer(4), np.zeros((2, 3, 3, 8)), r"the kernel \(4, 4\) is larger than"),
    (lambda: AvgPool2DLayer(2), np.zeros((2, 12)), r"expected images of shape"),
])
def test_bad_inputs_are_refused_with_what_was_expected(make, inputs, message):
    with pytest.raises(ValueError, match=message):
        make().forward(inputs)


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2DLayer(0, 4, 3), r"Conv2DLayer: expected in_channels as a positive int, got 0"),
    (lambda: Conv2DLayer(3, 4, (3, 0)), r"Conv2DLayer: kernel: expected an integer >= 1 or a pair of them, "
                                        r"got \(3, 0\)"),
    (lambda: Conv2DLayer(3, 4, 3, stride=[1, 2, 3]), r"stride: expected an integer >= 1 or a pair"),
    (lambda: Conv2DLayer(3, 4, 3, padding=-1), r"padding: expected an integer >= 0 or a pair"),
    (lambda: MaxPool2DLayer(2.5), r"MaxPool2DLayer: kernel: expected an integer >= 1"),
    (lambda: AvgPool2DLayer(2, stride=0), r"AvgPool2DLayer: stride: expected an integer >= 1"),
])
def test_bad_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_backward_checks_the_gradient_shape_and_needs_forward():
    layer = Conv2DLayer(1, 2, 3, rng=0)
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.backward(np.zeros((1, 2, 3, 3)))
    layer.forward(np.zeros((1, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"expected gradients of shape \(1, 2, 3, 3\)"):
        layer.backward(np.zeros((1, 2, 3, 4)))


# ------------------------------------------------------------------ descriptions and sizes

SMALL_CNN = {"layers": [
    {"type": "ReshapeLayer", "shape": [2, 9, 11]},
    {"type": "Conv2DLayer", "in_channels": 2, "out_channels": 4, "kernel": [3, 2], "stride": [1, 1],
     "padding": [1, 1], "bias": True},
    {"type": "ReluLayer"},
    {"type": "MaxPool2DLayer", "kernel": [2, 2], "stride": [2, 2]},
    {"type": "Conv2DLayer", "in_channels": 4, "out_channels": 5, "kernel": [2, 2], "stride": [2, 1],
     "padding": [0, 1], "bias": False},
    {"type": "AvgPool2DLayer", "kernel": [1, 2], "stride": [1, 1]},
    {"type": "ReshapeLayer", "shape": [5 * 2 * 6]},
    {"type": "LinearLayer", "shape": [60, 3], "bias": True},
    {"type": "CrossEntropyLossLayer"},
]}


def small_cnn_data(seed=0, batch_size=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, 2 * 9 * 11)), rng.integers(0, 3, batch_size)


def test_cnn_description_round_trips_through_get_config_and_toml():
    net = build_net(SMALL_CNN, dtype=F64, rng=0)
    assert net.get_config() == SMALL_CNN
    again = build_net(tomllib.loads(tomli_w.dumps({"model": net.get_config()}))["model"], dtype=F64, rng=0)
    for (name, param, _), (other_name, other, _) in zip(net.named_params(), again.named_params()):
        assert name == other_name
        np.testing.assert_array_equal(param, other)
    inputs, labels = small_cnn_data()
    assert np.shape(check_fits(net, inputs, labels)) == ()


def test_short_arguments_are_filled_in():
    net = build_net({"layers": [{"type": "Conv2DLayer", "in_channels": 1, "out_channels": 2, "kernel": 3},
                                {"type": "MaxPool2DLayer", "kernel": 2}]}, rng=0)
    assert net.get_config()["layers"] == [
        {"type": "Conv2DLayer", "in_channels": 1, "out_channels": 2, "kernel": [3, 3], "stride": [1, 1],
         "padding": [0, 0], "bias": True},
        {"type": "MaxPool2DLayer", "kernel": [2, 2], "stride": [2, 2]}]


def test_reshape_flattens_images_in_c_order():
    images = np.arange(2 * 3 * 4 * 5, dtype=F64).reshape(2, 3, 4, 5)
    flat = ReshapeLayer(3 * 4 * 5, dtype=F64).forward(images)
    np.testing.assert_array_equal(flat, images.reshape(2, 60))


def test_model_size_counts_conv_parameters_and_positions():
    size = model_size({"layers": [
        {"type": "Conv2DLayer", "in_channels": 1, "out_channels": 8, "kernel": 3, "padding": 1},
        {"type": "MaxPool2DLayer", "kernel": 2}]}, sample_numbers=28 * 28)
    net = build_net({"layers": [{"type": "Conv2DLayer", "in_channels": 1, "out_channels": 8, "kernel": 3}]})
    assert size.parameters == sum(param.size for _, param, _ in net.named_params()) == 8 * 9 + 8
    # im2col columns (9 per position) and the output (8 per position) of 28 x 28, then the
    # pooled output, 14 x 14 x 8 (max-pooling's backward compares it with its input).
    assert size.activations == (9 + 8) * 28 * 28 + 8 * 14 * 14


# ------------------------------------------------------------------ against PyTorch

def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=1e-9, atol=1e-9, err_msg=what)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_torch(case, torch):
    rng = np.random.default_rng(4)
    layer, inputs = conv_layer(case, rng), rng.standard_normal((3, 3, 7, 9))
    kernel, stride, padding, bias = CONV_CASES[case]
    x = torch.from_numpy(inputs).requires_grad_()
    weight = torch.from_numpy(layer.params["w"].copy()).requires_grad_()
    b = torch.from_numpy(layer.params["b"].copy()).requires_grad_() if bias else None
    y = torch.nn.functional.conv2d(x, weight, b, stride=stride, padding=padding)
    gradients = rng.standard_normal(tuple(y.shape))
    y.backward(torch.from_numpy(gradients))
    assert_close(layer.forward(inputs), y, "outputs")
    assert_close(layer.backward(gradients), x.grad, "input gradient")
    assert_close(layer.grads["w"], weight.grad, "weight gradient")
    if bias:
        assert_close(layer.grads["b"], b.grad, "bias gradient")


@pytest.mark.parametrize("case", sorted(POOL_CASES))
@pytest.mark.parametrize("pool, reference", [(MaxPool2DLayer, "max_pool2d"), (AvgPool2DLayer, "avg_pool2d")])
def test_pool_matches_torch(pool, reference, case, torch):
    rng = np.random.default_rng(5)
    kernel, stride = POOL_CASES[case]
    inputs = distinct_values(rng, (3, 4, 7, 9))
    x = torch.from_numpy(inputs).requires_grad_()
    y = getattr(torch.nn.functional, reference)(x, kernel, stride)
    gradients = rng.standard_normal(tuple(y.shape))
    y.backward(torch.from_numpy(gradients))
    layer = pool(kernel, stride, dtype=F64)
    assert_close(layer.forward(inputs), y, "outputs")
    assert_close(layer.backward(gradients), x.grad, "input gradient")


def test_small_cnn_matches_torch(torch):
    """Reshape, Conv, ReLU, MaxPool, Conv, AvgPool, flatten, Linear and the cross entropy,
    with the same weights: the loss and every gradient as torch's."""
    net = build_net(SMALL_CNN, dtype=F64, rng=0)
    conv1, conv2, linear = net.layers[1], net.layers[4], net.layers[7]
    functional = torch.nn.functional
    weights = {name: torch.from_numpy(param.copy()).requires_grad_() for name, param, _ in net.named_params()}
    inputs, labels = small_cnn_data()
    x = torch.from_numpy(inputs).requires_grad_()
    h = functional.conv2d(x.reshape(-1, 2, 9, 11), weights["1.Conv2DLayer.w"], weights["1.Conv2DLayer.b"],
                          padding=conv1.padding)
    h = functional.max_pool2d(functional.relu(h), 2)
    h = functional.conv2d(h, weights["4.Conv2DLayer.w"], stride=conv2.stride, padding=conv2.padding)
    h = functional.avg_pool2d(h, (1, 2), 1).reshape(len(inputs), -1)
    logits = h @ weights["7.LinearLayer.w"].T + weights["7.LinearLayer.b"]
    loss = functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    assert linear.n_in == h.shape[1]
    net.zero_grads()
    np.testing.assert_allclose(net(inputs, labels), loss.item(), rtol=1e-12)
    input_gradients = net.backward(input_grad=True)[0]
    for name, _, grad in net.named_params():
        assert_close(grad, weights[name].grad, name)
    assert_close(input_gradients, x.grad, "input gradient")


def test_outputs_and_gradients_handed_out_are_never_overwritten():
    # The convolution hands out batch-last views; a later call must not write into them.
    rng = np.random.default_rng(6)
    for layer in (Conv2DLayer(3, 4, 3, padding=1, dtype=F64, rng=0), MaxPool2DLayer(2, dtype=F64),
                  AvgPool2DLayer(2, dtype=F64)):
        first = layer.forward(rng.standard_normal((2, 3, 6, 6)))
        first_gradient = layer.backward(np.ones_like(first))
        kept, kept_gradient = first.copy(), first_gradient.copy()
        layer.backward(layer.forward(rng.standard_normal((2, 3, 6, 6))))
        np.testing.assert_array_equal(first, kept)
        np.testing.assert_array_equal(first_gradient, kept_gradient)


@pytest.mark.parametrize("make", [lambda: Conv2DLayer(3, 4, 3, padding=1, dtype=F64, rng=0),
                                  lambda: MaxPool2DLayer(2, dtype=F64), lambda: AvgPool2DLayer(2, dtype=F64)])
def test_evaluation_gives_the_training_output_and_keeps_nothing(make):
    inputs = np.random.default_rng(7).standard_normal((2, 3, 6, 6))
    layer = make()
    trained = layer.forward(inputs)
    with layer.evaluating():
        np.testing.assert_array_equal(layer.forward(inputs), trained)
        assert not [name for name, value in vars(layer).items() if name not in ("params", "grads")
                    and any(isinstance(item, np.ndarray) for item in (value if isinstance(value, tuple) else (value,)))]
        with pytest.raises(ValueError, match="evaluation mode"):
            layer.backward(np.ones_like(trained))
