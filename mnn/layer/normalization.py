r"""Normalisation layers with closed-form backward passes: layer normalisation (Ba, Kiros &
Hinton, 2016) over the feature axis of each sample, and batch normalisation (Ioffe & Szegedy,
2015) per channel over the batch, whose statistics in data-parallel training are those of the
global batch (the trainer hands the layer a sum over the ranks; :mod:`mnn` itself knows no MPI)."""

import numpy as np

from mnn.checks import check_float, check_int
from mnn.layer._base import Layer, _check_batch_reduction

__all__ = ["LayerNormLayer", "BatchNormLayer"]


class LayerNormLayer(Layer):
    r"""Normalise each row of features to mean 0 and variance 1, then scale and shift.

    ``LayerNormLayer(d, eps=1e-5)`` normalises over the last axis, of size
    ``d``, of any input ``(B, ..., d)``: every position of a sequence
    ``(B, T, d)`` on its own. The gain ``g`` (:math:`\gamma`, ones) and bias
    ``b`` (:math:`\beta`, zeros) have shape ``(d,)``. As in PyTorch's
    ``LayerNorm``, the variance is the biased one (divided by :math:`d`) and
    :math:`\epsilon` is added inside the square root.
    """

    def __init__(self, d, eps=1e-5, dtype=np.float32):
        super().__init__(dtype)
        self.d = check_int("LayerNormLayer: d", d, minimum=1)
        self.eps = check_float("LayerNormLayer: eps", eps)
        if self.eps <= 0:
            raise ValueError(f"LayerNormLayer: expected eps > 0 (it keeps a constant row finite), got {eps}")
        self._add_param("g", np.ones(self.d))
        self._add_param("b", np.zeros(self.d))
        self._saved_forward = None

    def get_config(self):
        return {"d": self.d, "eps": self.eps}

    def forward(self, inputs, feedbacks=None):
        r"""For one row :math:`x \in \mathbb{R}^d` (one sample, or one position),

        .. math::
            \mu = \frac{1}{d} \sum_k x_k, \qquad
            \sigma^2 = \frac{1}{d} \sum_k (x_k - \mu)^2, \tag{1}

        .. math::
            \hat x_k = \frac{x_k - \mu}{s}, \qquad s = \sqrt{\sigma^2 + \epsilon}, \tag{2}

        .. math::
            y_k = \gamma_k \hat x_k + \beta_k. \tag{3}

        The variance is taken of the centred values (two passes), not as
        :math:`\overline{x^2} - \mu^2`, which cancels catastrophically in
        float32 when :math:`|\mu| \gg \sigma`.
        """
        inputs = self._batch(inputs)
        if inputs.shape[-1] != self.d:
            raise ValueError(f"{self.name}: expected {self.d} features on the last axis, got "
                             f"{inputs.shape[-1]} (input shape {inputs.shape})")
        rows = inputs.reshape(-1, self.d)
        # Row means as a matrix-vector product with (1/d, ..., 1/d): BLAS, 4x
        # faster than rows.mean(axis=1) on (2048, 128) float32. Row dot products
        # by einsum, 2.5x faster than a product and a sum.
        averaging = np.full(self.d, 1 / self.d, dtype=self.dtype)
        centered = rows - (rows @ averaging)[:, None]  # Eq. (1)
        variance = np.einsum("nk,nk->n", centered, centered) / self.dtype.type(self.d)  # Eq. (1)
        inverse_std = 1 / np.sqrt(variance + self.dtype.type(self.eps))  # Eq. (2)
        normalized = np.multiply(centered, inverse_std[:, None], out=centered)  # Eq. (2)
        self._saved_forward = self._kept((normalized, inverse_std, averaging, inputs.shape))
        outputs = normalized * self.params["g"]  # Eq. (3)
        outputs += self.params["b"]  # Eq. (3)
        return outputs.reshape(inputs.shape)

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`, per row :math:`g_k = G_k \gamma_k`
        is :math:`\partial \ell / \partial \hat x_k` by Eq. (3). Differentiating
        Eq. (1) and (2): :math:`\partial \mu / \partial x_m = 1/d` and, since
        :math:`\sum_k (x_k - \mu) = 0`,
        :math:`\partial s / \partial x_m = (x_m - \mu) / (d s) = \hat x_m / d`, so

        .. math::
            \frac{\partial \hat x_k}{\partial x_m}
            = \frac{1}{s}\Big(\delta_{km} - \frac{1}{d}\Big) - \frac{x_k - \mu}{s^2} \frac{\hat x_m}{d}
            = \frac{1}{s}\Big(\delta_{km} - \frac{1}{d} - \frac{\hat x_k \hat x_m}{d}\Big), \tag{4}

        a :math:`d \times d` Jacobian :math:`\frac{1}{s}(I - \frac{1}{d}\mathbf{1}\mathbf{1}^\top
        - \frac{1}{d}\hat x \hat x^\top)`: the identity minus two rank-one terms,
        symmetric. Its product with :math:`g` therefore needs only two means per row:

        .. math::
            \frac{\partial \ell}{\partial x_m} = \sum_k g_k \frac{\partial \hat x_k}{\partial x_m}
            = \frac{1}{s}\Big(g_m - \overline{g} - \hat x_m\, \overline{g \odot \hat x}\Big), \tag{5}

        with :math:`\overline{v} = \frac{1}{d}\sum_k v_k`: :math:`O(d)` per row,
        the Jacobian is never formed. The gain and bias enter every row (every
        sample and position) through Eq. (3), so their gradients sum over all
        leading axes:

        .. math::
            \nabla_\gamma \ell = \sum_{\text{rows}} G \odot \hat X, \qquad
            \nabla_\beta \ell = \sum_{\text{rows}} G. \tag{6}
        """
        normalized, inverse_std, averaging, shape = self._saved(self._saved_forward)
        gradients = self._check_gradients(gradients, shape).reshape(-1, self.d)
        self._add_to_grad("g", np.einsum("nk,nk->k", gradients, normalized))  # Eq. (6)
        self._add_to_grad("b", np.ones(len(gradients), dtype=self.dtype) @ gradients)  # Eq. (6)
        if not input_grad:
            return None
        scaled = gradients * self.params["g"]  # g = G γ
        mean_scaled = scaled @ averaging  # Eq. (5)
        mean_product = np.einsum("nk,nk->n", scaled, normalized) / self.dtype.type(self.d)  # Eq. (5)
        scaled -= normalized * mean_product[:, None]  # Eq. (4), (5)
        scaled -= mean_scaled[:, None]  # Eq. (5)
        scaled *= inverse_std[:, None]  # Eq. (5)
        return scaled.reshape(shape)


class BatchNormLayer(Layer):
    r"""Normalise each channel to mean 0 and variance 1 over the batch, then scale and shift.

    ``BatchNormLayer(channels, eps=1e-5, momentum=0.1)`` takes inputs ``(B, C)``
    or ``(B, C, *spatial)`` (``(B, C, H, W)`` after a convolution) with
    :math:`C` = ``channels``; the statistics of channel :math:`c` are over its
    :math:`n = B \prod \text{spatial}` values, all samples and positions. The
    gain ``g`` (:math:`\gamma`, ones) and bias ``b`` (:math:`\beta`, zeros) have
    shape ``(C,)``. As in PyTorch, the variance that normalises is the biased
    one (divided by :math:`n`) and :math:`\epsilon` is added inside the root.

    **Global statistics.** In data-parallel training every rank holds a shard of
    the global batch; the layer's mean and variance are those of the whole global
    batch (as PyTorch's ``SyncBatchNorm`` and Horovod's ``hvd.SyncBatchNorm``),
    so N ranks train what one process trains. The sums over the ranks come from
    ``set_batch_reduction(reduce)``: ``reduce(array)`` returns the elementwise
    sum of ``array`` over the ranks (the trainer passes an all-reduce); without
    it (``None``, the default) the batch is this process's. A forward in training
    makes two reductions and a backward one, each of :math:`C` or so numbers
    (float64), on every rank alike; a rank with no samples of a batch takes
    part through ``forward_no_samples()`` and ``backward_no_samples()``.

    **Running statistics** (buffers ``running_mean``, zeros, and ``running_var``,
    ones, saved with the model but never stepped) follow PyTorch's convention:
    ``momentum`` :math:`m` weighs the new batch, and the variance they keep is
    the unbiased one, :math:`\frac{n}{n-1} \sigma^2` with :math:`n` the global
    count (Eq. (5) of :meth:`forward`); Keras's momentum 0.99 is this one's 0.01.
    Every rank updates them from the same global statistics, so they are
    equal on every rank. In evaluation (``set_training(False)``,
    ``with net.evaluating():``) they normalise instead of the batch's, and
    nothing is reduced.
    """

    def __init__(self, channels, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__(dtype)
        self.channels = check_int("BatchNormLayer: channels", channels, minimum=1)
        self.eps = check_float("BatchNormLayer: eps", eps)
        if self.eps <= 0:
            raise ValueError(f"BatchNormLayer: expected eps > 0 (it keeps a constant channel finite), got {eps}")
        self.momentum = check_float("BatchNormLayer: momentum", momentum)
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"BatchNormLayer: expected 0 <= momentum <= 1 (the weight of a new batch in the "
                             f"running statistics), got {momentum}")
        self._add_param("g", np.ones(self.channels))
        self._add_param("b", np.zeros(self.channels))
        self._add_buffer("running_mean", np.zeros(self.channels))
        self._add_buffer("running_var", np.ones(self.channels))
        self._reduce = None
        self._saved_forward = None

    def get_config(self):
        return {"channels": self.channels, "eps": self.eps, "momentum": self.momentum}

    def set_batch_reduction(self, reduce):
        self._reduce = _check_batch_reduction(self.name, reduce)

    def forward(self, inputs, feedbacks=None):
        r"""In training, for channel :math:`c` (index omitted) with values
        :math:`x_i`, :math:`i` over the :math:`n_r` values of rank :math:`r`'s
        shard and :math:`n = \sum_r n_r`, two passes over the values, each ending
        in one reduction:

        .. math::
            n = \sum_r n_r, \qquad \mu = \frac{1}{n} \sum_r \sum_{i \in r} x_i, \tag{1}

        .. math::
            \sigma^2 = \frac{1}{n} \sum_r \sum_{i \in r} (x_i - \mu)^2, \tag{2}

        .. math::
            \hat x_i = \frac{x_i - \mu}{s}, \qquad s = \sqrt{\sigma^2 + \epsilon}, \tag{3}

        .. math::
            y_i = \gamma \hat x_i + \beta, \tag{4}

        .. math::
            \bar\mu \leftarrow (1 - m)\, \bar\mu + m \mu, \qquad
            \bar\sigma^2 \leftarrow (1 - m)\, \bar\sigma^2 + m \frac{n}{n - 1} \sigma^2. \tag{5}

        **Why two passes.** The reduction is a plain sum (the fastest thing an
        all-reduce does, and one a rank without samples joins with zeros).
        Chan's combination of per-rank (count, mean, :math:`M_2`) is not a sum;
        written as sums it becomes :math:`\sigma^2 = \overline{x^2} - \mu^2`,
        which cancels catastrophically in float32 when :math:`|\mu| \gg \sigma`
        (relative error about :math:`2^{-24} \mu^2 / \sigma^2`), and done
        exactly it needs the global mean, a second round, anyway. Eq. (2)
        centres every value on the global mean before squaring, which is what
        one process does with its own batch: N ranks then differ from one
        process only in the order of the additions (about :math:`10^{-16}`
        relative in float64). The price is one more all-reduce of :math:`C`
        numbers per layer and step, a latency. The sums travel in float64, so
        counts beyond :math:`2^{24}` stay exact whatever the layer's dtype.

        In evaluation :math:`\mu, \sigma^2` are the running :math:`\bar\mu,
        \bar\sigma^2` in Eq. (3), nothing is reduced, Eq. (5) is skipped, and
        nothing is kept for backward (evaluation is inference).
        """
        inputs = self._batch(inputs)
        if inputs.shape[1] != self.channels:
            raise ValueError(f"{self.name}: expected {self.channels} channels on axis 1 (inputs (batch, channels, "
                             f"...)), got {inputs.shape[1]} (input shape {inputs.shape})")
        order = _channels_first_order(inputs)
        values = _channel_rows(inputs, order)
        if self.training:
            centered, variance, count = self._batch_statistics(values)
        else:
            centered = values - self.buffers["running_mean"][:, None].astype(self.dtype)  # Eq. (3)
            variance, count = self.buffers["running_var"], None
        inverse_std = (1 / np.sqrt(variance + self.eps)).astype(self.dtype)  # Eq. (3)
        self._saved_forward = self._kept((centered, count, inverse_std, inputs.shape, order))
        # Eq. (3) and (4) in one scaling, gamma / s per channel; x_hat itself is never stored.
        outputs = centered * (self.params["g"] * inverse_std)[:, None]  # Eq. (3), (4)
        outputs += self.params["b"][:, None]  # Eq. (4)
        return _from_channel_rows(outputs, inputs.shape, order)

    def forward_no_samples(self):
        """A training forward's two reductions, with nothing from this process; the
        running statistics follow the global batch as on every other rank."""
        if self.training and self._reduce is not None:
            self._batch_statistics(np.empty((self.channels, 0), dtype=self.dtype))
            self._saved_forward = None

    def _batch_statistics(self, values):
        """(values - mean, variance, count) of the global batch by Eq. (1) and (2), for
        ``values`` of shape ``(C, n)``, a row per channel; updates the running statistics."""
        first = np.empty(self.channels + 1)
        first[0] = values.shape[1]
        first[1:] = values.sum(axis=1)
        first = self._global_sum(first)  # Eq. (1)
        count = first[0]
        if count < 2:
            raise ValueError(f"{self.name}: expected more than one value per channel in training (the variance "
                             f"of one value is 0), got {count:.0f} in the whole batch")
        mean = (first[1:] / count).astype(self.dtype)  # Eq. (1)
        centered = values - mean[:, None]  # Eq. (2)
        squares = self._global_sum(np.einsum("cn,cn->c", centered, centered).astype(np.float64))  # Eq. (2)
        variance = (squares / count).astype(self.dtype)  # Eq. (2)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean *= 1 - self.momentum  # Eq. (5)
        running_mean += self.momentum * mean  # Eq. (5)
        running_var *= 1 - self.momentum  # Eq. (5)
        running_var += (self.momentum * count / (count - 1)) * variance  # Eq. (5)
        return centered, variance, count

    def _global_sum(self, array):
        """The sum of the float64 ``array`` over the processes sharing the batch."""
        if self._reduce is None:
            return array
        reduced = np.asarray(self._reduce(array))
        if reduced.shape != array.shape:
            raise ValueError(f"{self.name}: the batch reduction returned shape {reduced.shape} for an array of "
                             f"shape {array.shape}; expected the elementwise sum, of the same shape")
        return reduced

    def backward(self, gradients, input_grad=True):
        r"""Let :math:`\ell` be the loss of the global batch and
        :math:`g_i = \partial \ell / \partial y_i` on the rank that holds
        sample :math:`i`. By Eq. (4), :math:`\partial \ell / \partial \hat x_i = \gamma g_i`
        and, summed over this rank's values (the trainer sums the ranks' parameter
        gradients as it does every other's),

        .. math::
            \nabla_\gamma \ell = \sum_i g_i \hat x_i, \qquad \nabla_\beta \ell = \sum_i g_i. \tag{6}

        Differentiating Eq. (1) to (3) as for LayerNorm, with
        :math:`\partial \mu / \partial x_j = 1/n` and
        :math:`\partial s / \partial x_j = \hat x_j / n`,

        .. math::
            \frac{\partial \hat x_i}{\partial x_j}
            = \frac{1}{s}\Big(\delta_{ij} - \frac{1}{n} - \frac{\hat x_i \hat x_j}{n}\Big),

        so, never forming the :math:`n \times n` Jacobian,

        .. math::
            \frac{\partial \ell}{\partial x_j} = \frac{\gamma}{s}\Big(g_j - \frac{1}{n} S_1
            - \hat x_j \frac{1}{n} S_2\Big), \qquad
            S_1 = \sum_r \sum_{i \in r} g_i, \quad S_2 = \sum_r \sum_{i \in r} g_i \hat x_i, \tag{7}

        where the two sums, over the whole global batch, are the one reduction
        (the local parts are those of Eq. (6)). They are right only if every
        rank's :math:`g` is the gradient of the same :math:`\ell`: the trainer
        weights rank :math:`r`'s mean loss over its :math:`b_r` samples by
        :math:`b_r / B` (``net.backward(scale=...)``, Eq. (1) of
        :mod:`mnn.distributed.data_parallel`), so the ranks' weighted losses add
        up to the global mean loss and :math:`g_i` is its gradient wherever
        sample :math:`i` is. (Accumulated micro-batches scale :math:`\ell` by a
        constant, and Eq. (7) is linear in :math:`g`.)

        The reduction is made even without ``input_grad``, so that every rank
        makes the same reductions.
        """
        centered, count, inverse_std, shape, order = self._saved(self._saved_forward)
        gradients = _channel_rows(self._check_gradients(gradients, shape), order)
        # S_2 = sum g x_hat = (sum g (x - mu)) / s: x_hat is never formed.
        sums = np.stack([gradients.sum(axis=1), np.einsum("cn,cn->c", gradients, centered) * inverse_std])
        self._add_to_grad("b", sums[0])  # Eq. (6)
        self._add_to_grad("g", sums[1])  # Eq. (6)
        means = (self._global_sum(sums.astype(np.float64)) / count).astype(self.dtype)  # Eq. (7)
        if not input_grad:
            return None
        scale = self.params["g"] * inverse_std
        # gamma/s (g - S_1/n - x_hat S_2/n), x_hat = (x - mu)/s, in three passes.
        result = gradients * scale[:, None]  # Eq. (7)
        result -= centered * (scale * inverse_std * means[1])[:, None]  # Eq. (7)
        result -= (scale * means[0])[:, None]  # Eq. (7)
        return _from_channel_rows(result, shape, order)

    def backward_no_samples(self):
        """Backward's reduction (Eq. (7)), with nothing from this process."""
        if self.training and self._reduce is not None:
            self._global_sum(np.zeros((2, self.channels)))


def _channels_first_order(inputs):
    """The axes of ``inputs`` ``(B, C, ...)`` with the channel first and the others in
    their memory order, largest stride first: for a C-contiguous array
    ``(1, 0, 2, ...)``, for a convolution's batch-last output ``(1, 2, ..., 0)``."""
    others = sorted((axis for axis in range(inputs.ndim) if axis != 1), key=lambda axis: -inputs.strides[axis])
    return (1, *others)


def _channel_rows(array, order):
    """``array`` as ``(C, n)``, a row per channel, its axes taken in ``order``: a view when
    they are in memory order (batch-last images), a copy otherwise (C-contiguous images)."""
    return array.transpose(order).reshape(array.shape[1], -1)


def _from_channel_rows(rows, shape, order):
    """The ``(C, n)`` rows back as an array of ``shape``, the inverse of :func:`_channel_rows`
    (a view in ``rows``' memory layout)."""
    return rows.reshape([shape[axis] for axis in order]).transpose(np.argsort(order))
