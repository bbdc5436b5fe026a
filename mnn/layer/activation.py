r"""Element-wise activations: layers without parameters whose Jacobian is diagonal.

They take a batch of any per-sample shape, ``(B, n)``, the seed's ``(B, n, 1)``
or a sequence ``(B, T, d)``, and keep it.
"""

import numpy as np

from mnn.checks import check_choice
from mnn.layer._base import Layer

__all__ = ["ReluLayer", "LogLayer", "GeluLayer"]


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
        outputs = np.maximum(self._batch(inputs), 0)  # Eq. (1)
        self._outputs = self._kept(outputs)
        return outputs

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
        self._inputs = self._kept(inputs)
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


class GeluLayer(Layer):
    r"""Gaussian error linear unit (Hendrycks & Gimpel, 2016) in its tanh form, element-wise.

    GELU is :math:`x \Phi(x)`, with :math:`\Phi` the standard normal CDF. This
    layer computes the approximation

    .. math::
        \operatorname{GELU}(x) \approx \tfrac{1}{2} x \big(1 + \tanh(u)\big), \qquad
        u = \sqrt{2/\pi}\,\big(x + 0.044715\, x^3\big),

    which GPT-2 uses and PyTorch offers as ``gelu(x, approximate="tanh")``, so
    a model trained here matches both. It differs from :math:`x\Phi(x)` by at
    most :math:`4.8 \cdot 10^{-4}` (near :math:`|x| = 2.7`). The exact form needs
    :math:`\operatorname{erf}`, which NumPy does not vectorise (``math.erf`` is
    one float at a time, SciPy is not a dependency), while :math:`\tanh` is one
    vectorised ufunc. ``approximate`` takes only ``"tanh"``; it is there so a
    description names the form it trains with.
    """

    _SQRT_2_OVER_PI = np.sqrt(2 / np.pi)
    _CUBIC = 0.044715

    def __init__(self, approximate="tanh", dtype=np.float32):
        super().__init__(dtype)
        self.approximate = check_choice("GeluLayer: approximate", approximate, ("tanh",))
        self._saved_forward = None

    def get_config(self):
        return {"approximate": self.approximate}

    def forward(self, inputs, feedbacks=None):
        r"""
        .. math::
            U_{ij} = \sqrt{2/\pi}\,\big(X_{ij} + 0.044715\, X_{ij}^3\big), \qquad
            T_{ij} = \tanh U_{ij}, \tag{1}

        .. math::
            Y_{ij} = \tfrac{1}{2} X_{ij} \big(1 + T_{ij}\big). \tag{2}
        """
        inputs = self._batch(inputs)
        c, a = self.dtype.type(self._SQRT_2_OVER_PI), self.dtype.type(self._CUBIC * self._SQRT_2_OVER_PI)
        tanh = np.square(inputs)
        tanh *= a
        tanh += c
        tanh *= inputs  # Eq. (1): U = x (c + c a x^2)
        np.tanh(tanh, out=tanh)  # Eq. (1)
        half_inputs = inputs * self.dtype.type(0.5)
        self._saved_forward = self._kept((half_inputs, tanh))
        # In evaluation T is not kept, so the output takes its place: one array fewer.
        outputs = np.multiply(half_inputs, tanh, out=None if self.training else tanh)  # Eq. (2)
        outputs += half_inputs  # Eq. (2)
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Each output depends only on the input at the same place, so the
        Jacobian is diagonal. With :math:`\tanh' = 1 - \tanh^2` and
        :math:`dU/dx = \sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\, x^2)`, Eq. (1)
        and (2) give

        .. math::
            \frac{\partial Y_{ij}}{\partial X_{ij}} = \tfrac{1}{2}\big(1 + T_{ij}\big)
            + \tfrac{1}{2} X_{ij} \big(1 - T_{ij}^2\big) \sqrt{2/\pi}\,\big(1 + 0.134145\, X_{ij}^2\big), \tag{3}

        and multiplying :math:`G` by the diagonal Jacobian is an element-wise product:

        .. math::
            \nabla_X \ell = G \odot \frac{\partial Y}{\partial X}. \tag{4}
        """
        half_inputs, tanh = self._saved(self._saved_forward)
        gradients = self._check_gradients(gradients, tanh.shape)
        if not input_grad:
            return None
        # In x/2 = h: dY/dX = (1 + T)/2 + h (1 - T^2) (c + 4 * 3a h^2), a = 0.044715 c.
        c, a = self.dtype.type(self._SQRT_2_OVER_PI), self.dtype.type(self._CUBIC * self._SQRT_2_OVER_PI)
        slope = np.square(half_inputs)
        slope *= 12 * a
        slope += c  # dU/dX
        slope *= half_inputs
        slope *= 1 - np.square(tanh)  # Eq. (3): the tanh term
        slope += self.dtype.type(0.5)
        slope += self.dtype.type(0.5) * tanh  # Eq. (3)
        slope *= gradients  # Eq. (4)
        return slope
