r"""SequentialLayers: a stack of layers run forward in order and backward in reverse.

For :math:`\ell = f_L(\cdots f_2(f_1(x)))` the chain rule reads

.. math::
    \frac{\partial \ell}{\partial h_{k-1}} = \frac{\partial \ell}{\partial h_k}
    \frac{\partial h_k}{\partial h_{k-1}},

so backward hands each layer the gradient its successor returned. Usage::

    net = SequentialLayers([LinearLayer(784, 256, rng=0), ReluLayer(),
                            LinearLayer(256, 10, rng=1), CrossEntropyLossLayer()])
    loss = net(x, labels)   # forward; returns the batch-mean loss
    net.backward()          # gradients accumulate into each layer's grads
    net.step(lr=0.1)
    net.zero_grads()
"""

import numpy as np

from mnn.checks import check_float_dtype
from mnn.layer._base import Layer, LossLayer

__all__ = ["SequentialLayers"]


class SequentialLayers:
    """Layers applied in order; the last one may be a loss layer."""

    def __init__(self, layers, input_grad=False):
        layers = list(layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"SequentialLayers: layer {index} is a {type(layer).__name__}, expected an mnn Layer")
            if isinstance(layer, LossLayer) and index != len(layers) - 1:
                raise ValueError(f"SequentialLayers: the loss layer {layer.name} must come last, found at {index}")
        if not layers:
            raise ValueError("SequentialLayers: expected at least one layer")
        self.layers = layers
        # The input of the net is data, not a parameter: like PyTorch with
        # requires_grad=False, skip the first layer's input gradient unless asked.
        self.input_grad = input_grad
        self._has_targets = False

    @property
    def loss_layer(self):
        return self.layers[-1] if isinstance(self.layers[-1], LossLayer) else None

    def __call__(self, inputs, targets=None):
        return self.forward(inputs, targets)

    def forward(self, inputs, targets=None):
        """The loss when ``targets`` are given; otherwise the output of the last
        non-loss layer (the prediction, e.g. logits)."""
        body = self.layers[:-1] if self.loss_layer is not None else self.layers
        outputs = inputs
        for layer in body:
            outputs = layer.forward(outputs)
        self._has_targets = targets is not None and self.loss_layer is not None
        if not self._has_targets:
            return outputs
        return self.loss_layer.forward(outputs, targets)

    def backward(self, hook=None, scale=1.0):
        """Backpropagate from the loss; ``hook(index, layer)`` runs after each layer.

        ``scale`` differentiates ``scale * loss`` instead of the loss: every
        gradient comes out multiplied by it, at no extra cost (the data-parallel
        wrapper weights each rank's shard this way). Returns the gradient with
        respect to the net's input when the net was built with
        ``input_grad=True``, else ``None``.
        """
        if self.loss_layer is None:
            raise ValueError("SequentialLayers.backward: the last layer is not a loss layer, nothing to differentiate")
        if not self._has_targets:
            raise ValueError("SequentialLayers.backward: called before a forward with targets")
        last = len(self.layers) - 1
        gradients = self.loss_layer.backward(scale)
        if hook is not None:
            hook(last, self.loss_layer)
        for index in range(last - 1, -1, -1):
            layer = self.layers[index]
            gradients = layer.backward(gradients, input_grad=index > 0 or self.input_grad)
            if hook is not None:
                hook(index, layer)
        return gradients

    def zero_grads(self):
        for layer in self.layers:
            layer.zero_grads()

    def step(self, lr=0.01):
        for layer in self.layers:
            layer.step(lr)

    def astype(self, dtype):
        dtype = check_float_dtype(dtype)
        for layer in self.layers:
            layer.astype(dtype)
        return self

    def named_params(self):
        """``(name, param, grad)`` for every parameter, in layer order then key
        order; names read ``0.LinearLayer.w`` as in the seed's state dicts."""
        for index, layer in enumerate(self.layers):
            for key, param in layer.params.items():
                yield f"{index}.{layer.name}.{key}", param, layer.grads[key]

    def _parameter_slots(self):
        return {f"{index}.{layer.name}.{key}": (layer, key)
                for index, layer in enumerate(self.layers) for key in layer.params}

    def state_dict(self):
        """Copies of all parameters, keyed by name."""
        return {name: param.copy() for name, param, _ in self.named_params()}

    def load_state_dict(self, state):
        """Copy ``state`` (name -> array) into the parameters, checking names and shapes."""
        slots = self._parameter_slots()
        missing = sorted(set(slots) - set(state))
        extra = sorted(set(state) - set(slots))
        if missing or extra:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        for name, (layer, key) in slots.items():
            value = np.asarray(state[name])
            if value.shape != layer.params[key].shape:
                raise ValueError(
                    f"load_state_dict: {name} expected shape {layer.params[key].shape}, got {value.shape}")
        for name, (layer, key) in slots.items():
            layer.params[key][...] = state[name]

    load_weights = load_state_dict

    def rebind_grads(self, arrays):
        """Let gradient ``name`` live in ``arrays[name]`` (e.g. a view into a bucket).

        The current gradient values are copied over; layers keep writing into
        the new arrays in place.
        """
        slots = self._parameter_slots()
        for name, array in arrays.items():
            if name not in slots:
                raise ValueError(f"rebind_grads: unknown parameter {name}")
            layer, key = slots[name]
            old = layer.grads[key]
            if array.shape != old.shape or array.dtype != old.dtype:
                raise ValueError(
                    f"rebind_grads: {name} expected {old.shape} {old.dtype}, got {array.shape} {array.dtype}")
            array[...] = old
            layer.grads[key] = array

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"SequentialLayers([\n  {inner}\n])"
