r"""The contract every layer follows, and the small helpers they share.

A layer maps a batch of inputs to a batch of outputs. Arrays are batch first:
row :math:`i` of an input ``X`` of shape ``(B, n)`` is sample :math:`x_i`.

* ``forward(inputs, feedbacks=None)`` computes the output and, in training,
  keeps what ``backward`` will need. Loss layers take their targets as ``feedbacks``.
* ``backward(gradients)`` receives :math:`G = \partial \ell / \partial Y`, the
  gradient of the (scalar) loss with respect to the layer's output, *adds*
  :math:`\partial \ell / \partial \theta` into ``self.grads[k]`` for every
  parameter :math:`\theta` = ``self.params[k]``, and returns
  :math:`\partial \ell / \partial X`. A loss layer's output *is* :math:`\ell`,
  so it takes no gradient (:math:`G = 1`) or a scalar loss weight :math:`w`,
  which makes it differentiate :math:`w\,\ell` (:math:`G = w`).
* ``step(lr)`` is plain gradient descent on the layer's own parameters.
* ``zero_grads()`` clears the accumulated gradients.
* ``get_config()`` gives the constructor arguments that rebuild the layer
  (without ``dtype`` and ``rng``); :mod:`mnn.model` builds layers from them.
* ``parameter_slots()`` names every parameter and says which layer holds it:
  a layer's own keys (``"w"``), or for a layer that holds other layers (a
  ``Residual``) their names below it (``"0.LinearLayer.w"``).
* ``set_training(mode)`` switches between training (the default) and
  evaluation, which is inference: a forward in evaluation keeps nothing for
  backward (no inputs, activations or masks; it may skip work only backward
  needs, never changing the output), and a ``backward`` after it raises
  ValueError saying so. ``with net.evaluating():`` is evaluation for a block.
  ``start_batch(step, first_sample)`` says which global step the next forward
  belongs to and where this batch starts in the global batch; it does nothing
  here. Containers pass both to their layers, and layers that draw random
  numbers (``DropoutLayer``) use them so that a sample's noise depends on the
  sample, never on the rank or shard that holds it.
* ``buffers`` holds a layer's state that is not a parameter (BatchNorm's
  running statistics): saved and loaded with the parameters
  (``buffer_slots()`` names them as ``parameter_slots()`` does), but without
  gradients, so optimizers and gradient reductions never see them.
* ``set_batch_reduction(reduce)`` gives layers whose forward depends on the
  whole batch (``BatchNormLayer``) the sum over the processes that each hold a
  shard of it: ``reduce(array)`` returns the elementwise sum of ``array`` over
  them (the data-parallel trainer passes an all-reduce). ``None``, the default,
  is one process. When this process holds no samples of a batch that others
  do, ``forward_no_samples()`` and ``backward_no_samples()`` take its part in
  those sums (zeros). All three do nothing here; containers pass them on.

Gradients are written into the arrays of ``self.grads`` in place and never
rebound, so code outside the layer (the data-parallel wrapper) may hand the
layer gradient arrays that live inside one large buffer.

The seed library worked on column vectors of shape ``(B, n, 1)``. Layers accept
that shape too and answer in the same shape; internally everything is rows.
"""

import contextlib

import numpy as np

from mnn.checks import check_float_dtype, check_int

__all__ = ["Layer", "LossLayer"]


class Layer:
    """Base class: parameter and gradient dicts, SGD step, shape helpers."""

    def __init__(self, dtype=np.float32):
        self.dtype = check_float_dtype(dtype)
        self.params = {}
        self.grads = {}
        self.training = True  # see set_training
        self.buffers = {}
        # Keys whose gradient array holds only zeros (just created or cleared):
        # backward may write into those directly instead of adding a temporary.
        self._zero_grad_keys = set()

    @property
    def name(self):
        return type(self).__name__

    def __call__(self, inputs, feedbacks=None):
        return self.forward(inputs, feedbacks)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{self.name}({arguments})"

    def forward(self, inputs, feedbacks=None):
        raise NotImplementedError

    def backward(self, gradients, input_grad=True):
        raise NotImplementedError

    def get_config(self):
        """The constructor arguments that rebuild this layer, as plain values
        (numbers, strings, lists), without ``dtype`` and ``rng``."""
        return {}

    def set_training(self, mode):
        """Training (``True``, the default of every layer) or evaluation (``False``).

        In evaluation a forward keeps nothing for backward (:meth:`_kept`), so
        it holds no activations between calls, and backward raises ValueError
        until a forward in training; dropout is the identity. Containers pass
        the mode to every layer inside; ``self.training`` holds it.
        """
        self.training = _check_training_mode(self.name, mode)

    @contextlib.contextmanager
    def evaluating(self):
        """``with net.evaluating():`` — evaluation (inference: forwards keep
        nothing for backward, dropout is off; see :meth:`set_training`) inside
        the block, training again after it, whatever happens inside."""
        self.set_training(False)
        try:
            yield self
        finally:
            self.set_training(True)

    def start_batch(self, step, first_sample):
        """Announce the next forward: global ``step`` (0, 1, ...) and the index in
        the global batch of its first sample (this rank's shard starts there).

        Layers that draw random numbers key them by ``(step, first_sample + i)``
        for the sample in row ``i``, so the numbers a sample gets do not depend
        on how the global batch is split into shards. Others ignore it;
        containers pass it to every layer inside.
        """
        _check_batch_position(self.name, step, first_sample)

    def parameter_slots(self):
        """``(name, layer, key)`` for every parameter: its name as seen from this
        layer and where it lives, ``layer.params[key]`` (with its gradient in
        ``layer.grads[key]``). A plain layer holds its own parameters."""
        for key in self.params:
            yield key, self, key

    def buffer_slots(self):
        """``(name, layer, key)`` for every buffer (state without a gradient), as
        :meth:`parameter_slots` does for parameters: ``layer.buffers[key]``."""
        for key in self.buffers:
            yield key, self, key

    def set_batch_reduction(self, reduce):
        """The sum over the processes that share each batch: ``reduce(array)`` returns
        the elementwise sum of ``array`` over them, or ``None`` for one process.
        Only layers with batch statistics use it; containers pass it to every layer."""
        _check_batch_reduction(self.name, reduce)

    def forward_no_samples(self):
        """Take part, with no samples, in the sums that a training forward of the
        other processes makes through the batch reduction (nothing here)."""

    def backward_no_samples(self):
        """Take part, with no samples, in the sums that backward makes through the
        batch reduction (nothing here)."""

    def named_params(self):
        """``(name, param, grad)`` for every parameter, in the order of :meth:`parameter_slots`."""
        for name, layer, key in self.parameter_slots():
            yield name, layer.params[key], layer.grads[key]

    def step(self, lr=0.01):
        r"""Gradient descent: :math:`\theta \leftarrow \theta - \eta\, \nabla_\theta \ell`."""
        for key, param in self.params.items():
            param -= lr * self.grads[key]

    def zero_grads(self):
        for grad in self.grads.values():
            grad.fill(0)
        self._zero_grad_keys = set(self.grads)

    def astype(self, dtype):
        """Cast parameters and gradients to ``dtype`` (float32 or float64)."""
        self.dtype = check_float_dtype(dtype)
        # copy=False: a cast to the dtype already held keeps the arrays, so
        # gradients rebound into a data-parallel bucket stay there.
        for key in self.params:
            self.params[key] = self.params[key].astype(self.dtype, copy=False)
            self.grads[key] = self.grads[key].astype(self.dtype, copy=False)
        for key in self.buffers:
            self.buffers[key] = self.buffers[key].astype(self.dtype, copy=False)
        return self

    # -- helpers for subclasses -------------------------------------------

    def _add_product_to_grad(self, key, left, right):
        """``grads[key] += left @ right``, without a temporary when grads are zero."""
        grad = self.grads[key]
        if key in self._zero_grad_keys:
            np.matmul(left, right, out=grad)
            self._zero_grad_keys.discard(key)
        else:
            grad += left @ right

    def _add_to_grad(self, key, value):
        grad = self.grads[key]
        if key in self._zero_grad_keys:
            grad[...] = value
            self._zero_grad_keys.discard(key)
        else:
            grad += value

    def _add_param(self, key, value):
        """Register a parameter and its zero gradient of the same shape and dtype."""
        self.params[key] = np.ascontiguousarray(value, dtype=self.dtype)
        self.grads[key] = np.zeros_like(self.params[key])
        self._zero_grad_keys.add(key)

    def _add_buffer(self, key, value):
        """Register a buffer: state saved with the model that has no gradient."""
        self.buffers[key] = np.ascontiguousarray(value, dtype=self.dtype)

    def _as_dtype(self, array, what="inputs"):
        """``array`` as an ndarray in the layer's dtype, refusing non-numeric data."""
        array = np.asarray(array)
        if array.dtype != self.dtype:
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                raise TypeError(f"{self.name}: expected numeric {what}, got dtype {array.dtype}")
            array = array.astype(self.dtype)
        return array

    def _batch(self, inputs):
        """``inputs`` in the layer's dtype, checked to be a non-empty batch ``(B, ...)``
        of any per-sample shape (element-wise layers and reshapes need no more)."""
        inputs = self._as_dtype(inputs)
        if inputs.ndim < 2:
            raise ValueError(f"{self.name}: expected a batch of shape (batch, features, ...), got shape {inputs.shape}")
        if inputs.shape[0] == 0:
            raise ValueError(f"{self.name}: expected at least one sample, got an empty batch of shape {inputs.shape}")
        return inputs

    def _rows(self, inputs, n_features=None):
        """View ``inputs`` as rows ``(B, n)`` in the layer's dtype.

        Returns the rows and whether the input came as seed-style columns
        ``(B, n, 1)``, so the output can be given back in the same shape.
        """
        inputs = self._as_dtype(inputs)
        columns = inputs.ndim == 3 and inputs.shape[2] == 1
        rows = inputs[:, :, 0] if columns else inputs
        if rows.ndim != 2:
            raise ValueError(
                f"{self.name}: expected inputs of shape (batch, features) or (batch, features, 1), "
                f"got shape {inputs.shape}")
        if rows.shape[0] == 0:
            # A mean over no samples is undefined: fail here, not with a NaN loss.
            raise ValueError(f"{self.name}: expected at least one sample, got an empty batch of shape {inputs.shape}")
        if n_features is not None and rows.shape[1] != n_features:
            raise ValueError(
                f"{self.name}: expected {n_features} features per sample, got {rows.shape[1]} "
                f"(input shape {inputs.shape})")
        return rows, columns

    @staticmethod
    def _as_shape(rows, columns):
        return rows[:, :, None] if columns else rows

    def _kept(self, value):
        """What a forward keeps for backward: ``value`` in training, ``None`` in evaluation."""
        return value if self.training else None

    def _saved(self, value):
        """What the last forward kept, or ValueError when it kept nothing."""
        if value is None:
            if not self.training:
                raise ValueError(f"{self.name}: backward called after a forward in evaluation mode, which keeps "
                                 f"nothing for backward; call set_training(True) and run forward again")
            raise ValueError(f"{self.name}: backward called before forward (a forward in evaluation mode keeps "
                             f"nothing for backward: call set_training(True) before the forward)")
        return value

    def _check_gradients(self, gradients, expected_shape):
        gradients = self._as_dtype(gradients, "gradients")
        # Rows (B, n) and the seed's columns (B, n, 1) are the same gradient.
        if gradients.shape + (1,) == expected_shape or gradients.shape == expected_shape + (1,):
            gradients = gradients.reshape(expected_shape)
        if gradients.shape != expected_shape:
            raise ValueError(
                f"{self.name}: expected gradients of shape {expected_shape} (the output's), "
                f"got {gradients.shape}")
        return gradients


def _as_indices(layer_name, values, size, kind, item):
    """``values`` as an integer array of indices in ``[0, size)``, any shape.

    Integer arrays pass; floating-point arrays pass only when every value is
    whole (data pipelines often hold ids and labels in the training dtype).
    ``kind`` and ``item`` name them in the ValueError otherwise
    (``"class indices"``, ``"label"``; ``"token ids"``, ``"id"``).
    """
    values = np.asarray(values)
    is_integer = np.issubdtype(values.dtype, np.integer)
    if not is_integer and not (np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0)):
        raise ValueError(f"{layer_name}: expected integer {kind}, got non-integer {item}s of dtype {values.dtype}")
    # The range is checked before any cast, so a huge whole float or uint64 cannot wrap into it.
    if values.size and (values.min() < 0 or values.max() >= size):
        bad = values[(values < 0) | (values >= size)][0]
        raise ValueError(f"{layer_name}: expected {kind} in [0, {size}), got {item} {bad.item()}")
    return values if is_integer else values.astype(np.int64)


def _check_training_mode(layer_name, mode):
    if not isinstance(mode, (bool, np.bool_)):
        raise TypeError(f"{layer_name}.set_training: expected True (training) or False (evaluation), "
                        f"got {mode!r} ({type(mode).__name__})")
    return bool(mode)


def _check_batch_reduction(layer_name, reduce):
    if reduce is not None and not callable(reduce):
        raise TypeError(f"{layer_name}.set_batch_reduction: expected a function reduce(array) -> the sum of "
                        f"array over the processes, or None (one process), got {type(reduce).__name__}")
    return reduce


def _check_batch_position(layer_name, step, first_sample):
    """``(step, first_sample)`` as Python ints, both integers >= 0."""
    return (check_int(f"{layer_name}.start_batch: step", step, minimum=0),
            check_int(f"{layer_name}.start_batch: first_sample", first_sample, minimum=0))


class LossLayer(Layer):
    r"""A layer whose output is the scalar loss :math:`\ell`.

    ``backward()`` needs no incoming gradient: :math:`\partial \ell / \partial \ell = 1`.
    ``backward(w)`` with a number :math:`w` (the loss weight) differentiates
    :math:`w\,\ell` instead, so every gradient of the net is scaled by
    :math:`w` for the cost of one multiplication here (the data-parallel
    wrapper weights each rank's loss this way, instead of scaling the gradient
    buffers afterwards). Each loss layer's ``backward`` docstring gives
    :math:`\nabla (w\,\ell)`; ``backward()`` is :math:`w = 1`.
    """

    def backward(self, gradients=None, input_grad=True):
        raise NotImplementedError

    def _scale(self, gradients, count):
        r""":math:`w / \text{count}` in this layer's dtype: the loss weight :math:`w`
        (1 when ``gradients`` is None) over the number of terms the loss averages."""
        weight = 1.0 if gradients is None else gradients
        if np.ndim(weight) != 0:
            raise ValueError(f"{self.name}: backward takes no gradient or a scalar loss weight, "
                             f"got an array of shape {np.shape(weight)}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"{self.name}: the loss weight passed to backward must be a real number, "
                            f"got {type(gradients).__name__} {gradients!r}") from None
        return self.dtype.type(weight / count)
