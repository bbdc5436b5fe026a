"""The CNN of ``mnn-bench --model cnn``: the Fashion-MNIST net in mnn and in PyTorch, from the same weights.

The net (:func:`cnn_description`, the ``[model]`` table of
``examples/fashion_cnn.toml``) is two blocks of [3x3 convolution with padding
1, BatchNorm, ReLU, 2x2 max-pooling] on 28x28 greyscale images (32 then 64
channels), then Linear 3136-128, ReLU, Linear 128-10 and cross entropy (the
example adds dropout before the last Linear, which the benchmark leaves out).
:func:`torch_cnn` writes the same net in PyTorch as a PyTorch user would (an
``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d``, ``MaxPool2d``, ...) and copies
mnn's parameters and running statistics into it; both BatchNorms weigh a new
batch by ``momentum`` = 0.1 and keep the unbiased variance, so both compute the
same loss and the same running statistics from the same batch.

A step is forward, backward and an SGD update with momentum 0.9 (the same
formula in both), in float32, on a batch of random images (``batch`` per
rank, 784 pixels each, drawn from the rank). :func:`layer_profile` splits
mnn's step by layer class. Usage::

    from mnn.distributed.experiments.bench import measure
    from mnn.distributed.experiments.cnn_bench import cnn_steps
    results = measure(cnn_steps(64, comm), comm, batch_size=64)

PyTorch is a reference only, imported lazily: without it :func:`cnn_steps`
gives mnn's step alone. On several ranks PyTorch runs as DDP, whose
``BatchNorm2d`` normalises with each rank's own batch (PyTorch's
``SyncBatchNorm`` needs a GPU), while mnn's BatchNormLayer all-reduces the
global batch's statistics: three small all-reduces per layer and step more.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from mnn import SGD, SequentialLayers
from mnn.layer import (BatchNormLayer, Conv2DLayer, CrossEntropyLossLayer, LinearLayer, MaxPool2DLayer, ReluLayer,
                       ReshapeLayer)
from mnn.model import build_net
from mnn.distributed.comm import Communicator
from mnn.distributed.data_parallel import DEFAULT_BUCKET_BYTES
from mnn.distributed.experiments.bench import (Step, build_step, copy_to_torch, evaluation_steps, has_torch,
                                               torch_dtype, torch_no_grad_loss, torch_training_step)

__all__ = ["IMAGE_SHAPE", "CLASSES", "LEARNING_RATE", "MOMENTUM", "cnn_description", "build_cnn", "random_images",
           "torch_cnn", "cnn_steps", "cnn_evaluation_steps", "layer_profile"]

#: One image: channels, height, width (Fashion-MNIST's 28x28 greyscale).
IMAGE_SHAPE = (1, 28, 28)
CLASSES = 10
#: SGD's learning rate and momentum in the timed steps (any values time the same).
LEARNING_RATE = 0.01
MOMENTUM = 0.9


def cnn_description(channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.0) -> dict[str, Any]:
    """The ``[model]`` table of the Fashion-MNIST CNN: for each of ``channels``, a 3x3
    convolution (padding 1), BatchNorm, ReLU and 2x2 max-pooling; then Linear to
    ``hidden``, ReLU, dropout (where ``dropout`` > 0), Linear to the 10 classes and
    cross entropy. The example trains with ``dropout=0.25``; the benchmark leaves it
    out, so that both nets compute the same loss (their dropout masks would differ)."""
    layers: list[dict[str, Any]] = [{"type": "ReshapeLayer", "shape": list(IMAGE_SHAPE)}]
    size, previous = IMAGE_SHAPE[1], IMAGE_SHAPE[0]
    for width in channels:
        layers += [{"type": "Conv2DLayer", "in_channels": previous, "out_channels": width, "kernel": 3,
                    "padding": 1},
                   {"type": "BatchNormLayer", "channels": width}, {"type": "ReluLayer"},
                   {"type": "MaxPool2DLayer", "kernel": 2}]
        size, previous = size // 2, width
    flat = previous * size * size
    layers += [{"type": "ReshapeLayer", "shape": [flat]}, {"type": "LinearLayer", "shape": [flat, hidden]},
               {"type": "ReluLayer"}]
    if dropout > 0:
        layers.append({"type": "DropoutLayer", "p": dropout})
    layers += [{"type": "LinearLayer", "shape": [hidden, CLASSES]}, {"type": "CrossEntropyLossLayer"}]
    return {"layers": layers}


def build_cnn(seed: int = 0) -> SequentialLayers:
    """The mnn CNN in float32, its parameters drawn from ``seed`` as ``mnn-train --seed`` draws them."""
    return build_net(cnn_description(), dtype=np.float32, rng=seed)


def random_images(batch: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random float32 images of 784 pixels and their labels, drawn from ``rank``."""
    rng = np.random.default_rng(2000 + rank)
    return (rng.standard_normal((batch, int(np.prod(IMAGE_SHAPE)))).astype(np.float32),
            rng.integers(0, CLASSES, batch))


# ------------------------------------------------------------------ the same net in PyTorch
def _torch_module(layer: Any, torch: Any) -> Any:
    """The PyTorch module of one mnn layer, holding copies of its parameters; ValueError
    for a layer the benchmark's nets do not use."""
    nn = torch.nn

    if isinstance(layer, ReshapeLayer):
        return nn.Unflatten(1, layer.shape) if len(layer.shape) > 1 else nn.Flatten()
    if isinstance(layer, ReluLayer):
        return nn.ReLU()
    if isinstance(layer, MaxPool2DLayer):
        return nn.MaxPool2d(layer.kernel, layer.stride)
    if isinstance(layer, Conv2DLayer):
        module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding,
                           bias="b" in layer.params)
    elif isinstance(layer, LinearLayer):
        module = nn.Linear(layer.n_in, layer.n_out, bias="b" in layer.params)
    elif isinstance(layer, BatchNormLayer):
        # The same momentum convention: the weight of the new batch; both keep the unbiased variance.
        module = nn.BatchNorm2d(layer.channels, eps=layer.eps, momentum=layer.momentum)
        copy_to_torch(module.running_mean, layer.buffers["running_mean"])
        copy_to_torch(module.running_var, layer.buffers["running_var"])
    else:
        raise ValueError(f"torch_cnn: expected Reshape, Conv2D, BatchNorm, ReLU, MaxPool2D and Linear layers, "
                         f"got {layer.name}")
    names = {"w": "weight", "b": "bias", "g": "weight"}
    for key, value in layer.params.items():
        copy_to_torch(getattr(module, names[key]), value)
    return module


def torch_cnn(net: SequentialLayers) -> Any:
    """A PyTorch ``nn.Module`` of the same net as ``net`` (image layers, Linear, ReLU,
    ending in cross entropy), holding copies of its parameters and running statistics
    in its dtype: ``module(images, labels)`` is the loss ``net(images, labels)`` is,
    up to rounding."""
    import torch

    if not isinstance(net.loss_layer, CrossEntropyLossLayer):
        raise ValueError(f"torch_cnn: expected a net ending in CrossEntropyLossLayer, got "
                         f"{[layer.name for layer in net.layers]}")
    dtype = torch_dtype(net.dtype)
    with torch.no_grad():
        body = torch.nn.Sequential(*(_torch_module(layer, torch).to(dtype) for layer in net.layers[:-1]))

    class Classifier(torch.nn.Module):
        """``body``, then the mean cross entropy of its logits against the labels."""

        def __init__(self, layers: Any):
            super().__init__()
            self.layers = layers

        def forward(self, images: Any, labels: Any) -> Any:
            return torch.nn.functional.cross_entropy(self.layers(images), labels)

    return Classifier(body)


# ------------------------------------------------------------------ the timed steps
def cnn_steps(batch: int, comm: Communicator, with_torch: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
              seed: int = 0) -> dict[str, Step]:
    """The CNN's steps on ``batch`` random images per rank: "mnn", and "torch" (one
    process) or "torch-ddp" when PyTorch is importable and wanted. Both nets start
    from the same parameters, drawn from ``seed``."""
    x, y = random_images(batch, comm.rank)
    steps = {}
    if with_torch and has_torch():
        import torch

        # Built first, from the untouched parameters (mnn's steps change them).
        sgd = functools.partial(torch.optim.SGD, lr=LEARNING_RATE, momentum=MOMENTUM)
        steps["torch" if comm.size == 1 else "torch-ddp"] = (
            torch_training_step(torch_cnn(build_cnn(seed)), sgd, x, y, comm), None)
    net = build_cnn(seed)
    mnn_step = build_step(net, SGD(net, lr=LEARNING_RATE, momentum=MOMENTUM), [(x, y)], comm.size * batch, comm,
                          bucket_bytes=bucket_bytes)
    return {"mnn": mnn_step, **steps}


def cnn_evaluation_steps(batch: int, with_torch: bool = True, seed: int = 0) -> dict[str, Step]:
    """:func:`~mnn.distributed.experiments.bench.evaluation_steps` of the CNN on ``batch``
    random images: mnn's forward in training and in evaluation mode, and PyTorch's
    (``model.eval()``, so BatchNorm uses the running statistics) under ``torch.no_grad()``."""
    x, y = random_images(batch)

    def torch_loss(net: SequentialLayers) -> Callable[[], Any]:
        return torch_no_grad_loss(torch_cnn(net).eval(), x, y)
    return evaluation_steps(lambda: build_cnn(seed), x, y, torch_loss if with_torch and has_torch() else None)


# ------------------------------------------------------------------ where the time goes
def layer_profile(batch: int, steps: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Where mnn's step of the CNN goes on one process: ``steps`` steps on ``batch``
    random images, each layer's forward and backward timed and summed per layer
    class, the loss layer and SGD's update apart. One dict per part, in ms per step
    (``forward_ms``, ``backward_ms``, ``ms``) and as a ``share`` of the parts' sum.

    A Conv2DLayer line is followed by its three matrix products (forward,
    weight gradient, input gradient) timed alone on arrays of the same shapes and
    layouts ("Conv2DLayer GEMMs"), and by the rest, im2col in forward and col2im
    in backward ("Conv2DLayer im2col/col2im"), the difference.
    """
    net = build_cnn(seed)
    optimizer = SGD(net, lr=LEARNING_RATE, momentum=MOMENTUM)
    x, y = random_images(batch)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def timed(function: Callable[..., Any], key: str, phase: int) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            totals[key][phase] += time.perf_counter() - start
            return result
        return call

    for layer in net.layers:
        layer.forward, layer.backward = timed(layer.forward, layer.name, 0), timed(layer.backward, layer.name, 1)
    update = timed(optimizer.step, "SGD update", 1)
    for index in range(steps + 2):
        if index == 2:  # two untimed warm-up steps
            totals.clear()
        net.zero_grads()
        net(x, y)
        net.backward()
        update()
    for layer in net.layers:  # the class's own methods again
        del layer.forward, layer.backward
    convolutions = [layer for layer in net.layers if isinstance(layer, Conv2DLayer)]
    totals["Conv2DLayer GEMMs"] = _gemm_seconds(net, convolutions, x, steps)
    conv, gemms = totals["Conv2DLayer"], totals["Conv2DLayer GEMMs"]
    totals["Conv2DLayer im2col/col2im"] = [conv[0] - gemms[0], conv[1] - gemms[1]]
    whole = sum(sum(seconds) for key, seconds in totals.items() if not key.startswith("Conv2DLayer "))
    return [{"layer": key, "forward_ms": round(seconds[0] * 1e3 / steps, 3),
             "backward_ms": round(seconds[1] * 1e3 / steps, 3), "ms": round(sum(seconds) * 1e3 / steps, 3),
             "share": round(sum(seconds) / whole, 3)} for key, seconds in totals.items()]


def _gemm_seconds(net: SequentialLayers, convolutions: list[Conv2DLayer], x: np.ndarray,
                  repeats: int) -> list[float]:
    """Seconds of the convolutions' matrix products over ``repeats`` steps, [forward,
    backward], each product timed alone on random arrays shaped and laid out as
    Conv2DLayer's: ``W_m @ X_c``, then ``G_m @ X_c.T`` and ``W_m.T @ G_m``."""
    rng = np.random.default_rng(0)
    shapes = {}
    outputs = x
    for layer in net.layers[:-1]:  # the output shape of each convolution
        outputs = layer.forward(outputs)
        if isinstance(layer, Conv2DLayer):
            shapes[layer] = outputs.shape
    seconds = [0.0, 0.0]
    for layer in convolutions:
        batch, channels, height, width = shapes[layer]
        weights = layer.params["w"].reshape(channels, -1)
        columns = rng.standard_normal((weights.shape[1], batch * height * width)).astype(layer.dtype)
        gradients = rng.standard_normal((channels, columns.shape[1])).astype(layer.dtype)
        products = ((0, lambda: weights @ columns), (1, lambda: gradients @ columns.T),
                    (1, lambda: weights.T @ gradients))
        for phase, product in products:
            product()
            start = time.perf_counter()
            for _ in range(repeats):
                product()
            seconds[phase] += time.perf_counter() - start
    return seconds
