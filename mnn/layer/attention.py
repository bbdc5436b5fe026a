r"""Batched matrix products and multi-head self-attention.

``MatrixProduct`` multiplies a pair of batched matrices; ``MultiHeadAttention``
is scaled dot-product self-attention (Vaswani et al., 2017) over sequences of
shape ``(batch, time, d_model)``, built from two such products and the
closed-form softmax backward of :mod:`mnn.layer.softmax`.
"""

import numpy as np

from mnn.checks import as_generator, is_int
from mnn.layer._base import Layer
from mnn.layer.linear import checked_init_std
from mnn.layer.softmax import SoftmaxLayer

__all__ = ["MatrixProduct", "MultiHeadAttention"]


class MatrixProduct(Layer):
    r"""The product :math:`Y = Q P` of a pair of matrices, batched or not.

    ``forward((Q, P))`` accepts what NumPy's ``Q @ P`` accepts: two matrices
    ``(n, k) @ (k, m)``; stacks of them ``(B, n, k) @ (B, k, m)``, with any
    number of leading batch axes (``(B, h, n, k)`` for attention heads) that
    broadcast against each other (``(B, n, k) @ (k, m)`` uses one ``P`` for
    every sample); and vectors, ``(k,)`` on the left or right, which count as
    a row ``(1, k)`` or a column ``(k, 1)`` that is dropped from the result.
    ``backward(G)`` returns the pair of gradients ``(dQ, dP)``, each of the
    shape of its factor.
    """

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        self._factors = None

    def forward(self, inputs, feedbacks=None):
        r"""For every batch index :math:`b` (after broadcasting),

        .. math::
            Y_b = Q_b P_b, \qquad Y_{b,ij} = \sum_r Q_{b,ir} P_{b,rj}. \tag{1}
        """
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
            raise ValueError(f"{self.name}: expected a pair (Q, P) of arrays, got {type(inputs).__name__}")
        left = self._as_dtype(inputs[0], "inputs")
        right = self._as_dtype(inputs[1], "inputs")
        if left.ndim == 0 or right.ndim == 0:
            raise ValueError(f"{self.name}: expected vectors or matrices, got shapes {left.shape} and {right.shape}")
        try:
            outputs = left @ right  # Eq. (1)
        except ValueError:
            raise ValueError(
                f"{self.name}: expected Q (..., n, k) and P (..., k, m) with matching k and batch axes that "
                f"broadcast, got shapes {left.shape} and {right.shape}") from None
        self._factors = self._kept((left, right, outputs.shape))
        return outputs

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y`. Each :math:`Q_{b,ir}` enters
        the outputs :math:`Y_{b,ij}` for all :math:`j` with coefficient
        :math:`P_{b,rj}`, and each :math:`P_{b,rj}` enters :math:`Y_{b,ij}` for all
        :math:`i` with coefficient :math:`Q_{b,ir}`, so

        .. math::
            \frac{\partial \ell}{\partial Q_{b,ir}} = \sum_j G_{b,ij} P_{b,rj}
            \quad\Longrightarrow\quad \nabla_{Q_b} \ell = G_b P_b^\top, \tag{2}

        .. math::
            \frac{\partial \ell}{\partial P_{b,rj}} = \sum_i Q_{b,ir} G_{b,ij}
            \quad\Longrightarrow\quad \nabla_{P_b} \ell = Q_b^\top G_b. \tag{3}

        A factor that broadcast over batch axes (one :math:`P` for every
        :math:`b`) was used in every product, so its gradient is the sum of
        Eq. (2) or (3) over those axes:

        .. math::
            \nabla_P \ell = \sum_b Q_b^\top G_b. \tag{4}

        A vector factor is a one-row (left) or one-column (right) matrix here.
        """
        left, right, expected_shape = self._saved(self._factors)
        gradients = self._as_dtype(gradients, "gradients")
        if gradients.shape != expected_shape:
            raise ValueError(
                f"{self.name}: expected gradients of shape {expected_shape} (the output's), got {gradients.shape}")
        if not input_grad:
            return None
        # Vectors as matrices: a row (1, k) on the left, a column (k, 1) on the right.
        left_matrix = left[None, :] if left.ndim == 1 else left
        right_matrix = right[:, None] if right.ndim == 1 else right
        if left.ndim == 1:
            gradients = np.expand_dims(gradients, -2)
        if right.ndim == 1:
            gradients = gradients[..., None]
        left_gradients = gradients @ right_matrix.swapaxes(-1, -2)  # Eq. (2)
        right_gradients = left_matrix.swapaxes(-1, -2) @ gradients  # Eq. (3)
        return (_sum_to_shape(left_gradients, left_matrix.shape).reshape(left.shape),  # Eq. (4)
                _sum_to_shape(right_gradients, right_matrix.shape).reshape(right.shape))  # Eq. (4)


def _sum_to_shape(array, shape):
    """Sum ``array`` over the leading axes that broadcasting added or stretched to
    reach ``shape`` (the matrix axes, the last two, always match)."""
    extra = array.ndim - len(shape)
    summed = array.sum(axis=tuple(range(extra))) if extra else array
    stretched = tuple(axis for axis, size in enumerate(shape[:-2]) if size == 1 and summed.shape[axis] != 1)
    return summed.sum(axis=stretched, keepdims=True) if stretched else summed


class MultiHeadAttention(Layer):
    r"""Multi-head scaled dot-product self-attention on inputs of shape ``(B, T, d_model)``.

    ``MultiHeadAttention(d_model, n_heads)`` with :math:`d_k = d_{model} / h`
    for :math:`h` = ``n_heads``. Parameters (weights in the ``(out, in)``
    orientation of ``LinearLayer``): ``w_q, w_k, w_v, w_o`` of shape
    ``(d_model, d_model)`` and biases ``b_q, b_k, b_v, b_o`` of shape
    ``(d_model,)``. Biases are zero. Weights are drawn by default from
    :math:`\mathcal{N}(0, 1/d_{model})` (unit-variance outputs for unit-variance
    inputs, no ReLU follows); with ``init_std=s`` from :math:`\mathcal{N}(0, s^2)`,
    and with ``out_init_std=r`` the output projection ``w_o`` from
    :math:`\mathcal{N}(0, r^2)` (default: as the other three). The ``gpt`` short
    form of :mod:`mnn.model` draws as GPT-2 does: s = 0.02, and r = 0.02 /
    :math:`\sqrt{2L}` for :math:`L` blocks, because ``w_o`` writes into the
    residual stream, to which every block adds two branches (Radford et al.,
    2019, section 2.3; nanoGPT's ``model.py``). ``get_config()`` holds the two
    only where they were given.

    Masking: ``causal=True`` lets position :math:`t` attend only to positions
    :math:`s \le t`; ``forward(x, mask=m)`` takes a boolean ``m`` of shape
    ``(T, T)`` or ``(B, T, T)``, True where query :math:`t` may attend to key
    :math:`s`, combined with the causal mask when both are given.
    """

    def __init__(self, d_model, n_heads, causal=False, init_std=None, out_init_std=None, dtype=np.float32,
                 rng=None):
        super().__init__(dtype)
        for what, value in (("d_model", d_model), ("n_heads", n_heads)):
            if not (is_int(value) and value > 0):
                raise ValueError(f"MultiHeadAttention: expected {what} a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(
                f"MultiHeadAttention: expected d_model divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.d_model, self.n_heads = int(d_model), int(n_heads)
        self.d_head = self.d_model // self.n_heads
        self.causal = bool(causal)
        self.init_std = checked_init_std("MultiHeadAttention: init_std", init_std)
        self.out_init_std = checked_init_std("MultiHeadAttention: out_init_std", out_init_std)
        rng = as_generator(rng)
        std = np.sqrt(1.0 / self.d_model) if self.init_std is None else self.init_std
        stds = {"q": std, "k": std, "v": std, "o": std if self.out_init_std is None else self.out_init_std}
        for role in ("q", "k", "v", "o"):
            self._add_param(f"w_{role}", rng.standard_normal((self.d_model, self.d_model)) * stds[role])
            self._add_param(f"b_{role}", np.zeros(self.d_model))
        self._scores_product = MatrixProduct(dtype)
        self._context_product = MatrixProduct(dtype)
        self._saved_forward = None

    def get_config(self):
        config = {"d_model": self.d_model, "n_heads": self.n_heads, "causal": self.causal}
        given = {"init_std": self.init_std, "out_init_std": self.out_init_std}
        return {**config, **{key: std for key, std in given.items() if std is not None}}

    def set_training(self, mode):
        super().set_training(mode)
        self._scores_product.set_training(mode)
        self._context_product.set_training(mode)

    def astype(self, dtype):
        super().astype(dtype)
        self._scores_product.astype(dtype)
        self._context_product.astype(dtype)
        return self

    def _split_heads(self, rows, batch_size, length):
        """``(B*T, d_model)`` rows to heads ``(B, h, T, d_head)``."""
        return rows.reshape(batch_size, length, self.n_heads, self.d_head).transpose(0, 2, 1, 3)

    def _merge_heads(self, heads):
        """Heads ``(B, h, T, d_head)`` back to rows ``(B*T, d_model)``, heads side by side."""
        return heads.transpose(0, 2, 1, 3).reshape(-1, self.d_model)

    def _attention_mask(self, mask, batch_size, length):
        """The boolean mask broadcastable to ``(B, h, T, T)``, or ``None`` for no mask."""
        allowed = np.tri(length, dtype=bool) if self.causal else None
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape not in ((length, length), (batch_size, length, length)):
                raise ValueError(
                    f"{self.name}: expected a boolean mask of shape ({length}, {length}) or "
                    f"({batch_size}, {length}, {length}), got {mask.dtype} of shape {mask.shape}")
            allowed = mask if allowed is None else allowed & mask
        if allowed is None:
            return None
        if not allowed.any(axis=-1).all():
            raise ValueError(f"{self.name}: the mask leaves a query position with no key to attend to")
        return allowed if allowed.ndim == 2 else allowed[:, None]

    def forward(self, inputs, feedbacks=None, mask=None):
        r"""Rows :math:`X \in \mathbb{R}^{BT \times d}` (all positions of all samples),
        projected as in ``LinearLayer``:

        .. math::
            Q = X W_q^\top + \mathbf{1} b_q^\top, \quad
            K = X W_k^\top + \mathbf{1} b_k^\top, \quad
            V = X W_v^\top + \mathbf{1} b_v^\top. \tag{1}

        Columns :math:`h d_k \ldots (h+1) d_k - 1` of a row belong to head
        :math:`h`; per sample and head this gives :math:`Q_h, K_h, V_h \in
        \mathbb{R}^{T \times d_k}`, and

        .. math::
            S_h = \frac{Q_h K_h^\top}{\sqrt{d_k}}, \qquad
            S_{h,ts} = -\infty \text{ where } t \text{ may not attend to } s, \tag{2}

        .. math::
            A_h = \operatorname{softmax}(S_h) \text{ row by row}, \qquad O_h = A_h V_h, \tag{3}

        .. math::
            O = [O_1 \; O_2 \; \cdots \; O_H], \qquad Y = O W_o^\top + \mathbf{1} b_o^\top. \tag{4}

        A masked score becomes :math:`e^{-\infty} = 0` in the softmax.
        """
        inputs = self._as_dtype(inputs, "inputs")
        if inputs.ndim != 3 or inputs.shape[2] != self.d_model:
            raise ValueError(
                f"{self.name}: expected inputs of shape (batch, time, {self.d_model}), got shape {inputs.shape}")
        batch_size, length, _ = inputs.shape
        allowed = self._attention_mask(mask, batch_size, length)
        rows = inputs.reshape(-1, self.d_model)
        params = self.params
        queries = rows @ params["w_q"].T + params["b_q"]  # Eq. (1)
        keys = rows @ params["w_k"].T + params["b_k"]  # Eq. (1)
        values = rows @ params["w_v"].T + params["b_v"]  # Eq. (1)
        queries *= self.dtype.type(1 / np.sqrt(self.d_head))  # Eq. (2), in place: no copy of the heads
        scaled_queries = self._split_heads(queries, batch_size, length)
        keys_transposed = self._split_heads(keys, batch_size, length).transpose(0, 1, 3, 2)
        scores = self._scores_product.forward((scaled_queries, keys_transposed))  # Eq. (2)
        if allowed is not None:
            np.copyto(scores, self.dtype.type(-np.inf), where=~allowed)  # Eq. (2), in place: the scores are ours
        attention = SoftmaxLayer.stable_softmax(scores, axis=-1)  # Eq. (3)
        context = self._context_product.forward((attention, self._split_heads(values, batch_size, length)))  # Eq. (3)
        concatenated = self._merge_heads(context)  # Eq. (4)
        outputs = concatenated @ params["w_o"].T + params["b_o"]  # Eq. (4)
        self._saved_forward = self._kept((rows, attention, concatenated))
        return outputs.reshape(batch_size, length, self.d_model)

    def backward(self, gradients, input_grad=True):
        r"""Given :math:`G = \partial \ell / \partial Y` as rows :math:`BT \times d`.
        Eq. (4) is a linear layer on :math:`O` (``LinearLayer``, Eq. (2) to (4)):

        .. math::
            \nabla_{W_o} \ell = G^\top O, \qquad \nabla_{b_o} \ell = G^\top \mathbf{1}, \qquad
            \nabla_O \ell = G W_o. \tag{5}

        Splitting :math:`\nabla_O \ell` into heads gives :math:`\nabla_{O_h} \ell`;
        Eq. (3) is a matrix product (``MatrixProduct``, Eq. (2), (3)):

        .. math::
            \nabla_{A_h} \ell = \nabla_{O_h} \ell \, V_h^\top, \qquad
            \nabla_{V_h} \ell = A_h^\top \nabla_{O_h} \ell. \tag{6}

        The softmax of each row of :math:`S_h` has the closed-form backward of
        ``SoftmaxLayer`` (Eq. (4) there), with the inner product over keys:

        .. math::
            \nabla_{S_h} \ell = A_h \odot \big(\nabla_{A_h} \ell
            - \langle \nabla_{A_h} \ell, A_h \rangle \mathbf{1}^\top\big). \tag{7}

        Masked entries have :math:`A_{h,ts} = 0`, so their gradient is zero and
        nothing flows through them. Eq. (2) is again a matrix product:

        .. math::
            \nabla_{Q_h} \ell = \frac{1}{\sqrt{d_k}} \nabla_{S_h} \ell \, K_h, \qquad
            \nabla_{K_h} \ell = \frac{1}{\sqrt{d_k}} (\nabla_{S_h} \ell)^\top Q_h. \tag{8}

        Putting the heads side by side again gives :math:`\nabla_Q \ell,
        \nabla_K \ell, \nabla_V \ell \in \mathbb{R}^{BT \times d}`, and the three
        projections of Eq. (1) are linear layers that share the input :math:`X`,
        so their input gradients add up:

        .. math::
            \nabla_{W_q} \ell = (\nabla_Q \ell)^\top X, \qquad
            \nabla_{b_q} \ell = (\nabla_Q \ell)^\top \mathbf{1} \quad
            \text{(likewise for } K, V\text{)}, \tag{9}

        .. math::
            \nabla_X \ell = \nabla_Q \ell \, W_q + \nabla_K \ell \, W_k + \nabla_V \ell \, W_v. \tag{10}

        No :math:`T \times T` Jacobian of the softmax is ever formed.
        """
        rows, attention, concatenated = self._saved(self._saved_forward)
        batch_size, _, length, _ = attention.shape
        gradients = self._as_dtype(gradients, "gradients")
        if gradients.shape != (batch_size, length, self.d_model):
            raise ValueError(
                f"{self.name}: expected gradients of shape {(batch_size, length, self.d_model)} "
                f"(the output's), got {gradients.shape}")
        gradients = gradients.reshape(-1, self.d_model)
        params = self.params
        self._add_product_to_grad("w_o", gradients.T, concatenated)  # Eq. (5)
        self._add_to_grad("b_o", gradients.sum(axis=0))  # Eq. (5)
        context_gradients = self._split_heads(gradients @ params["w_o"], batch_size, length)  # Eq. (5)
        attention_gradients, value_gradients = self._context_product.backward(context_gradients)  # Eq. (6)
        score_gradients = SoftmaxLayer.softmax_gradient(attention, attention_gradients, axis=-1)  # Eq. (7)
        scaled_query_gradients, key_gradients_transposed = self._scores_product.backward(score_gradients)  # Eq. (8)
        scale = self.dtype.type(1 / np.sqrt(self.d_head))
        projection_gradients = {
            "q": self._merge_heads(scaled_query_gradients * scale),  # Eq. (8)
            "k": self._merge_heads(key_gradients_transposed.transpose(0, 1, 3, 2)),  # Eq. (8)
            "v": self._merge_heads(value_gradients),
        }
        for role, role_gradients in projection_gradients.items():
            self._add_product_to_grad(f"w_{role}", role_gradients.T, rows)  # Eq. (9)
            self._add_to_grad(f"b_{role}", role_gradients.sum(axis=0))  # Eq. (9)
        if not input_grad:
            return None
        input_gradients = sum(role_gradients @ params[f"w_{role}"]
                              for role, role_gradients in projection_gradients.items())  # Eq. (10)
        return input_gradients.reshape(batch_size, length, self.d_model)
