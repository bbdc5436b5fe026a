r"""Embeddings: token ids to learned vectors, and learned positions added to them.

A language model's first two layers::

    EmbeddingLayer(vocab, d)             # ids (B, T) -> vectors (B, T, d)
    PositionalEmbeddingLayer(context, d) # (B, T, d) -> (B, T, d) + P[:T]

Both tables are initialised from :math:`\mathcal{N}(0, 0.02^2)`, as GPT-2
initialises its token embeddings and nanoGPT both tables: small next to the
unit-variance activations that LayerNorm makes later, so no row dominates at
the start.
"""

import numpy as np

from mnn.checks import as_generator, check_int
from mnn.layer._base import Layer, _as_indices

__all__ = ["EmbeddingLayer", "PositionalEmbeddingLayer"]

_INIT_STD = 0.02


class EmbeddingLayer(Layer):
    r"""A table lookup: token id :math:`t` becomes row :math:`t` of :math:`E \in \mathbb{R}^{V \times d}`.

    ``EmbeddingLayer(vocab, d)``: the weight ``w`` is :math:`E`, of shape
    ``(vocab, d)``. ``forward(ids)`` takes integer ids in ``[0, vocab)`` of
    shape ``(B, T)`` (or ``(B,)``, or any ``(B, ...)``) and gives vectors of
    shape ``(B, T, d)`` (``(B, ..., d)``). Floating-point ids are accepted when
    every value is whole (a pipeline may hold them in the training dtype);
    anything else is a ``ValueError``.

    The ids are integers, not a differentiable input, so ``backward`` returns
    ``None``: the layer must come first in a net (whose ``input_grad`` is then
    false) or be called with ``input_grad=False``.
    """

    def __init__(self, vocab, d, dtype=np.float32, rng=None):
        super().__init__(dtype)
        self.vocab = check_int("EmbeddingLayer: vocab", vocab, minimum=1)
        self.d = check_int("EmbeddingLayer: d", d, minimum=1)
        self._add_param("w", as_generator(rng).standard_normal((self.vocab, self.d)) * _INIT_STD)
        self._ids = None
        # np.argsort(kind="stable") is a radix sort for 8- and 16-bit integers:
        # 4x faster than the merge sort it uses for int64 ids at 2048 ids.
        self._sort_dtype = np.uint8 if self.vocab <= 1 << 8 else np.uint16 if self.vocab <= 1 << 16 else np.intp

    def get_config(self):
        return {"vocab": self.vocab, "d": self.d}

    def forward(self, inputs, feedbacks=None):
        r"""With the :math:`N` ids :math:`t_n` of the batch as one list (all
        positions of all samples) and :math:`O \in \{0, 1\}^{N \times V}` their
        one-hot rows, :math:`O_{nv} = \mathbb{1}[t_n = v]`, the output rows are

        .. math::
            Y_{n,:} = E_{t_n,:}, \qquad Y = O E. \tag{1}

        The product is a row gather; :math:`O` is never formed.
        """
        ids = np.asarray(inputs)
        if ids.ndim < 1 or ids.shape[0] == 0:
            raise ValueError(f"{self.name}: expected a non-empty batch of token ids of shape (batch, time) or "
                             f"(batch,), got shape {ids.shape}")
        ids = _as_indices(self.name, ids, self.vocab, "token ids", "id")
        self._ids = self._kept(ids.reshape(-1))
        self._output_shape = ids.shape + (self.d,)
        return np.take(self.params["w"], ids, axis=0)  # Eq. (1)

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y` as :math:`N` rows. By
        Eq. (1), :math:`Y_{nk} = \sum_v O_{nv} E_{vk}`, so
        :math:`\partial Y_{nk} / \partial E_{vk} = O_{nv}` and

        .. math::
            \frac{\partial \ell}{\partial E_{vk}} = \sum_n O_{nv} G_{nk}
            \quad\Longrightarrow\quad \nabla_E \ell = O^\top G, \tag{2}

        the weight gradient of ``LinearLayer`` (Eq. (2) there) with the one-hot
        rows as its input. :math:`O^\top` holds :math:`N` ones among :math:`NV`
        entries: it is a sparse matrix, and its product with :math:`G` adds
        each row of :math:`G` into the row of the id it came from,

        .. math::
            (\nabla_E \ell)_{v,:} = \sum_{n \,:\, t_n = v} G_{n,:}, \tag{3}

        which costs :math:`Nd` additions where the dense product costs
        :math:`NVd`. Rows of ids that did not occur get nothing.

        The ids have no gradient; ``backward`` returns ``None`` whatever
        ``input_grad`` says.
        """
        ids = self._saved(self._ids)
        gradients = self._check_gradients(gradients, self._output_shape).reshape(-1, self.d)
        # Eq. (3) as a sort, then one sum per run of equal ids. Measured at
        # N = 2048, V = 100, d = 128, float32, one thread: np.add.at 2.3 ms,
        # np.bincount per column 0.8-1.3 ms, the dense O^T @ G 0.56 ms (BLAS
        # doing V times the work), sort + np.add.reduceat 0.34 ms. Sorting also
        # costs O(N log N + Nd) whatever V, while O^T @ G grows with V.
        order = np.argsort(ids.astype(self._sort_dtype, copy=False), kind="stable")
        sorted_ids = ids[order]
        run_starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        run_sums = np.add.reduceat(np.take(gradients, order, axis=0), run_starts, axis=0)  # Eq. (2), (3)
        rows = sorted_ids[run_starts]  # distinct ids, so the indexed += below never meets a row twice
        grad = self.grads["w"]
        if "w" in self._zero_grad_keys:
            grad[rows] = run_sums  # Eq. (3)
            self._zero_grad_keys.discard("w")
        else:
            grad[rows] += run_sums  # Eq. (3)
        return None


class PositionalEmbeddingLayer(Layer):
    r"""A learned vector per position, added to the input: :math:`Y_{b,t} = X_{b,t} + P_t`.

    ``PositionalEmbeddingLayer(context, d)``: the weight ``w`` is
    :math:`P \in \mathbb{R}^{\text{context} \times d}`, one row per position up
    to the longest sequence the model takes. ``forward(x)`` takes ``x`` of shape
    ``(B, T, d)`` with :math:`T \le` ``context`` and uses the first :math:`T`
    rows. The same position gets the same vector in every sample, which is what
    lets the attention that follows, blind to order by itself, tell positions
    apart.
    """

    def __init__(self, context, d, dtype=np.float32, rng=None):
        super().__init__(dtype)
        self.context = check_int("PositionalEmbeddingLayer: context", context, minimum=1)
        self.d = check_int("PositionalEmbeddingLayer: d", d, minimum=1)
        self._add_param("w", as_generator(rng).standard_normal((self.context, self.d)) * _INIT_STD)
        self._shape = None

    def get_config(self):
        return {"context": self.context, "d": self.d}

    def forward(self, inputs, feedbacks=None):
        r"""For every sample :math:`b` and position :math:`t < T`,

        .. math::
            Y_{b,t,:} = X_{b,t,:} + P_{t,:}. \tag{1}
        """
        inputs = self._as_dtype(inputs)
        if inputs.ndim != 3 or inputs.shape[2] != self.d or inputs.shape[0] == 0:
            raise ValueError(f"{self.name}: expected a non-empty batch of shape (batch, time, {self.d}), "
                             f"got shape {inputs.shape}")
        if inputs.shape[1] > self.context:
            raise ValueError(f"{self.name}: expected at most {self.context} positions (the context it was "
                             f"built for), got {inputs.shape[1]} (input shape {inputs.shape})")
        self._shape = self._kept(inputs.shape)
        return inputs + self.params["w"][:inputs.shape[1]]  # Eq. (1)

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`. :math:`P_{t,:}` enters
        the output at position :math:`t` of every sample with coefficient 1, and
        rows :math:`t \ge T` were not used, so

        .. math::
            \nabla_{P_t} \ell = \sum_b G_{b,t,:} \quad (t < T), \qquad
            \nabla_{P_t} \ell = 0 \quad (t \ge T). \tag{2}

        The Jacobian of Eq. (1) with respect to :math:`X` is the identity:

        .. math::
            \nabla_X \ell = G. \tag{3}
        """
        shape = self._saved(self._shape)
        gradients = self._check_gradients(gradients, shape)
        length = shape[1]
        grad = self.grads["w"]
        if "w" in self._zero_grad_keys:
            np.sum(gradients, axis=0, out=grad[:length])  # Eq. (2); the rows from length on stay zero
            self._zero_grad_keys.discard("w")
        else:
            grad[:length] += gradients.sum(axis=0)  # Eq. (2)
        if not input_grad:
            return None
        return gradients  # Eq. (3)
