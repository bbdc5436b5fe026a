r"""Softmax and log-softmax over the feature axis, with closed-form backward passes.

Both Jacobians are a diagonal plus a rank-one term, so multiplying the
incoming gradient by them costs :math:`O(n)` per sample: the :math:`B \times n
\times n` Jacobian of the seed library is never built. Both shift their inputs
by the row maximum first, so logits near :math:`\pm 10^4` stay finite.
"""

import numpy as np

from mnn.layer._base import Layer

__all__ = ["SoftmaxLayer", "LogSoftmaxLayer"]


def _check_axis(layer_name, axis):
    if axis not in (1, -1):
        raise ValueError(
            f"{layer_name}: only the feature axis 1 of (batch, features) is supported, got axis={axis}")


def _as_float_array(inputs):
    """``inputs`` as an array of floats: integers become float64, floats keep their dtype."""
    inputs = np.asarray(inputs)
    return inputs if np.issubdtype(inputs.dtype, np.floating) else inputs.astype(np.float64)


class SoftmaxLayer(Layer):
    r"""Softmax of each row: :math:`y = e^{x} / \sum_c e^{x_c}`.

    ``SoftmaxLayer(*shape, axis=1)``: ``shape`` is accepted for the seed's
    signature ``SoftmaxLayer(B, n)`` and not otherwise needed.
    """

    def __init__(self, *shape, axis=1, dtype=np.float32):
        super().__init__(dtype)
        _check_axis(self.name, axis)
        self._outputs = None

    @staticmethod
    def stable_softmax(inputs, axis):
        r"""Softmax of ``inputs`` along ``axis``, in the dtype of ``inputs``.

        Subtracting :math:`m = \max_c x_c` multiplies numerator and denominator
        by :math:`e^{-m}`, so the value is unchanged, while every exponent is
        :math:`\le 0` (no overflow) and one of them is :math:`0` (the sum is
        :math:`\ge 1`, no division by zero):

        .. math::
            y_c = \frac{e^{x_c - m}}{\sum_{c'} e^{x_{c'} - m}}. \tag{1}
        """
        inputs = _as_float_array(inputs)
        shifted = inputs - inputs.max(axis=axis, keepdims=True)  # Eq. (1)
        exponentials = np.exp(shifted, out=shifted)
        exponentials /= exponentials.sum(axis=axis, keepdims=True)  # Eq. (1)
        return exponentials

    @staticmethod
    def softmax_gradient(outputs, gradients, axis):
        r"""The input gradient :math:`Y \odot (G - \langle G, Y \rangle)` along ``axis``,
        given the softmax ``outputs`` :math:`Y` and the output gradient :math:`G`.

        The derivation is in :meth:`backward`, Eq. (2) to (4); attention uses the
        same closed form on its scores.
        """
        inner = np.sum(gradients * outputs, axis=axis, keepdims=True)  # Eq. (3): the sum over c
        return outputs * (gradients - inner)  # Eq. (3), (4)

    def forward(self, inputs, feedbacks=None):
        r"""Row :math:`i` of the output is the softmax of row :math:`i` of the input, Eq. (1)."""
        rows, self._columns = self._rows(inputs)
        outputs = self.stable_softmax(rows, axis=1)  # Eq. (1)
        self._outputs = self._kept(outputs)
        return self._as_shape(outputs, self._columns)

    def backward(self, gradients, input_grad=True):
        r"""For one sample, :math:`y_c = e^{x_c} / s` with :math:`s = \sum_k e^{x_k}`,
        and :math:`\partial s / \partial x_k = e^{x_k}`, so

        .. math::
            \frac{\partial y_c}{\partial x_k} = \frac{\delta_{ck} e^{x_c}}{s} - \frac{e^{x_c} e^{x_k}}{s^2}
            = y_c (\delta_{ck} - y_k), \qquad
            J = \operatorname{diag}(y) - y y^\top. \tag{2}

        The Jacobian is symmetric, so the chain rule gives

        .. math::
            \frac{\partial \ell}{\partial x_k} = \sum_c g_c y_c (\delta_{ck} - y_k)
            = y_k \Big(g_k - \sum_c g_c y_c\Big), \tag{3}

        and for the batch, with the inner product taken row by row,

        .. math::
            \nabla_X \ell = Y \odot \big(G - \langle G, Y \rangle \mathbf{1}^\top\big). \tag{4}

        This costs :math:`O(Bn)`; :math:`J` itself is never formed.
        """
        outputs = self._saved(self._outputs)
        gradients = self._check_gradients(gradients, outputs.shape)
        if not input_grad:
            return None
        return self._as_shape(self.softmax_gradient(outputs, gradients, axis=1), self._columns)  # Eq. (2)-(4)


class LogSoftmaxLayer(Layer):
    r"""Log-softmax of each row: :math:`y = x - \log \sum_c e^{x_c}`.

    Feeds ``NllLossLayer``: together they are the cross-entropy of
    ``CrossEntropyLossLayer``. ``LogSoftmaxLayer(*shape, axis=1)``: ``shape``
    is accepted for the seed's signature and not otherwise needed.
    """

    def __init__(self, *shape, axis=1, dtype=np.float32):
        super().__init__(dtype)
        _check_axis(self.name, axis)
        self._softmax = None

    @staticmethod
    def stable_log_softmax(inputs, axis):
        r"""``(log_softmax, softmax)`` of ``inputs`` along ``axis``, in the dtype of ``inputs``.

        With :math:`m = \max_c x_c` and :math:`s = \sum_c e^{x_c - m} \in [1, n]`,

        .. math::
            \log y_c = (x_c - m) - \log s, \qquad y_c = \frac{e^{x_c - m}}{s}. \tag{1}

        The log is taken of :math:`s \ge 1`, never of a probability that may
        have rounded to zero, so :math:`\log y_c` is finite even where
        :math:`y_c` underflows.
        """
        inputs = _as_float_array(inputs)
        shifted = inputs - inputs.max(axis=axis, keepdims=True)  # Eq. (1)
        exponentials = np.exp(shifted)
        sums = exponentials.sum(axis=axis, keepdims=True)  # Eq. (1)
        shifted -= np.log(sums)  # Eq. (1)
        exponentials /= sums  # Eq. (1)
        return shifted, exponentials

    def forward(self, inputs, feedbacks=None):
        r"""Row :math:`i` of the output is the log-softmax of row :math:`i` of the input, Eq. (1)."""
        rows, self._columns = self._rows(inputs)
        log_softmax, softmax = self.stable_log_softmax(rows, axis=1)  # Eq. (1)
        self._softmax = self._kept(softmax)
        return self._as_shape(log_softmax, self._columns)

    def backward(self, gradients, input_grad=True):
        r"""For one sample, :math:`y_c = x_c - \log s` with :math:`s = \sum_k e^{x_k}`, and
        :math:`\partial \log s / \partial x_k = e^{x_k} / s = p_k` (the softmax), so

        .. math::
            \frac{\partial y_c}{\partial x_k} = \delta_{ck} - p_k, \qquad
            J = I - \mathbf{1} p^\top. \tag{2}

        The chain rule gives

        .. math::
            \frac{\partial \ell}{\partial x_k} = \sum_c g_c (\delta_{ck} - p_k)
            = g_k - p_k \sum_c g_c, \tag{3}

        and for the batch, with the sums taken row by row,

        .. math::
            \nabla_X \ell = G - P \odot \big(G \mathbf{1}\big) \mathbf{1}^\top. \tag{4}
        """
        softmax = self._saved(self._softmax)
        gradients = self._check_gradients(gradients, softmax.shape)
        if not input_grad:
            return None
        return self._as_shape(gradients - softmax * gradients.sum(axis=1, keepdims=True), self._columns)  # Eq. (2)-(4)
