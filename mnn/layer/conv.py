r"""Two-dimensional convolution over a batch of images ``(B, C, H, W)``, as matrix products.

:func:`as_pair`, :func:`output_length` and :func:`window_slices` are the window geometry that the
convolution and the pooling layers (:mod:`mnn.layer.pooling`) share, and that
:func:`mnn.model.model_size` uses to count their numbers.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mnn.checks import as_generator, is_int
from mnn.layer._base import Layer

__all__ = ["Conv2DLayer", "as_pair", "output_length"]


def as_pair(name, value, minimum):
    """``value``, an int or a pair of ints (a tuple or a list, as a description gives it),
    as a tuple ``(along H, along W)`` of ints each at least ``minimum``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(is_int(n) and n >= minimum for n in pair):
        raise ValueError(f"{name}: expected an integer >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def output_length(size, kernel, stride, padding=0):
    r"""Window positions along an axis of ``size`` with ``padding`` on both sides:
    :math:`\lfloor (n + 2p - k) / s \rfloor + 1`, the last window ending inside the
    padded axis (0 when the kernel is longer than it)."""
    padded = size + 2 * padding
    return (padded - kernel) // stride + 1 if padded >= kernel else 0


def window_slices(kernel, stride, output_size):
    """``(a, e, rows, cols)`` for every offset ``(a, e)`` inside a ``kernel`` window, in C
    order: the slices ``[rows, cols]`` of the (padded) image that the windows' entries
    at that offset form, one per position of an ``output_size`` ``(Ho, Wo)`` output."""
    (kh, kw), (sh, sw), (out_height, out_width) = kernel, stride, output_size
    for a in range(kh):
        for e in range(kw):
            yield a, e, slice(a, a + sh * (out_height - 1) + 1, sh), slice(e, e + sw * (out_width - 1) + 1, sw)


def check_images(layer, inputs, kernel, padding=(0, 0)):
    """``inputs`` as a batch of images ``(B, C, H, W)`` in the layer's dtype, checked to
    be non-empty and to hold at least one ``kernel`` window after ``padding``."""
    inputs = layer._as_dtype(inputs)
    if inputs.ndim != 4:
        raise ValueError(f"{layer.name}: expected images of shape (batch, channels, height, width), "
                         f"got shape {inputs.shape}")
    if inputs.shape[0] == 0:
        raise ValueError(f"{layer.name}: expected at least one sample, got an empty batch of shape {inputs.shape}")
    padded = (inputs.shape[2] + 2 * padding[0], inputs.shape[3] + 2 * padding[1])
    if padded[0] < kernel[0] or padded[1] < kernel[1]:
        raise ValueError(f"{layer.name}: the kernel {kernel} is larger than the input's height and width "
                         f"{padded} (padding {padding} included; input shape {inputs.shape})")
    return inputs


class Conv2DLayer(Layer):
    r"""Cross-correlation of ``(B, C, H, W)`` images with ``out_channels`` filters, as PyTorch's ``Conv2d``.

    ``Conv2DLayer(in_channels, out_channels, kernel, stride=1, padding=0, bias=True)``:
    ``kernel``, ``stride`` and ``padding`` (zeros added on each side) are an int
    or a pair ``(along H, along W)``. The weight ``w`` has shape
    ``(out_channels, in_channels, kh, kw)`` and the bias ``b`` shape
    ``(out_channels,)``, as in PyTorch. The output is ``(B, out_channels, Ho, Wo)``
    with :math:`H_o = \lfloor (H + 2p_h - k_h) / s_h \rfloor + 1` (and so
    :math:`W_o`). ``ReshapeLayer(C * H * W)`` flattens images for a
    ``LinearLayer``.

    Initialisation (He et al., 2015, for ReLU networks), drawn from ``rng``:
    :math:`W \sim \mathcal{N}(0, 2 / n)` with fan-in :math:`n = C k_h k_w`, and
    :math:`b = 0`.

    Method: im2col. A strided view of the zero-padded input (NumPy's
    ``sliding_window_view``) exposes every window without copying; one copy lays
    the windows out as the columns of a matrix :math:`X_c` of shape
    :math:`(C k_h k_w) \times (B H_o W_o)`, and the convolution, its weight
    gradient and its input gradient are then one large matrix product each, done by
    BLAS's GEMM, which runs far faster than any loop over windows in NumPy. Inside,
    images are held batch last, ``(C, H, W, B)``, and the columns laid out
    ``(C, kh, kw, Ho, Wo, B)``: the copy into the columns and the gradient's
    scatter back (col2im) then move runs of ``Wo * B`` numbers (of ``B`` where
    the stride along W is not 1) instead of ``Wo``, whose per-run overhead in
    NumPy made them the slowest part; every product is a single GEMM on contiguous or plainly
    transposed matrices. The output and the input gradient are ``(B, C, H, W)``
    views of batch-last arrays (not C-contiguous): the layers that follow keep
    that layout, so a stack of convolutions, activations and pooling never moves
    the batch axis back and forth (a transposing copy of the output cost as much
    as the forward GEMM's inner loops). The price is memory:
    :math:`X_c` holds :math:`k_h k_w / (s_h s_w)` times the input, and is kept for
    backward.
    """

    def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0, bias=True, dtype=np.float32,
                 rng=None):
        super().__init__(dtype)
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not is_int(value) or value < 1:
                raise ValueError(f"Conv2DLayer: expected {what} as a positive int, got {value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel = as_pair("Conv2DLayer: kernel", kernel, 1)
        self.stride = as_pair("Conv2DLayer: stride", stride, 1)
        self.padding = as_pair("Conv2DLayer: padding", padding, 0)
        rng = as_generator(rng)
        fan_in = self.in_channels * self.kernel[0] * self.kernel[1]
        shape = (self.out_channels, self.in_channels, *self.kernel)
        self._add_param("w", rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
        if bias:
            self._add_param("b", np.zeros(self.out_channels))
        self._saved_forward = None

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "bias": "b" in self.params}

    def forward(self, inputs, feedbacks=None):
        r"""With :math:`\tilde X` the input padded by :math:`p_h, p_w` zeros,
        output channel :math:`o` at position :math:`(u, v)` of sample :math:`i` is

        .. math::
            Y_{iouv} = b_o + \sum_{c, a, e} W_{ocae}\, \tilde X_{i,c,\,s_h u + a,\, s_w v + e}. \tag{1}

        Name a column by its position and sample, :math:`n = (u, v, i)`, and a row by
        what the sum runs over, :math:`r = (c, a, e)`: the im2col matrix

        .. math::
            (X_c)_{rn} = \tilde X_{i,c,\,s_h u + a,\, s_w v + e} \tag{2}

        turns Eq. (1) into one product with the weight reshaped to
        :math:`W_m \in \mathbb{R}^{O \times C k_h k_w}`:

        .. math::
            Y_m = W_m X_c + b \mathbf{1}^\top, \qquad (Y_m)_{on} = Y_{iouv}. \tag{3}
        """
        inputs = check_images(self, inputs, self.kernel, self.padding)
        if inputs.shape[1] != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} input channels, got {inputs.shape[1]} "
                             f"(input shape {inputs.shape})")
        (kh, kw), (sh, sw) = self.kernel, self.stride
        padded = self._padded(inputs)
        # (C, H', W', B, kh, kw) windows of stride 1; every s-th is a window of the convolution.
        windows = sliding_window_view(padded, self.kernel, axis=(1, 2))[:, ::sh, ::sw]
        height, width, batch = windows.shape[1:4]
        columns = np.empty((self.in_channels, kh, kw, height, width, batch), dtype=self.dtype)
        np.copyto(columns, windows.transpose(0, 4, 5, 1, 2, 3))  # Eq. (2)
        columns = columns.reshape(self.in_channels * kh * kw, -1)
        outputs = self.params["w"].reshape(self.out_channels, -1) @ columns  # Eq. (1), (3)
        # (B, O, Ho, Wo) as a view of the batch-last product: no copy here, and the
        # layers after it (element-wise, pooling, the next convolution) keep or want that layout.
        outputs = outputs.reshape(self.out_channels, height, width, batch).transpose(3, 0, 1, 2)
        if "b" in self.params:
            outputs += self.params["b"][:, None, None]  # Eq. (3)
        self._saved_forward = self._kept((columns, padded.shape, inputs.shape, outputs.shape))
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`, arranged as :math:`G_m` the way
        Eq. (3) arranges :math:`Y` (row :math:`o`, column :math:`n = (u, v, i)`).
        Eq. (3) is the product of the linear layer with the columns as the samples,
        so its gradients are those of the linear layer (summed over every position
        of every sample, as each uses the same weights):

        .. math::
            \nabla_{W_m} \ell = G_m X_c^\top, \tag{4}

        .. math::
            \nabla_b \ell = G_m \mathbf{1} = \sum_{i, u, v} G_{iouv}, \tag{5}

        .. math::
            \nabla_{X_c} \ell = W_m^\top G_m. \tag{6}

        By Eq. (2) each entry of :math:`X_c` is a copy of one entry of :math:`\tilde X`,
        and an entry of :math:`\tilde X` is copied once for every window that covers it,
        so its gradient is the sum over those copies (col2im):

        .. math::
            \frac{\partial \ell}{\partial \tilde X_{icyx}} = \sum_{\substack{a, e, u, v:\;
            s_h u + a = y,\; s_w v + e = x}} \big(\nabla_{X_c} \ell\big)_{(c, a, e),\,(u, v, i)}. \tag{7}

        For a fixed kernel offset :math:`(a, e)` the positions :math:`(s_h u + a, s_w v + e)`
        are a strided slice of :math:`\tilde X`, so Eq. (7) is :math:`k_h k_w` vectorised
        additions of whole slices. The input's gradient is that of :math:`\tilde X`
        without the padding. With ``input_grad=False`` Eq. (6) and (7) are skipped.
        """
        columns, padded_shape, input_shape, output_shape = self._saved(self._saved_forward)
        gradients = self._check_gradients(gradients, output_shape)
        # (O, Ho, Wo, B): the order of Eq. (3)'s columns; no copy when the gradient
        # comes batch last, as the layers after this one give it.
        gradient_matrix = np.ascontiguousarray(gradients.transpose(1, 2, 3, 0)).reshape(self.out_channels, -1)
        batch = output_shape[0]
        # The (O, C k_h k_w) product is small beside the GEMM's inputs; a temporary costs nothing.
        self._add_to_grad("w", (gradient_matrix @ columns.T).reshape(self.params["w"].shape))  # Eq. (4)
        if "b" in self.params:
            self._add_to_grad("b", gradient_matrix.sum(axis=1))  # Eq. (5)
        if not input_grad:
            return None
        weights = self.params["w"].reshape(self.out_channels, -1)
        column_gradients = (weights.T @ gradient_matrix).reshape(  # Eq. (6)
            self.in_channels, *self.kernel, *output_shape[2:], batch)
        # Accumulated batch last, as the input was padded, so every addition moves runs of Wo * B numbers.
        padded_gradients = np.zeros(padded_shape, dtype=self.dtype)
        for a, e, rows, cols in window_slices(self.kernel, self.stride, output_shape[2:]):
            padded_gradients[:, rows, cols] += column_gradients[:, a, e]  # Eq. (7)
        (ph, pw), (in_height, in_width) = self.padding, input_shape[2:]
        unpadded = padded_gradients[:, ph:ph + in_height, pw:pw + in_width]
        return unpadded.transpose(3, 0, 1, 2)  # Eq. (7), a batch-last view as the output

    def _padded(self, inputs):
        """``inputs`` batch last, ``(C, H', W', B)``, with ``padding`` zeros on both sides of H and W."""
        (ph, pw), (batch, channels, height, width) = self.padding, inputs.shape
        padded = np.empty((channels, height + 2 * ph, width + 2 * pw, batch), dtype=self.dtype)
        if ph or pw:
            padded[...] = 0
        padded[:, ph:ph + height, pw:pw + width] = inputs.transpose(1, 2, 3, 0)
        return padded
