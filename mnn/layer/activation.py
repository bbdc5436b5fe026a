r"""Element-wise activations: layers without parameters whose Jacobian is diagonal.

They take a batch of any per-sample shape, ``(B, n)``, the seed's ``(B, n, 1)``
or a sequence ``(B, T, d)``, and keep it.
"""

import numpy as np

from mnn.layer._base import Layer

__all__ = ["ReluLayer", "LogLayer"]


class ReluLayer(Layer):
    r"""Rectified linear unit :math:`y = \max(x, 0)`, element-wise."""

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        self._outputs = None

    def forward(self, inputs, feedbacks=None):
        r"""
        .. math::
            Y_{ij} = \max(X_{ij}, 0). \tag{1}
        """
        self._outputs = np.maximum(self._batch(inputs), 0)  # Eq. (1)
        return self._outputs

    def backward(self, gradients, input_grad=True):
        r"""Each output depends only on the input at the same place, so the
        Jacobian :math:`\partial Y_{ij} / \partial X_{kl}` is zero unless
        :math:`(i, j) = (k, l)`, where it is the step function:

        .. math::
            \frac{\partial Y_{ij}}{\partial X_{ij}} = \mathbb{1}[X_{ij} > 0]
            = \mathbb{1}[Y_{ij} > 0]. \tag{2}

        Multiplying :math:`G` by a diagonal Jacobian is an element-wise product:

        .. math::
            \nabla_X \ell = G \odot \mathbb{1}[Y > 0]. \tag{3}

        (At :math:`x = 0` we take the subgradient 0, as PyTorch does.)
        """
        outputs = self._saved(self._outputs)
        gradients = self._check_gradients(gradients, outputs.shape)
        if not input_grad:
            return None
        # A product with the 0/1 mask, not np.where: where() branches per element
        # and runs an order of magnitude slower on a random sign pattern.
        return gradients * (outputs > 0)  # Eq. (2), (3)


class LogLayer(Layer):
    r"""Natural logarithm :math:`y = \log x`, element-wise, for positive inputs.

    Negative inputs raise ``ValueError`` (the log is undefined there); a zero
    gives :math:`-\infty`, as in NumPy. To take the log of a softmax, use
    ``LogSoftmaxLayer``: it never rounds a small probability to zero first.
    """

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        self._inputs = None

    def forward(self, inputs, feedbacks=None):
        r"""
        .. math::
            Y_{ij} = \log X_{ij}. \tag{1}
        """
        inputs = self._batch(inputs)
        if inputs.min() < 0:
            raise ValueError(f"{self.name}: expected inputs >= 0, got minimum {inputs.min()}")
        self._inputs = inputs
        return np.log(inputs)  # Eq. (1)

    def backward(self, gradients, input_grad=True):
        r"""As for every element-wise map, the Jacobian is diagonal:

        .. math::
            \frac{\partial Y_{ij}}{\partial X_{ij}} = \frac{1}{X_{ij}}, \tag{2}

        so multiplying :math:`G` by it divides element by element:

        .. math::
            \nabla_X \ell = G \oslash X. \tag{3}
        """
        inputs = self._saved(self._inputs)
        gradients = self._check_gradients(gradients, inputs.shape)
        if not input_grad:
            return None
        return gradients / inputs  # Eq. (2), (3)
