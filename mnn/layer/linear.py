r"""The affine layer :math:`y = W x + b`."""

import numpy as np

from mnn.checks import as_generator, check_float, is_int
from mnn.layer._base import Layer

__all__ = ["LinearLayer"]


def checked_init_std(name, init_std):
    """``init_std`` (the standard deviation of a layer's initial weights) as a float,
    or ``None`` for the layer's default; else an error naming ``name``."""
    if init_std is None:
        return None
    std = check_float(name, init_std)
    if std <= 0:
        raise ValueError(f"{name}: expected a positive standard deviation, got {init_std}")
    return std


class LinearLayer(Layer):
    r"""Fully connected layer :math:`y = W x + b` with :math:`W \in \mathbb{R}^{m \times n}`.

    ``LinearLayer(n_in, n_out)``: the weight ``w`` has shape ``(n_out, n_in)``
    (the seed's and PyTorch's orientation) and the bias ``b`` shape ``(n_out,)``.

    Initialisation, drawn from ``rng`` (a ``numpy.random.Generator`` or an int
    seed), never from global state: by default He et al.'s (2015) for ReLU
    networks, :math:`W_{jk} \sim \mathcal{N}(0, 2 / n)`; with ``init_std=s``,
    :math:`W_{jk} \sim \mathcal{N}(0, s^2)` whatever :math:`n`, as GPT-2 draws
    its weights (s = 0.02; Radford et al., 2019, section 2.3, and nanoGPT's
    ``model.py``), which the ``gpt`` short form of :mod:`mnn.model` asks for.
    Either way :math:`b = 0`. ``get_config()`` holds ``init_std`` only where it
    was given, so a description without it builds a He-initialised layer.
    """

    def __init__(self, *shape, bias=True, init_std=None, dtype=np.float32, rng=None):
        super().__init__(dtype)
        if len(shape) != 2 or not all(is_int(n) and n > 0 for n in shape):
            raise ValueError(f"LinearLayer: expected shape (n_in, n_out) of two positive ints, got {shape}")
        self.n_in, self.n_out = int(shape[0]), int(shape[1])
        self.init_std = checked_init_std("LinearLayer: init_std", init_std)
        std = np.sqrt(2.0 / self.n_in) if init_std is None else self.init_std
        self._add_param("w", as_generator(rng).standard_normal((self.n_out, self.n_in)) * std)
        if bias:
            self._add_param("b", np.zeros(self.n_out))
        self._inputs = None

    def get_config(self):
        config = {"shape": [self.n_in, self.n_out], "bias": "b" in self.params}
        return config if self.init_std is None else {**config, "init_std": self.init_std}

    def forward(self, inputs, feedbacks=None):
        r"""Rows :math:`x_i^\top` of :math:`X \in \mathbb{R}^{B \times n}` map to rows
        :math:`y_i^\top = (W x_i + b)^\top = x_i^\top W^\top + b^\top`, so for the batch

        .. math::
            Y = X W^\top + \mathbf{1} b^\top. \tag{1}

        A batch of sequences ``(B, T, n)`` (any number of axes before the
        features, which come last) gets the same map at every position: its
        rows are the :math:`BT` positions, and Eq. (1) to (4) hold for them as
        written. The seed's columns ``(B, n, 1)`` are rows ``(B, n)``.
        """
        inputs = self._as_dtype(inputs)
        columns = inputs.ndim == 3 and inputs.shape[1:] == (self.n_in, 1)
        if inputs.ndim >= 3 and not columns:
            if inputs.shape[-1] != self.n_in:
                raise ValueError(f"{self.name}: expected {self.n_in} features per position, got "
                                 f"{inputs.shape[-1]} (input shape {inputs.shape})")
            rows = self._batch(inputs).reshape(-1, self.n_in)
        else:
            rows, _ = self._rows(inputs, self.n_in)
        self._inputs, self._input_shape = self._kept(rows), inputs.shape
        outputs = rows @ self.params["w"].T  # Eq. (1)
        if "b" in self.params:
            outputs += self.params["b"]  # Eq. (1)
        outputs = self._reshaped(outputs, self.n_out)
        self._output_shape = outputs.shape
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y \in \mathbb{R}^{B \times m}`.

        For one sample, :math:`y_j = \sum_k W_{jk} x_k + b_j`, so the Jacobians are
        :math:`\partial y_j / \partial W_{jk} = x_k`, :math:`\partial y_j / \partial b_j = 1`
        and :math:`\partial y / \partial x = W`. The chain rule, summed over the
        samples of the batch (each contributes to the same :math:`W`), gives

        .. math::
            \frac{\partial \ell}{\partial W_{jk}} = \sum_i G_{ij} X_{ik}
            \quad\Longrightarrow\quad \nabla_W \ell = G^\top X, \tag{2}

        .. math::
            \nabla_b \ell = \sum_i G_{i,:} = G^\top \mathbf{1}, \tag{3}

        .. math::
            \frac{\partial \ell}{\partial x_i} = W^\top g_i
            \quad\Longrightarrow\quad \nabla_X \ell = G W. \tag{4}

        The batch mean is already inside :math:`G` (taken once, at the loss).
        With ``input_grad=False`` (the first layer of a net) Eq. (4) is skipped.
        """
        inputs = self._saved(self._inputs)
        gradients = self._check_gradients(gradients, self._output_shape).reshape(-1, self.n_out)
        self._add_product_to_grad("w", gradients.T, inputs)  # Eq. (2)
        if "b" in self.params:
            self._add_to_grad("b", gradients.sum(axis=0))  # Eq. (3)
        if not input_grad:
            return None
        return self._reshaped(gradients @ self.params["w"], self.n_in)  # Eq. (4)

    def _reshaped(self, rows, width):
        """``rows`` (one per position) in the shape the input came in, with ``width`` features."""
        if self._input_shape[1:] == (self.n_in, 1):
            return rows[:, :, None]  # the seed's columns
        return rows.reshape(self._input_shape[:-1] + (width,))
