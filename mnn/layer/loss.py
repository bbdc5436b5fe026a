r"""Loss layers: each returns the mean over the batch of a per-sample loss
(for a sequence, of a per-position loss).

The batch mean is taken here, once: every gradient further down the net
already carries the factor :math:`1/B` (:math:`1/BT` over positions). ``backward(w)`` differentiates the
weighted loss :math:`w\,\ell` (see ``LossLayer``); ``backward()`` is :math:`w = 1`.
"""

import numpy as np

from mnn.checks import is_int
from mnn.layer._base import LossLayer, _as_indices
from mnn.layer.softmax import LogSoftmaxLayer, _check_axis

__all__ = ["CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer", "check_labels"]


def check_labels(layer_name, labels, batch_shape, n_classes):
    """Integer class indices of shape ``batch_shape``, checked.

    ``batch_shape`` is the batch size ``B`` (or ``(B,)``): labels ``(B,)`` or
    the seed's column ``(B, 1)`` are accepted and come back as ``(B,)``. For a
    sequence it is ``(B, T)``: one label per position, of shape ``(B, T)``.
    Raises ``ValueError`` naming the layer when the labels are missing, have
    the wrong shape, are not whole numbers, or lie outside ``[0, n_classes)``.
    """
    if labels is None:
        raise ValueError(f"{layer_name}: expected integer class labels as feedbacks, got None")
    batch_shape = (batch_shape,) if is_int(batch_shape) else tuple(batch_shape)
    labels = np.asarray(labels)
    if len(batch_shape) == 1:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        expected = f"({batch_shape[0]},) or ({batch_shape[0]}, 1)"
    else:
        expected = str(batch_shape)
    if labels.shape != batch_shape:
        raise ValueError(f"{layer_name}: expected labels of shape {expected}, got {labels.shape}")
    return _as_indices(layer_name, labels, n_classes, "class indices", "label")


class CrossEntropyLossLayer(LossLayer):
    r"""Softmax followed by the negative log-likelihood of the true class.

    ``forward(logits, labels)`` with ``logits`` of shape ``(B, C)`` (or the
    seed's ``(B, C, 1)``) and ``labels`` integer class indices of shape ``(B,)``
    or ``(B, 1)``; or, for a sequence model, ``logits`` of shape ``(B, T, C)``
    (a distribution over ``C`` classes, e.g. the next character, at every
    position) and ``labels`` of shape ``(B, T)``. The loss is then the mean
    over all :math:`BT` positions, as in PyTorch's ``cross_entropy`` on the
    flattened positions: every position is one term of Eq. (2). The shape of
    the labels tells the two apart: logits ``(B, C, 1)`` are the seed's
    columns when the labels are ``(B,)`` or ``(B, 1)``, and a sequence of
    :math:`T = C` positions with one class each when they are ``(B, C)``.

    Because every sample holds the same :math:`T` positions, a shard of
    :math:`b` samples averages :math:`bT` terms, and weighting it by
    :math:`b / B` (the data-parallel wrapper) still gives the global mean.
    ``shape`` is accepted for the seed's signature ``CrossEntropyLossLayer(B, C)``
    and not otherwise needed.
    """

    def __init__(self, *shape, axis=1, dtype=np.float32):
        super().__init__(dtype)
        _check_axis(self.name, axis)
        self._probabilities = None

    def _logits_and_labels(self, inputs, labels):
        """Logits as rows ``(N, C)``, one per position, and their ``N`` labels,
        where ``N`` is ``B`` for rows or columns and ``BT`` for sequences."""
        inputs = self._as_dtype(inputs)
        seed_columns = inputs.ndim == 3 and inputs.shape[2] == 1 and labels is not None \
            and np.shape(labels) in ((inputs.shape[0],), (inputs.shape[0], 1))
        self._input_shape = inputs.shape
        if inputs.ndim != 3 or seed_columns:
            logits, _ = self._rows(inputs)
            return logits, check_labels(self.name, labels, logits.shape[0], logits.shape[1])
        batch_size, length, n_classes = inputs.shape
        if batch_size == 0 or length == 0:
            raise ValueError(f"{self.name}: expected at least one sample and one position, got logits of "
                             f"shape {inputs.shape}")
        labels = check_labels(self.name, labels, (batch_size, length), n_classes)
        return inputs.reshape(-1, n_classes), labels.reshape(-1)

    def forward(self, inputs, feedbacks=None):
        r"""With :math:`z_i` the logits of row :math:`i` (a sample, or one
        position of a sequence) and :math:`t_i` its class, the softmax
        probabilities and their logs come from the stable log-softmax
        (``LogSoftmaxLayer.stable_log_softmax``, which subtracts
        :math:`m_i = \max_c z_{ic}` so that no exponential overflows):

        .. math::
            p_{ic} = \frac{e^{z_{ic} - m_i}}{s_i}, \qquad
            \log p_{ic} = (z_{ic} - m_i) - \log s_i, \qquad s_i = \sum_c e^{z_{ic} - m_i}, \tag{1}

        and the loss is the mean over the :math:`N` rows (:math:`N = B`, or
        :math:`N = BT` for a sequence):

        .. math::
            \ell = \frac{1}{N} \sum_i -\log p_{i t_i}. \tag{2}
        """
        logits, labels = self._logits_and_labels(inputs, feedbacks)
        count = logits.shape[0]
        if not self.training:  # only the log-probabilities of the labels: no P for backward
            self._probabilities = self._labels = None
            shifted = logits - logits.max(axis=1, keepdims=True)  # Eq. (1)
            sums = np.exp(shifted).sum(axis=1)  # Eq. (1)
            log_probabilities = shifted[np.arange(count), labels] - np.log(sums)  # Eq. (1)
            return self.dtype.type(-log_probabilities.sum() / count)  # Eq. (2)
        log_probabilities, probabilities = LogSoftmaxLayer.stable_log_softmax(logits, axis=1)  # Eq. (1)
        self._probabilities, self._labels = probabilities, labels
        return self.dtype.type(-log_probabilities[np.arange(count), labels].sum() / count)  # Eq. (2)

    def backward(self, gradients=None, input_grad=True):
        r"""Per row, by Eq. (1), :math:`\ell_i = -\log p_{it_i} = \log s_i - z_{it_i} + m_i`, and
        :math:`\partial \log s_i / \partial z_{ic} = p_{ic}` (the shift :math:`m_i`
        cancels), so for the loss weighted by :math:`w` (``gradients``, 1 if omitted)

        .. math::
            \frac{\partial (w\ell)}{\partial z_{ic}} = \frac{w}{N}\left(p_{ic} - \mathbb{1}[c = t_i]\right),
            \qquad \nabla_Z (w\ell) = \frac{w}{N}(P - T), \tag{3}

        with :math:`T` the one-hot rows of the labels. No :math:`C \times C`
        softmax Jacobian is ever formed: it cancels against the log. For a
        sequence the rows are the :math:`BT` positions, given back in the
        shape ``(B, T, C)`` of the logits.
        """
        probabilities = self._saved(self._probabilities)
        if not input_grad:
            return None
        count = probabilities.shape[0]
        scale = self._scale(gradients, count)  # w/N
        gradients = probabilities * scale  # Eq. (3)
        gradients[np.arange(count), self._labels] -= scale  # Eq. (3)
        return gradients.reshape(self._input_shape)  # rows, the seed's columns or (B, T, C)


class MSELossLayer(LossLayer):
    r"""Mean squared error, averaged over every element of the batch.

    ``forward(inputs, targets)`` with ``inputs`` of shape ``(B, n)`` (or
    ``(B, n, 1)``) and ``targets`` of the same shape (either form). As in
    PyTorch's ``MSELoss`` default (``reduction='mean'``) the mean is over all
    :math:`Bn` elements, not a sum over features averaged over the batch: the
    loss and its gradient then do not grow with the number of outputs. Targets
    of another shape raise ``ValueError`` instead of broadcasting.
    """

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        self._errors = None

    def forward(self, inputs, feedbacks=None):
        r"""With :math:`E = X - T`,

        .. math::
            \ell = \frac{1}{Bn} \sum_{i,j} E_{ij}^2. \tag{1}
        """
        rows, self._columns = self._rows(inputs)
        if feedbacks is None:
            raise ValueError(f"{self.name}: expected targets of shape {rows.shape} as feedbacks, got None")
        targets = np.asarray(feedbacks)
        if targets.shape not in (rows.shape, rows.shape + (1,)):
            raise ValueError(
                f"{self.name}: expected targets of shape {rows.shape} or {rows.shape + (1,)} "
                f"(the inputs'), got {targets.shape}")
        errors = rows - targets.reshape(rows.shape).astype(self.dtype, copy=False)
        self._errors = self._kept(errors)
        return self.dtype.type(np.mean(np.square(errors)))  # Eq. (1)

    def backward(self, gradients=None, input_grad=True):
        r"""Each :math:`E_{ij}` appears in one term of Eq. (1), and
        :math:`\partial E_{ij} / \partial X_{ij} = 1`, so for the loss weighted
        by :math:`w` (``gradients``, 1 if omitted)

        .. math::
            \nabla_X (w\ell) = \frac{2w}{Bn} (X - T). \tag{2}
        """
        errors = self._saved(self._errors)
        if not input_grad:
            return None
        scale = self._scale(gradients, errors.size)  # w/(Bn)
        return self._as_shape(errors * (2 * scale), self._columns)  # Eq. (2)


class NllLossLayer(LossLayer):
    r"""Negative log-likelihood of the true class, given log-probabilities.

    ``forward(log_probabilities, labels)`` with ``log_probabilities`` of shape
    ``(B, C)`` (or ``(B, C, 1)``), e.g. the output of ``LogSoftmaxLayer``, and
    ``labels`` integer class indices of shape ``(B,)`` or ``(B, 1)``.
    """

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        self._labels = None

    def forward(self, inputs, feedbacks=None):
        r"""With :math:`t_i` the class of sample :math:`i`,

        .. math::
            \ell = -\frac{1}{B} \sum_i X_{i t_i}. \tag{1}
        """
        log_probabilities, self._columns = self._rows(inputs)
        batch_size, n_classes = log_probabilities.shape
        labels = check_labels(self.name, feedbacks, batch_size, n_classes)
        self._labels, self._shape = self._kept(labels), log_probabilities.shape
        return self.dtype.type(-np.mean(log_probabilities[np.arange(batch_size), labels]))  # Eq. (1)

    def backward(self, gradients=None, input_grad=True):
        r"""Only the entries :math:`X_{i t_i}` appear in Eq. (1), each once, so for
        the loss weighted by :math:`w` (``gradients``, 1 if omitted)

        .. math::
            \frac{\partial (w\ell)}{\partial X_{ic}} = -\frac{w}{B} \mathbb{1}[c = t_i],
            \qquad \nabla_X (w\ell) = -\frac{w}{B} T, \tag{2}

        with :math:`T` the one-hot rows of the labels.
        """
        labels = self._saved(self._labels)
        if not input_grad:
            return None
        batch_size = self._shape[0]
        scale = self._scale(gradients, batch_size)  # w/B
        gradients = np.zeros(self._shape, dtype=self.dtype)
        gradients[np.arange(batch_size), labels] = -scale  # Eq. (2)
        return self._as_shape(gradients, self._columns)
