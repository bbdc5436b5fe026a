"""BatchNormLayer: gradients, running statistics and evaluation against PyTorch (float64),
finite differences without it, buffers in state dicts, and the batch reduction: two
layer copies whose reduction sums their halves of a batch compute what one layer
computes on the whole batch (ranks emulated by two threads in one process).
"""

import threading

import numpy as np
import pytest

from mnn import SGD, Adam, BatchNormLayer, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.model import build_net, model_size
from mnn.seq_layers import Residual

F64 = np.float64
# (B, C) and (B, C, *spatial) inputs of odd sizes.
SHAPES = [(7, 5), (5, 3, 7), (5, 3, 7, 9), (3, 2, 3, 5)]


def random_layer(channels, seed=0, **kwargs):
    """A float64 BatchNormLayer with a random gain and bias (ones and zeros hide mistakes)."""
    rng = np.random.default_rng(seed)
    layer = BatchNormLayer(channels, dtype=F64, **kwargs)
    layer.params["g"][...] = rng.uniform(0.5, 2.0, channels)
    layer.params["b"][...] = rng.standard_normal(channels)
    return layer


def batch(rng, shape):
    """Values far from mean 0 and variance 1, per channel, so normalising matters."""
    channel_shape = (1, shape[1]) + (1,) * (len(shape) - 2)
    return rng.standard_normal(shape) * rng.uniform(0.5, 3.0, channel_shape) + rng.uniform(-5, 5, channel_shape)


def torch_twin(torch, layer, ndim):
    """PyTorch's BatchNorm1d (inputs (B, C) or (B, C, L)) or BatchNorm2d with the layer's numbers."""
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    twin = cls(layer.channels, eps=layer.eps, momentum=layer.momentum)
    with torch.no_grad():
        twin.weight[...] = torch.from_numpy(layer.params["g"].copy())
        twin.bias[...] = torch.from_numpy(layer.params["b"].copy())
    return twin


@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_gradients_and_running_statistics_are_pytorchs(torch, shape):
    rng = np.random.default_rng(1)
    layer = random_layer(shape[1])
    twin = torch_twin(torch, layer, len(shape))
    for _ in range(4):  # several steps: the running statistics accumulate
        x, upstream = batch(rng, shape), rng.standard_normal(shape)
        layer.zero_grads()
        outputs = layer.forward(x)
        input_gradient = layer.backward(upstream)
        x_torch = torch.from_numpy(x.copy()).requires_grad_()
        twin.zero_grad()
        expected = twin(x_torch)
        (expected * torch.from_numpy(upstream)).sum().backward()
        np.testing.assert_allclose(outputs, expected.detach().numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(input_gradient, x_torch.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.grads["g"], twin.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.grads["b"], twin.bias.grad.numpy(), rtol=1e-9, atol=1e-12)
    # momentum 0.1 weighs the new batch; the running variance is the unbiased one
    np.testing.assert_allclose(layer.buffers["running_mean"], twin.running_mean.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], twin.running_var.numpy(), rtol=1e-9, atol=1e-12)
    x = batch(rng, shape)
    with layer.evaluating():
        outputs = layer.forward(x)
    twin.eval()
    np.testing.assert_allclose(outputs, twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-9, atol=1e-12)


def test_a_cnn_with_batchnorm_matches_torch(torch):
    """Conv (stride 1, padding 1), BatchNorm, ReLU, MaxPool, Conv (stride 2), BatchNorm, flatten,
    Linear and the cross entropy on odd-sized images: the loss, every parameter's gradient, the
    input's gradient and the running statistics as torch's, in float64 to 1e-9."""
    description = {"layers": [
        {"type": "Conv2DLayer", "in_channels": 2, "out_channels": 3, "kernel": 3, "padding": 1},
        {"type": "BatchNormLayer", "channels": 3}, {"type": "ReluLayer"}, {"type": "MaxPool2DLayer", "kernel": 2},
        {"type": "Conv2DLayer", "in_channels": 3, "out_channels": 4, "kernel": [2, 3], "stride": 2},
        {"type": "BatchNormLayer", "channels": 4}, {"type": "ReshapeLayer", "shape": [4]},
        {"type": "LinearLayer", "shape": [4, 5]}, {"type": "CrossEntropyLossLayer"}]}
    net = build_net(description, dtype=F64, rng=0)
    rng = np.random.default_rng(1)
    images, labels = batch(rng, (6, 2, 7, 9)), rng.integers(0, 5, 6)
    for norm in (net.layers[1], net.layers[5]):  # a gain and bias other than ones and zeros
        norm.params["g"][...] = rng.uniform(0.5, 2.0, norm.channels)
        norm.params["b"][...] = rng.standard_normal(norm.channels)
    functional = torch.nn.functional
    weights = {name: torch.from_numpy(param.copy()).requires_grad_() for name, param, _ in net.named_params()}
    running = {index: (torch.zeros(channels), torch.ones(channels)) for index, channels in ((1, 3), (5, 4))}

    def normalised(h, index):
        mean, var = running[index]
        return functional.batch_norm(h, mean, var, weights[f"{index}.BatchNormLayer.g"],
                                     weights[f"{index}.BatchNormLayer.b"], training=True, momentum=0.1, eps=1e-5)

    x = torch.from_numpy(images).requires_grad_()
    h = functional.conv2d(x, weights["0.Conv2DLayer.w"], weights["0.Conv2DLayer.b"], padding=1)
    h = functional.max_pool2d(functional.relu(normalised(h, 1)), 2)
    h = functional.conv2d(h, weights["4.Conv2DLayer.w"], weights["4.Conv2DLayer.b"], stride=2)
    logits = normalised(h, 5).reshape(6, -1) @ weights["7.LinearLayer.w"].T + weights["7.LinearLayer.b"]
    loss = functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    assert net(images, labels) == pytest.approx(loss.item(), rel=1e-12)
    input_grad = net.backward(input_grad=True)[0]
    np.testing.assert_allclose(input_grad, x.grad.numpy(), rtol=1e-9, atol=1e-12)
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, weights[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    for index, (mean, var) in running.items():
        np.testing.assert_allclose(net.layers[index].buffers["running_mean"], mean.numpy(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(net.layers[index].buffers["running_var"], var.numpy(), rtol=1e-9)


def test_momentum_one_keeps_the_last_batch_and_zero_keeps_the_start():
    x = batch(np.random.default_rng(2), (6, 3, 2))
    last, frozen = random_layer(3, momentum=1.0), random_layer(3, momentum=0.0)
    for layer in (last, frozen):
        layer.forward(x)
    np.testing.assert_allclose(last.buffers["running_mean"], x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(last.buffers["running_var"], x.var(axis=(0, 2), ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(frozen.buffers["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(frozen.buffers["running_var"], np.ones(3))


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 3, 5)])
def test_gradients_match_finite_differences(shape, assert_layer_gradients):
    layer = random_layer(shape[1], momentum=0.0)  # forwards for differences leave the running statistics
    assert_layer_gradients(layer, batch(np.random.default_rng(3), shape))


def test_evaluation_uses_the_running_statistics_and_keeps_nothing_for_backward():
    layer = random_layer(3)
    layer.buffers["running_mean"][...] = [1.0, -2.0, 0.5]
    layer.buffers["running_var"][...] = [4.0, 0.25, 1.0]
    x = batch(np.random.default_rng(4), (5, 3, 2, 2))
    with layer.evaluating():
        outputs = layer.forward(x)
        with pytest.raises(ValueError, match="BatchNormLayer: backward called"):
            layer.backward(np.ones_like(x))
    mean, var = (layer.buffers[key][None, :, None, None] for key in ("running_mean", "running_var"))
    expected = (x - mean) / np.sqrt(var + layer.eps) * layer.params["g"][None, :, None, None] \
        + layer.params["b"][None, :, None, None]
    np.testing.assert_allclose(outputs, expected, rtol=1e-12)
    np.testing.assert_array_equal(layer.buffers["running_mean"], [1.0, -2.0, 0.5])  # evaluation changes nothing


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match="momentum"):
        BatchNormLayer(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps > 0"):
        BatchNormLayer(3, eps=0)
    with pytest.raises(ValueError, match="channels"):
        BatchNormLayer(0)
    layer = BatchNormLayer(3)
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1 .* got 4"):
        layer.forward(np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer.forward(np.zeros((1, 3)))
    with pytest.raises(TypeError, match="set_batch_reduction: expected a function"):
        layer.set_batch_reduction(3)


# ---------------------------------------------------------------- buffers: saved, never stepped
def bn_net(seed=0, hidden=6):
    return SequentialLayers([LinearLayer(5, hidden, rng=seed, dtype=F64), BatchNormLayer(hidden, dtype=F64),
                             ReluLayer(dtype=F64), LinearLayer(hidden, 3, rng=seed + 1, dtype=F64),
                             CrossEntropyLossLayer(dtype=F64)])


def train_steps(net, optimizer, steps, seed=5, batch_size=9):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        net(rng.standard_normal((batch_size, 5)), rng.integers(0, 3, batch_size))
        net.backward()
        optimizer.step()
        optimizer.zero_grads()


def test_running_statistics_are_buffers_saved_with_the_model_but_never_stepped():
    net = bn_net()
    names = [name for name, _, _ in net.named_params()]
    assert "1.BatchNormLayer.g" in names and not any("running" in name for name in names)
    assert [name for name, _, _ in net.buffer_slots()] == ["1.BatchNormLayer.running_mean",
                                                            "1.BatchNormLayer.running_var"]
    optimizer = Adam(net, lr=0.01)
    train_steps(net, optimizer, 3)
    assert not any("running" in key for key in optimizer.state_dict())
    state = net.state_dict()
    assert not np.array_equal(state["1.BatchNormLayer.running_var"], np.ones(6))  # moved by the batches
    copy = bn_net(seed=9)
    copy.load_state_dict(state)
    for name, value in copy.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    x = np.random.default_rng(6).standard_normal((4, 5))
    with net.evaluating(), copy.evaluating():
        np.testing.assert_array_equal(copy(x), net(x))
    del state["1.BatchNormLayer.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys \['1.BatchNormLayer.running_mean'\]"):
        copy.load_state_dict(state)


def test_a_state_dict_without_batchnorm_keeps_its_keys():
    net = SequentialLayers([LinearLayer(4, 3, rng=0), ReluLayer(), LinearLayer(3, 2, rng=1)])
    assert sorted(net.state_dict()) == ["0.LinearLayer.b", "0.LinearLayer.w", "2.LinearLayer.b", "2.LinearLayer.w"]


def test_buffers_inside_a_residual_are_named_below_it_and_cast_with_the_net():
    net = SequentialLayers([LinearLayer(4, 4, rng=0, dtype=F64), Residual([BatchNormLayer(4, dtype=F64)])])
    assert "1.Residual.0.BatchNormLayer.running_var" in net.state_dict()
    net.astype(np.float32)
    assert all(value.dtype == np.float32 for value in net.state_dict().values())


def test_descriptions_build_it_and_count_its_parameters():
    description = {"layers": [{"type": "LinearLayer", "shape": [5, 6]},
                              {"type": "BatchNormLayer", "channels": 6, "momentum": 0.05},
                              {"type": "CrossEntropyLossLayer"}]}
    net = build_net(description, rng=0)
    assert net.get_config()["layers"][1] == {"type": "BatchNormLayer", "channels": 6, "eps": 1e-5, "momentum": 0.05}
    assert model_size(description).parameters == 5 * 6 + 6 + 2 * 6


# ---------------------------------------------------------------- the batch reduction
class ThreadSum:
    """``reduce`` for ``ranks`` threads: each hands in its array, all get the sum, added
    in rank order (as a deterministic all-reduce would). Two barriers per call: the sum
    is read before any rank hands in its next array."""

    def __init__(self, ranks):
        self.arrays = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=30)
        self.calls = 0

    def for_rank(self, rank):
        def reduce(array):
            self.arrays[rank] = np.array(array, copy=True)
            self.barrier.wait()
            total = sum(self.arrays[1:], self.arrays[0].copy())
            self.calls += rank == 0
            self.barrier.wait()
            return total
        return reduce


def run_ranks(work, summing):
    """``work(rank)`` in one thread per rank of ``summing``; the results in rank order. A
    failing rank breaks the barrier, so the others stop too, and its error is raised."""
    ranks = len(summing.arrays)
    results, errors = [None] * ranks, []

    def run(rank):
        try:
            results[rank] = work(rank)
        except Exception as error:  # re-raised below, in the test's thread
            errors.append(error)
            summing.barrier.abort()
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("shape", [(9, 4), (7, 3, 3, 5)])
@pytest.mark.parametrize("sizes", [(5, 4), (3, 3, 1), (6, 0, 3)])
def test_shards_with_a_summing_reduction_compute_the_whole_batch(shape, sizes):
    """Shards of uneven sizes (an empty one too) each hold the upstream gradient of the
    global loss for their rows; with the reduction their outputs, input gradients, summed
    parameter gradients and running statistics are the one layer's on the whole batch."""
    shape = (sum(sizes),) + shape[1:]
    rng = np.random.default_rng(7)
    x, upstream = batch(rng, shape), rng.standard_normal(shape)
    whole = random_layer(shape[1])
    expected = whole.forward(x), whole.backward(upstream)
    bounds = np.cumsum((0,) + sizes)
    summing = ThreadSum(len(sizes))

    def rank_work(rank):
        layer = random_layer(shape[1])
        layer.set_batch_reduction(summing.for_rank(rank))
        rows = slice(bounds[rank], bounds[rank + 1])
        if sizes[rank] == 0:
            layer.forward_no_samples()
            layer.backward_no_samples()
            return None, None, layer
        return layer.forward(x[rows]), layer.backward(upstream[rows]), layer

    results = run_ranks(rank_work, summing)
    assert summing.calls == 3  # two in forward, one in backward
    shown = [result for result in results if result[0] is not None]
    np.testing.assert_allclose(np.concatenate([outputs for outputs, _, _ in shown]), expected[0], rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(np.concatenate([grads for _, grads, _ in shown]), expected[1], rtol=1e-9, atol=1e-12)
    for key in ("g", "b"):
        np.testing.assert_allclose(sum(layer.grads[key] for _, _, layer in results), whole.grads[key], rtol=1e-9)
    for _, _, layer in results:
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(layer.buffers[key], whole.buffers[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("sizes", [(5, 4), (4, 3, 2)])
def test_nets_on_shards_with_weighted_losses_train_as_one_net(sizes):
    """The data-parallel recipe in one process: each shard's loss weighted by b_r / B
    (``backward(scale=...)``), parameter gradients summed, one SGD step each. With the
    reduction the shards train the one net; without it (per-shard statistics) they do
    not, so the comparison can fail."""
    total = sum(sizes)
    rng = np.random.default_rng(8)
    x, labels = rng.standard_normal((total, 5)) * 3 + 1, rng.integers(0, 3, total)
    whole = bn_net()
    whole(x, labels)
    whole.backward()
    SGD(whole, lr=0.5).step()

    def shards_after_one_step(reduced):
        summing = ThreadSum(len(sizes))
        bounds = np.cumsum((0,) + sizes)

        def rank_work(rank):
            net = bn_net()
            net.set_batch_reduction(summing.for_rank(rank) if reduced else None)
            rows = slice(bounds[rank], bounds[rank + 1])
            net(x[rows], labels[rows])
            net.backward(scale=sizes[rank] / total)
            return net
        nets = run_ranks(rank_work, summing)
        for name, param, _ in nets[0].named_params():
            param -= 0.5 * sum(dict((n, g) for n, _, g in net.named_params())[name] for net in nets)
        return nets[0]

    expected = whole.state_dict()
    for name, value in shards_after_one_step(reduced=True).state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    per_shard = shards_after_one_step(reduced=False).state_dict()
    assert max(np.abs(per_shard[name] - expected[name]).max() for name in expected) > 1e-3
