"""SGD and Adam against hand-written float64 references, and optimizer-state round trips."""

import numpy as np
import pytest

from mnn import SGD, Adam, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers


def small_net(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return SequentialLayers([LinearLayer(3, 4, dtype=dtype, rng=rng), ReluLayer(dtype=dtype),
                             LinearLayer(4, 2, dtype=dtype, rng=rng), CrossEntropyLossLayer(dtype=dtype)])


def gradient_sequence(net, steps, seed=1):
    """Fixed random gradients per step and parameter, so the reference sees the same ones."""
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(param.shape) for name, param, _ in net.named_params()}
            for _ in range(steps)]


def run_optimizer(net, optimizer, gradients):
    for step_gradients in gradients:
        for name, _, grad in net.named_params():
            grad[...] = step_gradients[name]
        optimizer.step()


def reference_sgd(params, gradients, lr, momentum, nesterov, weight_decay):
    """PyTorch's SGD written out: v <- mu v + g; step along g + mu v (Nesterov) or v."""
    params = {name: value.copy() for name, value in params.items()}
    velocity = {name: np.zeros_like(value) for name, value in params.items()}
    for step_gradients in gradients:
        for name in params:
            g = step_gradients[name] + weight_decay * params[name]
            velocity[name] = momentum * velocity[name] + g
            if momentum == 0:
                update = g
            elif nesterov:
                update = g + momentum * velocity[name]
            else:
                update = velocity[name]
            params[name] = params[name] - lr * update
    return params


def reference_adam(params, gradients, lr, beta1, beta2, eps, weight_decay):
    params = {name: value.copy() for name, value in params.items()}
    first = {name: np.zeros_like(value) for name, value in params.items()}
    second = {name: np.zeros_like(value) for name, value in params.items()}
    for t, step_gradients in enumerate(gradients, start=1):
        for name in params:
            g = step_gradients[name] + weight_decay * params[name]
            first[name] = beta1 * first[name] + (1 - beta1) * g
            second[name] = beta2 * second[name] + (1 - beta2) * g ** 2
            corrected_first = first[name] / (1 - beta1 ** t)
            corrected_second = second[name] / (1 - beta2 ** t)
            params[name] = params[name] - lr * corrected_first / (np.sqrt(corrected_second) + eps)
    return params


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, True, 0.0), (0.8, True, 0.05),
])
@pytest.mark.parametrize("steps", [1, 3])
def test_sgd_matches_the_reference(momentum, nesterov, weight_decay, steps):
    net = small_net()
    start = net.state_dict()
    gradients = gradient_sequence(net, steps)
    run_optimizer(net, SGD(net, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), gradients)
    expected = reference_sgd(start, gradients, 0.1, momentum, nesterov, weight_decay)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-13, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("steps", [1, 3])
def test_adam_matches_the_reference(weight_decay, steps):
    net = small_net()
    start = net.state_dict()
    gradients = gradient_sequence(net, steps)
    run_optimizer(net, Adam(net, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay), gradients)
    expected = reference_adam(start, gradients, 0.01, 0.8, 0.99, 1e-6, weight_decay)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-13, atol=1e-15, err_msg=name)


OPTIMIZERS = {
    "sgd_momentum": lambda net: SGD(net, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda net: SGD(net, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda net: Adam(net, lr=0.01, weight_decay=1e-3),
}


def train_steps(net, optimizer, batches):
    for inputs, labels in batches:
        optimizer.zero_grads()
        net(inputs, labels)
        net.backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_resuming_from_saved_state_continues_identically(optimizer_name, tmp_path):
    make_optimizer = OPTIMIZERS[optimizer_name]
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((8, 3)).astype(np.float32), rng.integers(0, 2, size=8)) for _ in range(6)]
    original = small_net(dtype=np.float32)
    original_optimizer = make_optimizer(original)
    train_steps(original, original_optimizer, batches[:3])
    np.savez(tmp_path / "net.npz", **original.state_dict())
    np.savez(tmp_path / "optimizer.npz", **original_optimizer.state_dict())

    resumed = small_net(seed=9, dtype=np.float32)
    resumed_optimizer = make_optimizer(resumed)
    with np.load(tmp_path / "net.npz") as saved:
        resumed.load_state_dict(dict(saved))
    with np.load(tmp_path / "optimizer.npz") as saved:
        resumed_optimizer.load_state_dict(dict(saved))

    train_steps(original, original_optimizer, batches[3:])
    train_steps(resumed, resumed_optimizer, batches[3:])
    for name, value in original.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    for key, value in original_optimizer.state_dict().items():
        np.testing.assert_array_equal(resumed_optimizer.state_dict()[key], value, err_msg=key)


def test_optimizer_state_dict_holds_copies_in_the_parameter_dtype():
    net = small_net(dtype=np.float32)
    optimizer = SGD(net, lr=0.1, momentum=0.9)
    train_steps(net, optimizer, [(np.ones((2, 3), dtype=np.float32), np.array([0, 1]))])
    state = optimizer.state_dict()
    assert sorted(state) == sorted(f"momentum.{name}" for name, _, _ in net.named_params())
    for key, value in state.items():
        assert value.dtype == np.float32, key
        value += 1
    assert not any(np.array_equal(state[key], value) for key, value in optimizer.state_dict().items())


def test_learning_rate_is_settable():
    net = small_net()
    start = net.state_dict()
    optimizer = SGD(net, lr=0.1)
    optimizer.lr = 0.5
    gradients = gradient_sequence(net, 1)
    run_optimizer(net, optimizer, gradients)
    expected = reference_sgd(start, gradients, 0.5, 0.0, False, 0.0)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-13)


@pytest.mark.parametrize("make, message", [
    (lambda net: SGD(net, lr=0), r"SGD: expected lr > 0, got 0"),
    (lambda net: SGD(net, momentum=1.0), r"SGD: expected 0 <= momentum < 1, got 1.0"),
    (lambda net: SGD(net, nesterov=True), r"SGD: Nesterov momentum needs momentum > 0"),
    (lambda net: SGD(net, weight_decay=-1), r"SGD: expected weight_decay >= 0, got -1"),
    (lambda net: Adam(net, betas=(0.9, 1.0)), r"Adam: expected betas in \[0, 1\)"),
])
def test_bad_hyperparameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make(small_net())


def test_optimizer_needs_a_net():
    with pytest.raises(TypeError, match="SGD: expected a net with named_params"):
        SGD([np.zeros(3)], lr=0.1)


def test_loading_optimizer_state_of_wrong_names_or_shapes_raises():
    optimizer = SGD(small_net(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: momentum.0.LinearLayer.w expected shape \(4, 3\), "
                                         r"got \(3, 4\)"):
        optimizer.load_state_dict({"momentum.0.LinearLayer.w": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="momentum.5.LinearLayer.w names no parameter of the net"):
        optimizer.load_state_dict({"momentum.5.LinearLayer.w": np.zeros((4, 3))})


def test_loading_another_optimizers_state_raises():
    net = small_net()
    adam = Adam(net)
    train_steps(net, adam, [(np.ones((2, 3)), np.array([0, 1]))])
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: unexpected key"):
        SGD(net, lr=0.1, momentum=0.9).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: missing key 'step'"):
        Adam(net).load_state_dict({})
