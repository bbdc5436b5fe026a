r"""Element-wise activations: layers without parameters whose Jacobian is diagonal."""

import numpy as np

from mnn.layer._base import Layer

__all__ = ["ReluLayer"]


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
        rows, self._columns = self._rows(inputs)
        self._outputs = np.maximum(rows, 0)  # Eq. (1)
        return self._as_shape(self._outputs, self._columns)

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
        return self._as_shape(np.where(outputs > 0, gradients, 0), self._columns)  # Eq. (2), (3)
