r"""Inverted dropout whose masks depend on (seed, step, global sample index) only.

Data-parallel training is exact only if N ranks compute what one process would
on the same global batch. A dropout mask drawn from a sequential generator
depends on how many numbers were drawn before it, and so on which rank holds
the sample and which samples came first in its shard. Here every mask bit is a
*counter-based* random number instead (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011): a hash of where it is, computed
directly, with nothing drawn before it. Every rank computes the bits of its own
samples only, from their global positions, which the trainer announces::

    net.set_training(True)
    net.start_batch(step, first_sample)   # this shard starts at global sample first_sample
    loss = net(x_shard, y_shard)

The hash is SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014) with the output function and constants of
Vigna's ``splitmix64.c``, which passes BigCrush. Its output function mixes a
64-bit word :math:`z` (arithmetic mod :math:`2^{64}`):

.. math::
    z \leftarrow (z \oplus (z \gg 30)) \cdot \mathtt{0xBF58476D1CE4E5B9}, \quad
    z \leftarrow (z \oplus (z \gg 27)) \cdot \mathtt{0x94D049BB133111EB}, \quad
    z \leftarrow z \oplus (z \gg 31). \tag{1}

Each step is a bijection of 64-bit words (an xor-shift is invertible, the
multipliers are odd), and every output bit depends on every input bit. A
SplitMix64 generator adds :math:`\gamma` to its state :math:`s` and mixes the
sum, so its output number :math:`k + 1` is

.. math::
    o_k(s) = \operatorname{mix}\big(s + (k + 1)\,\gamma\big), \qquad
    \gamma = \mathtt{0x9E3779B97F4A7C15}, \tag{2}

computed directly for any :math:`k`, without the outputs before it: a
counter-based generator. ``DropoutLayer.forward`` derives its masks from Eq. (2).
"""

import math

import numpy as np

from mnn.checks import as_generator, check_float, check_int
from mnn.layer._base import Layer, _check_batch_position

__all__ = ["DropoutLayer"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd: k -> k * gamma is a bijection mod 2^64
_MIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_MIX_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
# Mask words hashed per block: 32K uint64 (256 KiB) and a scratch array of the
# same size stay in a 1 MiB L2 cache. Hashed in one pass, the mask of a
# (32, 64, 128) batch took 3x as long (1.1 ms against 0.36 ms, one thread).
_BLOCK_WORDS = 1 << 15


def _mix64(z):
    """SplitMix64's output function, Eq. (1), in place on an array of uint64."""
    shifted = np.empty_like(z)
    for shift, multiplier in zip(_MIX_SHIFTS, _MIX_MULTIPLIERS):
        np.right_shift(z, shift, out=shifted)
        z ^= shifted  # Eq. (1)
        z *= multiplier  # Eq. (1)
    np.right_shift(z, _MIX_SHIFTS[2], out=shifted)
    z ^= shifted  # Eq. (1)
    return z


def _splitmix64(states, counters):
    """Output ``counters + 1`` of SplitMix64 generators in ``states``, Eq. (2), for
    states and counters (uint64 values or arrays) that broadcast."""
    # Arrays of at least one axis: ufuncs on arrays wrap mod 2^64 silently, where
    # NumPy's scalar arithmetic would warn about the intended overflow.
    states, counters = np.array(states, dtype=np.uint64, ndmin=1), np.array(counters, dtype=np.uint64, ndmin=1)
    return _mix64((counters + np.uint64(1)) * _GAMMA + states)  # Eq. (2)


class DropoutLayer(Layer):
    r"""Inverted dropout (Srivastava et al., 2014): zero each value with probability
    :math:`p` in training and scale the rest by :math:`1/(1-p)`; the identity in evaluation.

    ``DropoutLayer(p, seed=None)``; ``seed`` (an integer in :math:`[0, 2^{63})`,
    which a TOML job file can hold) keys this layer's masks. Without it, the seed is drawn from ``rng`` (a
    Generator or an int seed, as every layer's initialisation; ``None`` draws
    from fresh entropy). A layer built from ``rng`` always takes exactly one
    number from it, seed given or not, so a model description rebuilt from its
    ``get_config()`` (which holds the seed) gets the same parameters in every
    other layer. :func:`mnn.model.build_net` thus gives each dropout layer of a
    net its own seed, and their masks are independent.

    **Which mask.** In training, the mask of the sample in row :math:`r` of a
    forward is a function of ``(seed, step, first_sample + r)`` (Eq. (3) to (5)
    of :meth:`forward`), where ``start_batch(step, first_sample)`` announced the
    forward. The data-parallel trainer calls it before every forward with the
    global step and the global index of its shard's first sample, so a sample
    gets the same mask whichever rank holds it and however the batch is split:
    N ranks train what one process trains, dropout included. A net used
    directly, as in a notebook (``loss = net(x, y)``) without ``start_batch``,
    still gets a fresh mask per forward: a forward that was not announced uses
    the step after the previous forward's (from step 0) and ``first_sample = 0``.
    The masks of such a run depend only on the seed and the number of training
    forwards, so it too is reproducible.

    ``set_training(False)`` makes the layer the identity (evaluation, where the
    scaling in training already made :math:`E[Y] = X`); such forwards use no step.
    """

    def __init__(self, p, seed=None, dtype=np.float32, rng=None):
        super().__init__(dtype)
        self.p = check_float("DropoutLayer: p", p)
        if not 0 <= self.p < 1:
            raise ValueError(f"DropoutLayer: expected 0 <= p < 1 (the probability of dropping a value), got {p}")
        drawn = int(as_generator(rng).integers(0, 2**63)) if rng is not None or seed is None else None
        if seed is None:
            self.seed = drawn
        else:
            self.seed = check_int("DropoutLayer: seed", seed, minimum=0)
            if self.seed >= 2**63:
                raise ValueError(f"DropoutLayer: expected a seed below 2**63 (a TOML integer), got {seed}")
        # Keep a value when its 32-bit integer u >= ceil(p 2^32): probability 1 - p, up to 2^-32.
        # (A p within 2^-32 of 1 gives 2^32, which no u reaches: nothing is kept.)
        self._threshold = math.ceil(self.p * 2**32)
        self._next_position = (0, 0)  # (step, first_sample) of the next training forward
        self._mask = None
        self._shape = None

    def get_config(self):
        return {"p": self.p, "seed": self.seed}

    def start_batch(self, step, first_sample):
        self._next_position = _check_batch_position(self.name, step, first_sample)

    def forward(self, inputs, feedbacks=None):
        r"""In training, with :math:`M` the 0/1 keep mask,

        .. math::
            Y = X \odot M / (1 - p), \qquad
            E[M_{ij}] = 1 - p \;\Rightarrow\; E[Y] = X. \tag{3}

        Sample :math:`i` of the global batch of step :math:`t` (row
        :math:`i - f` of this forward, :math:`f` = ``first_sample``) keeps
        value :math:`j` of its flattened shape (C order) by the SplitMix64
        outputs of Eq. (2) (in the module's notes), each generator state
        derived from the one before:

        .. math::
            s_t = o_t(\text{seed}), \qquad r_i = o_i(s_t), \qquad
            h_{i,w} = o_w(r_i), \tag{4}

        each 64-bit :math:`h_{i,w}` giving the 32-bit integers :math:`u_{ij}`,
        uniform on :math:`[0, 2^{32})`, of values :math:`j = 2w` (its low half)
        and :math:`j = 2w + 1` (its high half):

        .. math::
            u_{ij} = \big\lfloor h_{i,\lfloor j/2 \rfloor} / 2^{32 (j \bmod 2)} \big\rfloor \bmod 2^{32}, \qquad
            M_{ij} = \mathbb{1}\big[u_{ij} \ge \lceil p\, 2^{32} \rceil\big]. \tag{5}

        Half words halve the hashing, and 32 bits resolve :math:`p` to
        :math:`2^{-32}`. Nothing in Eq. (4) and (5) depends on the rank, the
        shard or the samples beside :math:`i`.
        """
        inputs = self._batch(inputs)
        self._shape = self._kept(inputs.shape)
        if not self.training:
            self._mask = None
            return inputs
        step, first_sample = self._next_position
        self._next_position = (step + 1, 0)
        if self.p == 0:
            self._mask = None
            return inputs
        self._mask = self._scaled_mask(step, first_sample, inputs.shape)
        return inputs * self._mask  # Eq. (3)

    def _scaled_mask(self, step, first_sample, shape):
        """:math:`M / (1 - p)` in the layer's dtype, of ``shape`` (Eq. (3) to (5))."""
        batch_size, per_sample = shape[0], math.prod(shape[1:])
        scaled = np.zeros((batch_size, per_sample), dtype=self.dtype)
        if self._threshold >= 2**32:  # p within 2^-32 of 1: nothing is kept
            return scaled.reshape(shape)
        step_state = _splitmix64(self.seed, step)  # Eq. (4)
        sample_states = _splitmix64(step_state, first_sample + np.arange(batch_size, dtype=np.uint64))  # Eq. (4)
        words = np.arange((per_sample + 1) // 2, dtype=np.uint64)
        rows_per_block = max(1, _BLOCK_WORDS // len(words))
        scale = self.dtype.type(1 / (1 - self.p))
        for start in range(0, batch_size, rows_per_block):
            block = slice(start, start + rows_per_block)
            hashes = _splitmix64(sample_states[block, None], words)  # Eq. (4)
            # As little-endian bytes, the uint32 halves of each word come low half first on any machine.
            uniforms = hashes.astype("<u8", copy=False).view("<u4")[:, :per_sample]  # Eq. (5)
            np.multiply(uniforms >= np.uint32(self._threshold), scale, out=scaled[block])  # Eq. (3), (5)
        return scaled.reshape(shape)

    def backward(self, gradients, input_grad=True):
        r"""Each output depends only on the input at the same place, with
        :math:`\partial Y_{ij} / \partial X_{ij} = M_{ij} / (1 - p)` by Eq. (3)
        (the mask is a constant of the forward), so

        .. math::
            \nabla_X \ell = G \odot M / (1 - p). \tag{6}
        """
        shape = self._saved(self._shape)
        gradients = self._check_gradients(gradients, shape)
        if not input_grad:
            return None
        return gradients if self._mask is None else gradients * self._mask  # Eq. (6)
