"""SequentialLayers: state dicts, dtype casts, hooks, and nets that learn."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mnn import (
    SGD,
    Adam,
    CrossEntropyLossLayer,
    LinearLayer,
    LogSoftmaxLayer,
    MSELossLayer,
    NllLossLayer,
    ReluLayer,
    SequentialLayers,
)


def classifier(seed=0, dtype=np.float32, sizes=(4, 8, 3)):
    rng = np.random.default_rng(seed)
    return SequentialLayers([LinearLayer(sizes[0], sizes[1], dtype=dtype, rng=rng), ReluLayer(dtype=dtype),
                             LinearLayer(sizes[1], sizes[2], dtype=dtype, rng=rng),
                             CrossEntropyLossLayer(dtype=dtype)])


# --- state dicts ------------------------------------------------------------

def test_state_dict_names_and_order_are_deterministic():
    names = [name for name, _, _ in classifier(seed=0).named_params()]
    assert names == ["0.LinearLayer.w", "0.LinearLayer.b", "2.LinearLayer.w", "2.LinearLayer.b"]
    assert list(classifier(seed=1).state_dict()) == names


def test_state_dict_round_trip_through_a_file(tmp_path):
    source, target = classifier(seed=0), classifier(seed=1)
    inputs = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    assert not np.allclose(source(inputs), target(inputs))
    np.savez(tmp_path / "weights.npz", **source.state_dict())
    with np.load(tmp_path / "weights.npz") as saved:
        target.load_state_dict(dict(saved))
    np.testing.assert_array_equal(source(inputs), target(inputs))


def test_state_dict_holds_copies_and_load_weights_is_an_alias():
    net = classifier()
    state = net.state_dict()
    state["0.LinearLayer.w"] += 1
    assert not np.array_equal(state["0.LinearLayer.w"], net.layers[0].params["w"])
    live = net.layers[0].params["w"]
    net.load_weights(state)
    np.testing.assert_array_equal(net.layers[0].params["w"], state["0.LinearLayer.w"])
    assert net.layers[0].params["w"] is live, "loading must copy into the parameters, not rebind them"


def test_load_state_dict_rejects_missing_and_extra_keys():
    net = classifier()
    state = net.state_dict()
    del state["2.LinearLayer.b"]
    with pytest.raises(ValueError, match=r"missing keys \['2.LinearLayer.b'\], unexpected keys \[\]"):
        net.load_state_dict(state)
    state = net.state_dict()
    state["4.LinearLayer.w"] = np.zeros((1, 1))
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['4.LinearLayer.w'\]"):
        net.load_state_dict(state)


def test_load_state_dict_rejects_wrong_shapes_and_loads_nothing():
    net = classifier()
    before = net.state_dict()
    wrong = classifier(seed=1).state_dict()
    wrong["2.LinearLayer.w"] = np.zeros((3, 9))
    with pytest.raises(ValueError, match=r"2.LinearLayer.w expected shape \(3, 8\), got \(3, 9\)"):
        net.load_state_dict(wrong)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} changed by a failed load")


# --- container behaviour ----------------------------------------------------

def test_forward_without_targets_returns_the_prediction():
    net = classifier()
    outputs = net(np.zeros((2, 4), dtype=np.float32))
    assert outputs.shape == (2, 3)
    with pytest.raises(ValueError, match="before a forward with targets"):
        net.backward()


def test_backward_hook_runs_from_the_last_layer_to_the_first():
    net = classifier()
    net(np.ones((2, 4), dtype=np.float32), np.array([0, 2]))
    calls = []
    net.backward(hook=lambda index, layer: calls.append((index, layer.name)))
    assert calls == [(3, "CrossEntropyLossLayer"), (2, "LinearLayer"), (1, "ReluLayer"), (0, "LinearLayer")]


def test_rebound_grads_are_written_in_place():
    net = classifier(dtype=np.float64)
    inputs, labels = np.random.default_rng(0).standard_normal((3, 4)), np.array([0, 1, 2])
    net(inputs, labels)
    net.backward()
    expected = {name: grad.copy() for name, _, grad in net.named_params()}
    buffer = np.zeros(sum(grad.size for grad in expected.values()))
    views, offset = {}, 0
    for name, grad in expected.items():
        views[name] = buffer[offset:offset + grad.size].reshape(grad.shape)
        offset += grad.size
    net.rebind_grads(views)
    net.zero_grads()
    net(inputs, labels)
    net.backward()
    for name, view in views.items():
        np.testing.assert_allclose(view, expected[name], rtol=1e-14, err_msg=name)


def test_astype_to_the_same_dtype_keeps_params_and_rebound_grads():
    net = classifier()
    buffers = {name: np.zeros_like(grad) for name, _, grad in net.named_params()}
    net.rebind_grads(buffers)
    params = {name: param for name, param, _ in net.named_params()}
    net.astype(np.float32)
    for name, param, grad in net.named_params():
        assert param is params[name] and grad is buffers[name], name


def test_layers_must_be_layers_and_the_loss_must_come_last():
    with pytest.raises(TypeError, match="layer 1 is a str"):
        SequentialLayers([LinearLayer(2, 2, rng=0), "relu"])
    with pytest.raises(ValueError, match="the loss layer CrossEntropyLossLayer must come last, found at 0"):
        SequentialLayers([CrossEntropyLossLayer(), LinearLayer(2, 2, rng=0)])


def test_astype_float64_casts_every_parameter_grad_and_output():
    net = classifier().astype(np.float64)
    for name, param, grad in net.named_params():
        assert param.dtype == np.float64 and grad.dtype == np.float64, name
    loss = net(np.ones((2, 4), dtype=np.float32), np.array([0, 1]))
    assert np.asarray(loss).dtype == np.float64
    net.backward()
    assert all(grad.dtype == np.float64 for _, _, grad in net.named_params())


def test_float32_net_stays_float32():
    net = classifier()
    loss = net(np.ones((2, 4), dtype=np.float64), np.array([0, 1]))
    assert np.asarray(loss).dtype == np.float32
    net.backward()
    assert all(param.dtype == np.float32 and grad.dtype == np.float32 for _, param, grad in net.named_params())


# --- nets that learn ----------------------------------------------------------

def toy_regression(rng):
    inputs = rng.standard_normal((64, 3)).astype(np.float32)
    targets = np.stack([np.sin(inputs[:, 0]) + inputs[:, 1] ** 2, np.abs(inputs[:, 2])], axis=1)
    layers = [LinearLayer(3, 16, rng=rng), ReluLayer(), LinearLayer(16, 2, rng=rng), ReluLayer(), MSELossLayer()]
    return layers, inputs, targets


def toy_classification(rng, head):
    inputs = rng.standard_normal((64, 3)).astype(np.float32)
    labels = (inputs[:, 0] > 0).astype(int) + (inputs[:, 1] > 0).astype(int)
    return [LinearLayer(3, 16, rng=rng), ReluLayer(), LinearLayer(16, 3, rng=rng)] + head, inputs, labels


# The seed's three toy pipelines.
PIPELINES = {
    "linear_relu_linear_relu_mse": toy_regression,
    "linear_relu_linear_cross_entropy": lambda rng: toy_classification(rng, [CrossEntropyLossLayer()]),
    "linear_relu_linear_log_softmax_nll": lambda rng: toy_classification(rng, [LogSoftmaxLayer(), NllLossLayer()]),
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_toy_pipelines_learn(pipeline):
    layers, inputs, targets = PIPELINES[pipeline](np.random.default_rng(0))
    net = SequentialLayers(layers)
    first = net(inputs, targets)
    for _ in range(200):
        net.zero_grads()
        net(inputs, targets)
        net.backward()
        net.step(lr=0.05)
    assert net(inputs, targets) < 0.5 * first


def digits_split():
    """scikit-learn's 8x8 digits scaled to [0, 1], split 1400 train / 397 test."""
    digits = load_digits()
    inputs, labels = (digits.data / 16).astype(np.float32), digits.target
    order = np.random.default_rng(0).permutation(len(labels))
    return inputs, labels, order[:1400], order[1400:]


def digits_mlp(rng):
    return SequentialLayers([LinearLayer(64, 64, rng=rng), ReluLayer(), LinearLayer(64, 10, rng=rng),
                             CrossEntropyLossLayer()])


def train_epochs(net, optimizer, inputs, labels, indices, epochs, rng, batch_size=32):
    for _ in range(epochs):
        shuffled = rng.permutation(indices)
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start:start + batch_size]
            optimizer.zero_grads()
            net(inputs[batch], labels[batch])
            net.backward()
            optimizer.step()


@pytest.mark.parametrize("make_optimizer", [
    lambda net: Adam(net, lr=3e-3),
    lambda net: SGD(net, lr=0.05, momentum=0.9, nesterov=True),
], ids=["adam", "sgd_nesterov"])
def test_digits_mlp_reaches_high_test_accuracy(make_optimizer):
    inputs, labels, train, test = digits_split()
    rng = np.random.default_rng(1)
    net = digits_mlp(rng)
    train_epochs(net, make_optimizer(net), inputs, labels, train, epochs=10, rng=rng)
    assert net(inputs[train], labels[train]) < 0.2
    accuracy = np.mean(net(inputs[test]).argmax(axis=1) == labels[test])
    assert accuracy > 0.9, f"test accuracy {accuracy:.3f}"


# --- the seed's own client calls ---------------------------------------------------
# Each test below is a call the seed library's examples/mnist.py or the toy
# pipelines in its seq_layers.py make, with NumPy arrays in place of its tensors.

def seed_batch(batch_size=8, features=28 * 28, classes=10, seed=0):
    """Images as the seed's column vectors (B, 784, 1) and labels (B, 1)."""
    rng = np.random.default_rng(seed)
    return rng.random((batch_size, features, 1)), rng.integers(0, classes, (batch_size, 1))


def seed_mnist_net():
    from mnn.seq_layers import CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
    return SequentialLayers([LinearLayer(28 * 28, 256), ReluLayer(), LinearLayer(256, 10), CrossEntropyLossLayer()])


def test_star_import_of_seq_layers_gives_every_layer_class():
    namespace = {}
    exec("from mnn.seq_layers import *", namespace)
    import mnn.layer
    for name in ["SequentialLayers", "Residual", *mnn.layer.__all__]:
        assert name in namespace, name
    assert namespace["LinearLayer"] is LinearLayer


def test_forward_with_debug_traces_each_layer(capsys):
    images, labels = seed_batch()
    loss = seed_mnist_net()(images, labels, debug=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["forward", "0", "LinearLayer"], ["forward", "1", "ReluLayer"], ["forward", "2", "LinearLayer"],
        ["forward", "3", "CrossEntropyLossLayer"]]
    assert "(8, 784, 1) => (8, 256, 1) sum:" in lines[0]
    assert lines[-1].endswith(f"=> () sum: {float(loss):.6g}")


def test_backward_with_debug_returns_per_layer_gradients_the_seed_loop_zips(capsys):
    images, labels = seed_batch()
    net = seed_mnist_net()
    net(images, labels)
    net.zero_grads()
    gradients = net.backward(debug=True)
    trace = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in trace] == [
        ["backward", "3", "CrossEntropyLossLayer"], ["backward", "2", "LinearLayer"],
        ["backward", "1", "ReluLayer"], ["backward", "0", "LinearLayer"]]
    # The seed's debug loop, as it is written there.
    for layer, grads in zip(net.layers, gradients):
        print(layer.name, 'gradients sum:', grads.sum())
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert [grad.shape for grad in gradients] == [(8, 784, 1), (8, 256, 1), (8, 256, 1), (8, 10, 1)]
    net.step()


def test_backward_returns_each_layers_input_gradient_in_layer_order():
    images, labels = seed_batch()
    net = seed_mnist_net()
    net(images, labels)
    gradients = net.backward()
    assert len(gradients) == len(net.layers) and gradients[0] is None  # the input is data
    np.testing.assert_array_equal(gradients[1], gradients[2] * (net.layers[1]._outputs > 0))


def test_get_config_and_load_weights_with_config_as_the_seed_mnist_test_does(capsys, tmp_path):
    images, labels = seed_batch()
    trained = seed_mnist_net()
    trained(images, labels)
    trained.backward()
    trained.step()
    save = trained.state_dict(), trained.get_config()
    state_dict, config = save

    from mnn.seq_layers import LinearLayer, ReluLayer, SequentialLayers, SoftmaxLayer
    net = SequentialLayers([LinearLayer(28 * 28, 256), ReluLayer(), LinearLayer(256, 10), SoftmaxLayer()])
    net.load_weights(state_dict, config=config, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "loading weights to: 0.LinearLayer.w (256, 784)", "loading weights to: 0.LinearLayer.b (256,)",
        "loading weights to: 2.LinearLayer.w (10, 256)", "loading weights to: 2.LinearLayer.b (10,)"]
    scores = net(images).squeeze(-1)
    np.testing.assert_allclose(scores.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(-1), trained(images).squeeze(-1).argmax(-1))
    # The seed's own config form, {"layers": count}, is checked the same way.
    net.load_weights(state_dict, config={"layers": 4})


def test_load_weights_refuses_a_config_of_another_net():
    state_dict, config = seed_mnist_net().state_dict(), seed_mnist_net().get_config()
    three = SequentialLayers([LinearLayer(28 * 28, 256), ReluLayer(), LinearLayer(256, 10)])
    with pytest.raises(ValueError, match="the config describes 4 layers, this net has 3"):
        three.load_weights(state_dict, config=config)
    no_bias = SequentialLayers([LinearLayer(28 * 28, 256), ReluLayer(), LinearLayer(256, 10, bias=False),
                                CrossEntropyLossLayer()])
    with pytest.raises(ValueError, match=r"layer 2 is \{'type': 'LinearLayer', 'shape': \[256, 10\], "
                                         r"'bias': False\}, but the config has .*'bias': True"):
        no_bias.load_weights(state_dict, config=config)
    with pytest.raises(ValueError, match="expected config to be a net's get_config"):
        seed_mnist_net().load_weights(state_dict, config=[4])


def test_seed_toy_pipeline_with_column_inputs_and_no_bias_learns():
    # The seed's seq_layers.py testcase 1: randn (B, 32, 1) inputs, (B, 10) targets.
    from mnn.seq_layers import LinearLayer, MSELossLayer, ReluLayer, SequentialLayers
    rng = np.random.default_rng(0)
    inputs, targets = rng.standard_normal((4, 32, 1)), np.abs(rng.standard_normal((4, 10)))
    net = SequentialLayers([LinearLayer(32, 40, rng=rng), ReluLayer(), LinearLayer(40, 10, bias=False, rng=rng),
                            ReluLayer(), MSELossLayer()])
    first = net(inputs, targets)
    for _ in range(20):
        net(inputs, targets)
        net.zero_grads()
        gradients = net.backward()
        net.step()
    assert len(gradients) == 5 and net(inputs, targets) < first


def test_matrix_product_of_plain_matrices_as_the_seed_computed_it():
    from mnn.seq_layers import MatrixProduct
    rng = np.random.default_rng(0)
    Q, P, gradients = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal((3, 4))
    product = MatrixProduct(dtype=np.float64)
    np.testing.assert_array_equal(product.forward((Q, P)), Q @ P)
    grads_Q, grads_P = product.backward(gradients)
    np.testing.assert_allclose(grads_Q, gradients @ P.T)
    np.testing.assert_allclose(grads_P, Q.T @ gradients)
