r"""Max and average pooling over windows of images ``(B, C, H, W)``, channel by channel.

Both run as :math:`k_h k_w` vectorised operations on whole strided slices of
the input, one per offset inside the window (the same slices as
:class:`~mnn.layer.conv.Conv2DLayer`'s col2im), never a loop over samples or
pixels. Windows may overlap (a stride smaller than the kernel); no padding.
Outputs and input gradients keep the memory layout of what came in (batch
last after a convolution, see :class:`~mnn.layer.conv.Conv2DLayer`).
"""

import numpy as np

from mnn.layer._base import Layer
from mnn.layer.conv import as_pair, check_images, output_length, window_slices

__all__ = ["MaxPool2DLayer", "AvgPool2DLayer"]


class _Pool2DLayer(Layer):
    """Window geometry, the input check and the offsets' slices shared by both poolings."""

    def __init__(self, kernel, stride=None, dtype=np.float32):
        super().__init__(dtype)
        self.kernel = as_pair(f"{self.name}: kernel", kernel, 1)
        self.stride = self.kernel if stride is None else as_pair(f"{self.name}: stride", stride, 1)
        self._input_shape = None

    def get_config(self):
        return {"kernel": list(self.kernel), "stride": list(self.stride)}

    def _images(self, inputs):
        inputs = check_images(self, inputs, self.kernel)
        self._input_shape = self._kept(inputs.shape)
        return inputs

    def _output_shape(self, input_shape):
        return (*input_shape[:2], *(output_length(input_shape[2 + axis], self.kernel[axis], self.stride[axis])
                                    for axis in (0, 1)))

    def _offsets(self, output_shape):
        """``(offset, rows, cols)`` for every offset ``(a, e)`` inside the window, in C
        order (``offset = a * kw + e``); see :func:`~mnn.layer.conv.window_slices`."""
        for a, e, rows, cols in window_slices(self.kernel, self.stride, output_shape[2:]):
            yield a * self.kernel[1] + e, rows, cols


class MaxPool2DLayer(_Pool2DLayer):
    r"""The largest value of every ``kernel`` window, per channel, as PyTorch's ``MaxPool2d``.

    ``MaxPool2DLayer(kernel, stride=None)``: ``kernel`` and ``stride`` are an int
    or a pair ``(along H, along W)``; ``stride`` defaults to ``kernel``
    (windows that tile the image). The gradient goes to the arg-max of each
    window; when several entries tie for the maximum it goes to the first of them
    in C order, row by row inside the window (the one with the smallest
    :math:`a k_w + e`). Where overlapping windows share an arg-max, it
    receives the gradient of each.

    No arg-max is kept: forward is :math:`k_h k_w - 1` element-wise maxima, and
    backward finds each window's arg-max again by comparing the input with the
    output (it keeps both, and the input is the previous layer's output, kept
    there anyway). Recording the arg-max in forward took a masked copy and a
    masked assignment per offset, several times the maxima's cost.
    """

    def __init__(self, kernel, stride=None, dtype=np.float32):
        super().__init__(kernel, stride, dtype)
        self._saved_forward = None

    def forward(self, inputs, feedbacks=None):
        r"""For sample :math:`i`, channel :math:`c` and output position :math:`(u, v)`,
        the window's entries are :math:`X_{i,c,\,s_h u + a,\, s_w v + e}` for
        offsets :math:`0 \le a < k_h`, :math:`0 \le e < k_w`, and

        .. math::
            Y_{icuv} = \max_{a, e} X_{i,c,\,s_h u + a,\, s_w v + e}. \tag{1}
        """
        inputs = self._images(inputs)
        outputs = None
        for _, rows, cols in self._offsets(self._output_shape(inputs.shape)):
            entries = inputs[:, :, rows, cols]
            if outputs is None:  # in the input's memory layout (batch last after a convolution)
                outputs = entries.copy(order="K")
            else:
                np.maximum(outputs, entries, out=outputs)  # Eq. (1)
        self._saved_forward = self._kept((inputs, outputs))
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`: by Eq. (1), :math:`Y_{icuv}` is
        the input entry at :math:`(s_h u + a^*, s_w v + e^*)`, the window's arg-max,

        .. math::
            (a^*, e^*)_{icuv} = \text{the first } (a, e) \text{ in C order with }
            X_{i,c,\,s_h u + a,\, s_w v + e} = Y_{icuv}, \tag{2}

        so its derivative is 1 with respect to that entry and 0 with respect to the
        others of the window (a subgradient where entries tie). Summing over the
        windows that hold an entry,

        .. math::
            \frac{\partial \ell}{\partial X_{icyx}} = \sum_{u, v:\; (s_h u + a^*, s_w v + e^*) = (y, x)}
            G_{icuv}. \tag{3}

        Over the offsets in C order, an offset is the arg-max of the windows whose
        entry there equals the maximum and that no earlier offset claimed; those
        windows add their :math:`G` into that offset's strided slice of the
        gradient (write it, where windows do not overlap and so no entry has two).
        """
        inputs, outputs = self._saved(self._saved_forward)
        gradients = self._check_gradients(gradients, outputs.shape)
        if not input_grad:
            return None
        if gradients.strides != outputs.strides:  # one copy, so every pass below runs in one memory order
            aligned = np.empty_like(outputs)
            aligned[...] = gradients
            gradients = aligned
        overlapping = any(step < size for step, size in zip(self.stride, self.kernel))
        # In the input's memory layout (batch last before a convolution), as the input was.
        input_gradients = np.zeros_like(inputs)
        unclaimed = None
        for _, rows, cols in self._offsets(outputs.shape):
            argmax = inputs[:, :, rows, cols] == outputs  # Eq. (2)
            if unclaimed is None:
                unclaimed = ~argmax
            else:
                argmax &= unclaimed  # Eq. (2): ties stay with the first offset
                unclaimed &= ~argmax
            if overlapping:
                input_gradients[:, :, rows, cols] += gradients * argmax  # Eq. (3)
            else:
                np.multiply(gradients, argmax, out=input_gradients[:, :, rows, cols])  # Eq. (3)
        return input_gradients


class AvgPool2DLayer(_Pool2DLayer):
    r"""The mean of every ``kernel`` window, per channel, as PyTorch's ``AvgPool2d`` (no padding).

    ``AvgPool2DLayer(kernel, stride=None)``: ``kernel`` and ``stride`` are an int
    or a pair ``(along H, along W)``; ``stride`` defaults to ``kernel``.
    A ``kernel`` the size of the image is global average pooling.
    """

    def forward(self, inputs, feedbacks=None):
        r"""For sample :math:`i`, channel :math:`c` and output position :math:`(u, v)`,

        .. math::
            Y_{icuv} = \frac{1}{k_h k_w} \sum_{a, e} X_{i,c,\,s_h u + a,\, s_w v + e}. \tag{1}
        """
        inputs = self._images(inputs)
        output_shape = self._output_shape(inputs.shape)
        outputs = None
        for _, rows, cols in self._offsets(output_shape):
            entries = inputs[:, :, rows, cols]
            if outputs is None:  # in the input's memory layout (batch last after a convolution)
                outputs = entries.copy(order="K")  # Eq. (1)
            else:
                outputs += entries  # Eq. (1)
        outputs *= self.dtype.type(1 / (self.kernel[0] * self.kernel[1]))  # Eq. (1)
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`: by Eq. (1) every entry of a
        window has derivative :math:`1 / (k_h k_w)`, and an entry gets it from every
        window that holds it:

        .. math::
            \frac{\partial \ell}{\partial X_{icyx}} = \frac{1}{k_h k_w}
            \sum_{a, e, u, v:\; (s_h u + a, s_w v + e) = (y, x)} G_{icuv}. \tag{2}
        """
        input_shape = self._saved(self._input_shape)
        output_shape = self._output_shape(input_shape)
        gradients = self._check_gradients(gradients, output_shape)
        if not input_grad:
            return None
        share = gradients * self.dtype.type(1 / (self.kernel[0] * self.kernel[1]))  # Eq. (2)
        input_gradients = np.zeros_like(share, shape=input_shape)  # in the gradient's memory layout
        for _, rows, cols in self._offsets(output_shape):
            input_gradients[:, :, rows, cols] += share  # Eq. (2)
        return input_gradients
