r"""Reshaping: the same numbers per sample, arranged in another shape."""

import numpy as np

from mnn.checks import is_int
from mnn.layer._base import Layer

__all__ = ["ReshapeLayer"]


class ReshapeLayer(Layer):
    r"""Give every sample the shape ``shape``: ``(B, *in_shape)`` becomes ``(B, *shape)``.

    ``ReshapeLayer(8, 8)`` turns 64 features into a sequence of 8 positions of
    8 features (for ``MultiHeadAttention``), ``ReshapeLayer(64)`` flattens it
    back. The number of values per sample must stay the same. Elements keep
    their order (NumPy's C order), so the layer only relabels positions.
    """

    def __init__(self, *shape, dtype=np.float32):
        super().__init__(dtype)
        if not shape or not all(is_int(n) and n > 0 for n in shape):
            raise ValueError(f"ReshapeLayer: expected a per-sample shape of positive ints, got {shape}")
        self.shape = tuple(int(n) for n in shape)
        self._input_shape = None

    def get_config(self):
        return {"shape": list(self.shape)}

    def forward(self, inputs, feedbacks=None):
        r"""With :math:`\operatorname{vec}` listing a sample's values in C order,

        .. math::
            \operatorname{vec}(Y_i) = \operatorname{vec}(X_i). \tag{1}
        """
        inputs = self._batch(inputs)
        size, wanted = int(np.prod(inputs.shape[1:])), int(np.prod(self.shape))
        if size != wanted:
            raise ValueError(f"{self.name}: expected {wanted} values per sample to make shape {self.shape}, "
                             f"got {size} (input shape {inputs.shape})")
        self._input_shape = self._kept(inputs.shape)
        return inputs.reshape((inputs.shape[0], *self.shape))  # Eq. (1)

    def backward(self, gradients, input_grad=True):
        r"""By Eq. (1) the Jacobian of :math:`\operatorname{vec}(Y_i)` with respect to
        :math:`\operatorname{vec}(X_i)` is the identity, so the gradient is the
        incoming one, arranged back in the input's shape:

        .. math::
            \operatorname{vec}(\nabla_{X_i} \ell) = \operatorname{vec}(G_i). \tag{2}
        """
        input_shape = self._saved(self._input_shape)
        gradients = self._check_gradients(gradients, (input_shape[0], *self.shape))
        if not input_grad:
            return None
        return gradients.reshape(input_shape)  # Eq. (2)
