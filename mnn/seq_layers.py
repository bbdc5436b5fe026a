r"""Layers that hold layers: ``SequentialLayers`` (a stack run in order) and ``Residual``.

For :math:`\ell = f_L(\cdots f_2(f_1(x)))` the chain rule reads

.. math::
    \frac{\partial \ell}{\partial h_{k-1}} = \frac{\partial \ell}{\partial h_k}
    \frac{\partial h_k}{\partial h_{k-1}},

so backward hands each layer the gradient its successor returned. Usage::

    from mnn.seq_layers import *      # SequentialLayers, Residual and every layer class
    net = SequentialLayers([LinearLayer(784, 256, rng=0), ReluLayer(),
                            LinearLayer(256, 10, rng=1), CrossEntropyLossLayer()])
    loss = net(x, labels)   # forward; returns the batch-mean loss
    net.backward()          # gradients accumulate into each layer's grads
    net.step(lr=0.1)
    net.zero_grads()

Parameters are named ``index.Class.key`` (``0.LinearLayer.w``), as in the seed
library's state dicts; a layer inside a container is named below it
(``3.Residual.0.LinearLayer.w``), so any depth of nesting has unique names.
Buffers (state without gradients, such as BatchNorm's running statistics) are
named the same way (``3.BatchNormLayer.running_mean``) and saved beside the
parameters in ``state_dict()``.
``get_config()`` describes the stack as plain data (the model description
that :func:`mnn.model.build_net` builds and job files hold).
"""

import numpy as np

from mnn.checks import check_float_dtype
from mnn.layer import *  # noqa: F403 -- the seed's `from mnn.seq_layers import *` gave every layer
from mnn.layer import __all__ as _layer_names
from mnn.layer import Layer, LossLayer

__all__ = ["SequentialLayers", "Residual", *_layer_names]


class SequentialLayers(Layer):
    """Layers applied in order; the last one may be a loss layer.

    ``input_grad``: whether backward computes the gradient with respect to the
    net's input. The input of a net is usually data, not a parameter, so, as
    PyTorch does for tensors without ``requires_grad``, it is skipped unless asked.
    """

    def __init__(self, layers, input_grad=False):
        layers = list(layers)
        if not layers:
            raise ValueError("SequentialLayers: expected at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"SequentialLayers: layer {index} is a {type(layer).__name__}, expected an mnn Layer")
            if isinstance(layer, LossLayer) and index != len(layers) - 1:
                raise ValueError(f"SequentialLayers: the loss layer {layer.name} must come last, found at {index}")
        super().__init__(layers[0].dtype)
        self.layers = layers
        self.input_grad = input_grad
        self._has_targets = False

    @property
    def loss_layer(self):
        return self.layers[-1] if isinstance(self.layers[-1], LossLayer) else None

    def __call__(self, inputs, targets=None, debug=False):
        return self.forward(inputs, targets, debug=debug)

    # -- forward and backward -------------------------------------------------------

    def forward(self, inputs, targets=None, debug=False):
        """The loss when ``targets`` are given; otherwise the output of the last
        non-loss layer (the prediction, e.g. logits).

        ``debug=True`` prints each layer's input and output shapes and the sum
        of its output, as the seed library did.
        """
        body = self.layers[:-1] if self.loss_layer is not None else self.layers
        outputs = inputs
        for index, layer in enumerate(body):
            layer_inputs, outputs = outputs, layer.forward(outputs)
            if debug:
                _trace("forward", index, layer, layer_inputs, outputs)
        self._has_targets = targets is not None and self.loss_layer is not None
        if not self._has_targets:
            return outputs
        loss = self.loss_layer.forward(outputs, targets)
        if debug:
            _trace("forward", len(self.layers) - 1, self.loss_layer, outputs, loss)
        return loss

    def backward(self, gradients=None, input_grad=None, hook=None, scale=1.0, debug=False):
        """Backpropagate from the last layer to the first; return every layer's input gradient.

        A net that ends in a loss layer starts from the loss and takes no
        ``gradients``; ``scale`` differentiates ``scale * loss`` instead, so
        every gradient comes out multiplied by it at no extra cost (the
        data-parallel wrapper weights each rank's shard this way). A stack
        without a loss layer (the inside of a ``Residual``) starts from
        ``gradients``, the gradient with respect to its output.

        Returns the list of what each layer's backward returned, in layer order:
        entry ``i`` is the gradient with respect to the input of layer ``i``, so
        ``zip(net.layers, net.backward())`` pairs them, and entry 0 is the
        gradient with respect to the net's input, or None when ``input_grad``
        (default: the net's) is false. ``hook(index, layer)`` runs after each
        layer's backward. ``debug=True`` prints each layer's gradient shapes and
        sums (and computes entry 0, so that every entry can be printed).
        """
        last = len(self.layers) - 1
        if self.loss_layer is not None:
            if gradients is not None:
                raise ValueError("SequentialLayers.backward: the net ends in a loss layer, so backward starts "
                                 "from the loss and takes no gradients; weight the loss with scale=")
            if not self._has_targets:
                raise ValueError("SequentialLayers.backward: called before a forward with targets")
            gradients = self.loss_layer.backward(scale)
            layer_gradients = [gradients]
            if debug:
                _trace("backward", last, self.loss_layer, None, gradients)
            if hook is not None:
                hook(last, self.loss_layer)
            last -= 1
        elif gradients is None:
            raise ValueError("SequentialLayers.backward: the last layer is not a loss layer, so backward needs "
                             "the gradients with respect to the output")
        else:
            layer_gradients = []
        first_input_grad = self.input_grad if input_grad is None else input_grad
        for index in range(last, -1, -1):
            layer = self.layers[index]
            layer_inputs_grad = gradients
            gradients = layer.backward(gradients, input_grad=index > 0 or first_input_grad or debug)
            layer_gradients.append(gradients)
            if debug:
                _trace("backward", index, layer, layer_inputs_grad, gradients)
            if hook is not None:
                hook(index, layer)
        return layer_gradients[::-1]

    # -- parameters -------------------------------------------------------------------

    def parameter_slots(self):
        """``(name, layer, key)`` of every parameter, in layer order then key order;
        names read ``0.LinearLayer.w``, and ``3.Residual.0.LinearLayer.w`` for a
        layer inside layer 3."""
        for index, layer in enumerate(self.layers):
            for name, holder, key in layer.parameter_slots():
                yield f"{index}.{layer.name}.{name}", holder, key

    def buffer_slots(self):
        """``(name, layer, key)`` of every buffer, named as :meth:`parameter_slots` names parameters."""
        for index, layer in enumerate(self.layers):
            for name, holder, key in layer.buffer_slots():
                yield f"{index}.{layer.name}.{name}", holder, key

    def zero_grads(self):
        for layer in self.layers:
            layer.zero_grads()

    def set_batch_reduction(self, reduce):
        """Give every layer, at any depth, the batch reduction (see :meth:`Layer.set_batch_reduction`)."""
        super().set_batch_reduction(reduce)
        for layer in self.layers:
            layer.set_batch_reduction(reduce)

    def forward_no_samples(self):
        """The batch reductions of a forward without samples, layer by layer in forward order."""
        for layer in self.layers:
            layer.forward_no_samples()

    def backward_no_samples(self):
        """The batch reductions of a backward without samples, in backward (reverse) order."""
        for layer in reversed(self.layers):
            layer.backward_no_samples()

    def set_training(self, mode):
        """Training (``True``) or evaluation (``False``) for every layer, at any depth."""
        super().set_training(mode)
        for layer in self.layers:
            layer.set_training(mode)

    def start_batch(self, step, first_sample):
        """Pass the next forward's global ``step`` and ``first_sample`` to every layer, at any depth."""
        super().start_batch(step, first_sample)
        for layer in self.layers:
            layer.start_batch(step, first_sample)

    def step(self, lr=0.01):
        for layer in self.layers:
            layer.step(lr)

    def astype(self, dtype):
        self.dtype = check_float_dtype(dtype)
        for layer in self.layers:
            layer.astype(dtype)
        return self

    def state_dict(self):
        """Copies of all parameters and buffers, keyed by name."""
        return {name: store[key].copy() for name, (store, key) in self._state_slots().items()}

    def load_state_dict(self, state):
        """Copy ``state`` (name -> array) into the parameters and buffers, checking names and shapes."""
        slots = self._state_slots()
        missing = sorted(set(slots) - set(state))
        extra = sorted(set(state) - set(slots))
        if missing or extra:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        for name, (store, key) in slots.items():
            value = np.asarray(state[name])
            if value.shape != store[key].shape:
                raise ValueError(f"load_state_dict: {name} expected shape {store[key].shape}, got {value.shape}")
        for name, (store, key) in slots.items():
            store[key][...] = state[name]

    def _state_slots(self):
        """``name -> (dict, key)`` of what ``state_dict`` holds: every parameter
        (``layer.params[key]``), then every buffer (``layer.buffers[key]``)."""
        slots = {name: (layer.params, key) for name, layer, key in self.parameter_slots()}
        slots.update((name, (layer.buffers, key)) for name, layer, key in self.buffer_slots())
        return slots

    def load_weights(self, state, config=None, verbose=False):
        """The seed's loader: :meth:`load_state_dict`, after checking ``config``.

        ``config`` is the :meth:`get_config` of the net that saved ``state`` (or
        the seed's ``{"layers": count}``): the nets must have as many layers,
        and every layer that holds parameters must be of the same type and
        configuration. Layers without parameters may differ, so a net trained
        with a loss layer loads into one that ends in ``SoftmaxLayer``, as the
        seed's MNIST example does. ``verbose`` prints each key as it is loaded.
        """
        if config is not None:
            self._check_config_matches(config)
        self.load_state_dict(state)
        if verbose:
            for name, param, _ in self.named_params():
                print(f"loading weights to: {name} {param.shape}")

    def _check_config_matches(self, config):
        theirs = config.get("layers") if isinstance(config, dict) else None
        count = theirs if isinstance(theirs, int) else len(theirs) if isinstance(theirs, list) else None
        if count is None:
            raise ValueError(f"load_weights: expected config to be a net's get_config(), a dict with "
                             f"'layers', got {config!r}")
        if count != len(self.layers):
            raise ValueError(f"load_weights: the config describes {count} layers, this net has {len(self.layers)}")
        if isinstance(theirs, int):
            return  # the seed's config says no more than the count
        for index, (layer, description) in enumerate(zip(self.layers, self.get_config()["layers"])):
            holds_params = next(layer.parameter_slots(), None) is not None
            if holds_params and theirs[index] != description:
                raise ValueError(f"load_weights: layer {index} is {description}, but the config "
                                 f"has {theirs[index]}")

    def rebind_grads(self, arrays):
        """Let gradient ``name`` live in ``arrays[name]`` (e.g. a view into a bucket).

        The current gradient values are copied over; layers keep writing into
        the new arrays in place.
        """
        slots = {name: (layer, key) for name, layer, key in self.parameter_slots()}
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

    # -- description ---------------------------------------------------------------------

    def get_config(self):
        """The model description: ``{"layers": [{"type": class name, **arguments}, ...]}``."""
        return {"layers": [{"type": layer.name, **layer.get_config()} for layer in self.layers]}

    def __repr__(self):
        inner = ",\n".join(repr(layer) for layer in self.layers).replace("\n", "\n  ")
        return f"{self.name}([\n  {inner}\n])"


class Residual(Layer):
    r"""A residual connection around a stack of layers: :math:`y = x + f(x)`.

    ``Residual(layers)``: :math:`f` is ``SequentialLayers(layers)``, which must
    keep the shape of its input and hold no loss layer. The parameters are
    those of the layers inside (``Residual`` has none of its own), named below
    it: ``0.LinearLayer.w`` inside, ``3.Residual.0.LinearLayer.w`` in a net.
    """

    def __init__(self, layers):
        layers = list(layers)
        losses = [layer.name for layer in layers if isinstance(layer, LossLayer)]
        if losses:
            raise ValueError(f"Residual: expected layers without a loss layer, got {', '.join(losses)}")
        self.body = SequentialLayers(layers, input_grad=True)
        super().__init__(self.body.dtype)
        self._input_shape = None

    @property
    def layers(self):
        return self.body.layers

    def forward(self, inputs, feedbacks=None):
        r"""
        .. math::
            y = x + f(x). \tag{1}
        """
        inputs = self._batch(inputs)
        outputs = self.body.forward(inputs)
        if outputs.shape != inputs.shape:
            raise ValueError(f"{self.name}: the layers inside must keep the shape of their input, "
                             f"but {inputs.shape} became {outputs.shape}")
        self._input_shape = self._kept(inputs.shape)
        return inputs + outputs  # Eq. (1)

    def backward(self, gradients, input_grad=True):
        r"""The Jacobian of Eq. (1) is :math:`I + J_f`, so with :math:`g = \partial \ell / \partial y`

        .. math::
            \frac{\partial \ell}{\partial x} = g + J_f^\top g, \tag{2}

        where :math:`J_f^\top g` is what backward through the layers inside
        returns; they add their parameter gradients on the way. The identity
        path carries :math:`g` past :math:`f` unchanged, which is why deep
        stacks of residual blocks still train.
        """
        input_shape = self._saved(self._input_shape)
        gradients = self._check_gradients(gradients, input_shape)
        through_layers = self.body.backward(gradients, input_grad=input_grad)[0]
        if not input_grad:
            return None
        return gradients + through_layers  # Eq. (2)

    def parameter_slots(self):
        return self.body.parameter_slots()

    def buffer_slots(self):
        return self.body.buffer_slots()

    def set_batch_reduction(self, reduce):
        self.body.set_batch_reduction(reduce)

    def forward_no_samples(self):
        self.body.forward_no_samples()

    def backward_no_samples(self):
        self.body.backward_no_samples()

    def zero_grads(self):
        self.body.zero_grads()

    def set_training(self, mode):
        super().set_training(mode)
        self.body.set_training(mode)

    def start_batch(self, step, first_sample):
        self.body.start_batch(step, first_sample)

    def step(self, lr=0.01):
        self.body.step(lr)

    def astype(self, dtype):
        self.dtype = check_float_dtype(dtype)
        self.body.astype(dtype)
        return self

    def get_config(self):
        return self.body.get_config()

    def __repr__(self):
        return repr(self.body).replace(self.body.name, self.name, 1)


def _trace(direction, index, layer, before, after):
    """One line of the debug trace: a layer's shapes and the sum of what it produced."""
    shape_before = "" if before is None else f"{np.shape(before)} => "
    # An embedding's backward gives no input gradient (token ids are not differentiable).
    produced = "None" if after is None else f"{np.shape(after)} sum: {np.sum(after):.6g}"
    print(f"{direction} {index} {layer.name} {shape_before}{produced}", flush=True)
