r"""The ring all-reduce: reduce-scatter, then all-gather, over point-to-point messages.

Every rank :math:`r` of :math:`p` holds a buffer :math:`x_r` of :math:`n`
numbers; afterwards every rank holds the sum :math:`s = \sum_q x_q`. The ranks
form a ring: rank :math:`r` only ever sends to its right neighbour
:math:`r + 1` and receives from its left neighbour :math:`r - 1` (indices
mod :math:`p`), both at once (``Communicator.sendrecv``), so every link of the
ring carries data in every step.

**Chunks.** The buffer is cut into :math:`p` contiguous chunks
:math:`C_0, \dots, C_{p-1}` whose sizes differ by at most one,

.. math::
    |C_c| = \lfloor n / p \rfloor + [\, c < n \bmod p \,], \tag{1}

so any :math:`n` works: when :math:`p` does not divide :math:`n` the first
:math:`n \bmod p` chunks are one longer, and when :math:`n < p` the last
:math:`p - n` chunks are empty (their messages carry nothing).

**Reduce-scatter**, steps :math:`t = 0, \dots, p - 2`: rank :math:`r` sends its
partial sum of chunk :math:`(r - t) \bmod p` to the right and adds the partial
sum of chunk :math:`c = (r - t - 1) \bmod p` that arrives from the left to its own:

.. math::
    a_r[C_c] \leftarrow x_r[C_c] + a_{r-1}[C_c], \qquad c = (r - t - 1) \bmod p. \tag{2}

By induction on :math:`t`, after step :math:`t` that chunk on rank :math:`r`
holds :math:`\sum_{j=0}^{t+1} x_{r-j}[C_c]`, the sum over the :math:`t + 2`
ranks that end at :math:`r`; after step :math:`p - 2` it is the sum over all
:math:`p` ranks. Rank :math:`r` then owns the finished chunk
:math:`(r + 1) \bmod p`, and every chunk has exactly one owner.

**All-gather**, steps :math:`t = 0, \dots, p - 2`: rank :math:`r` passes on the
finished chunk :math:`(r + 1 - t) \bmod p` (its own at :math:`t = 0`, then the
one it received in the step before) and stores the one that arrives, no
arithmetic:

.. math::
    a_r[C_c] \leftarrow a_{r-1}[C_c], \qquad c = (r - t) \bmod p. \tag{3}

After :math:`p - 1` steps every rank holds every finished chunk: all ranks end
with the same bits, which data-parallel training needs (their parameters must
stay identical).

**Cost.** Each rank sends one chunk in each of the :math:`2 (p - 1)` steps
(and receives one), so for a buffer of :math:`N = n w` bytes (:math:`w` bytes
per number) it sends

.. math::
    S = \sum_{t} |C_{c_t}|\, w = 2\, \frac{p - 1}{p}\, N \quad
    \text{bytes (exactly when } p \text{ divides } n\text{)}. \tag{4}

In the :math:`\alpha`-:math:`\beta` model a message of :math:`m` bytes costs
:math:`\alpha + m \beta` (latency, then seconds per byte). In every step all
:math:`p` ranks send at once over distinct links, so a step costs one
message of a chunk, :math:`\alpha + \frac{N}{p} \beta`, and the ring

.. math::
    T_\text{ring}(p, N) = 2 (p - 1)\, \alpha + 2\, \frac{p - 1}{p}\, N \beta.

(The :math:`(p - 1) n / p` additions per rank are memory-bound work of the
same order as copying the data, left out here.)

**Why this is bandwidth-optimal.** Take one number, say element :math:`i`, and
let every message carry values of single elements (partial sums of
:math:`x_q[i]`), as any reduction algorithm's do. Order all transfers of values
of element :math:`i` in time and look at the first one after which some rank
:math:`q^*` holds a value that depends on all :math:`p` inputs :math:`x_q[i]`.
Up to and including that transfer, each of the :math:`p - 1` other ranks must
have *sent* a value of element :math:`i` (its input can reach :math:`q^*` no
other way): at least :math:`p - 1` transfers, from distinct senders. At that
moment only :math:`q^*` is complete, so each of the :math:`p - 1` others must
*receive* at least one more value afterwards: :math:`p - 1` further transfers,
to distinct receivers. Every element thus needs at least :math:`2 (p - 1)`
transfers, :math:`2 (p - 1) n` over the buffer, and the :math:`p` ranks share
them: some rank sends (and some receives) at least
:math:`2 \frac{p - 1}{p} n` values, so any all-reduce takes at least

.. math::
    T \ge 2\, \frac{p - 1}{p}\, N \beta,

the bandwidth term of :math:`T_\text{ring}`. The ring has every rank send and receive exactly
that much (when :math:`p` divides :math:`n`), so no algorithm moves less data
per rank. Its latency term, :math:`2 (p - 1) \alpha`, is not optimal:
recursive doubling needs :math:`\lceil \log_2 p \rceil` rounds, and
Rabenseifner's algorithm reaches the same bandwidth term with
:math:`2 \log_2 p` rounds. That is why MPI libraries choose by message size,
and why the ring is meant for large buffers (gradients, not a loss value).

**float16 compression** (``compression="fp16"``; Horovod's ``Compression.fp16``
and PyTorch DDP's ``fp16_compress_hook`` are the references). Every value on
the wire is rounded to float16, :math:`\mathrm{fl}_{16}`, and every addition is
done in the buffer's own dtype (float32 or float64), so Eq. (2) becomes

.. math::
    a_r[C_c] \leftarrow x_r[C_c] + \mathrm{fl}_{16}(a_{r-1}[C_c]), \tag{5}

and the owner of a finished chunk rounds it once more before the all-gather
passes it on, :math:`a_r[C_{r+1}] \leftarrow \mathrm{fl}_{16}(a_r[C_{r+1}])`,
so that every rank still ends with the same bits. (Horovod and DDP instead
sum in float16 inside the all-reduce; here only the transport is float16.)
Half the bytes go over the wire (:math:`w = 2` in Eq. 4), for :math:`p`
roundings of relative error at most :math:`2^{-11}` each on the way to
:math:`s`. Values beyond float16's range (:math:`|a| > 65504`) become
:math:`\pm\infty` and values below about :math:`6 \cdot 10^{-8}` become 0;
an infinity reaches every rank's result, where the trainer's check of the
gradients (``DataParallel.gradients_finite``, ``--on-nonfinite``) finds it.
Data-parallel gradients are already weighted by :math:`b_r / B` before the
sum (what DDP's hook does by dividing by :math:`p` first), so the partial sums
stay within the size of the final gradient. On one rank nothing is sent and
nothing is rounded.

The saving has a price on a CPU: NumPy rounds float32 to float16 in software,
at 3 to 6 ns a number here (slower for values that become float16 subnormals),
and the conversions and mixed additions cost about 7 ns per number of the
buffer on 2 ranks, for 2 bytes per number saved on the wire: 3.5 ns per byte,
where shared memory moves a byte in a fraction of a nanosecond and a 10 Gb/s
link in 0.8 ns. Measured on 2 ranks of one host, the compressed ring takes 7
to 15 times as long as the plain one; it pays only on links slower than about
2 Gb/s per rank. (Horovod and DDP convert on the GPU, where it is nearly free.)

Usage (on every rank; build once, reduce many times: the buffers are reused)::

    ring = RingAllreduce(comm, n=grads.size, dtype=grads.dtype)
    ring.allreduce(grads)                          # in place, the sum over ranks
    ring.wire_bytes                                # bytes this rank sends per call, Eq. (4)
    RingAllreduce(comm, grads.size, np.float32, compression="fp16").allreduce(grads)
    RingAllreduce(comm).allreduce(any_buffer)      # sized by each buffer (new buffers when it changes)

Run under MPI with ``mpiexec -n 3 python your_script.py``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mnn.checks import check_choice, check_float_dtype, check_int
from mnn.distributed.comm import Communicator, get_communicator

__all__ = ["RingAllreduce", "ring_chunk_bounds", "COMPRESSIONS"]

#: Values of ``compression``: "none" sends the buffer's own dtype, "fp16" float16.
COMPRESSIONS = ("none", "fp16")


def ring_chunk_bounds(n: int, world_size: int) -> np.ndarray:
    """The ``world_size + 1`` offsets that cut ``n`` elements into the ring's chunks:
    chunk ``c`` is ``[bounds[c], bounds[c + 1])``."""
    base, longer = divmod(n, world_size)
    sizes = [base + (chunk < longer) for chunk in range(world_size)]  # Eq. (1)
    return np.cumsum([0] + sizes)


class RingAllreduce:
    """In-place sum of a 1-D float32 or float64 buffer over the ranks of ``comm``.

    ``comm``: anything :func:`~mnn.distributed.comm.get_communicator` takes.
    ``n``, ``dtype``: the buffer's length and dtype; the receive buffers (at
    most two chunks) are allocated now and every :meth:`allreduce` reuses them.
    Left out, they are taken from each buffer given, and the receive buffers
    are allocated again whenever the length or dtype changes.
    ``compression``: "none", or "fp16" for float16 on the wire (Eq. 5).
    Every rank builds it alike and calls :meth:`allreduce` at the same point,
    with buffers of the same length and dtype.
    """

    def __init__(self, comm: Any, n: int | None = None, dtype: Any = None, compression: str = "none"):
        self.comm: Communicator = get_communicator(comm)
        self.compression = check_choice("compression", compression, COMPRESSIONS)
        self.sized_by_buffer = n is None and dtype is None
        if self.sized_by_buffer:
            self.n, self.dtype = 0, np.dtype(np.float32)
        elif n is None or dtype is None:
            raise ValueError("RingAllreduce: give both n and dtype, or neither (to size it by each buffer)")
        else:
            self.n, self.dtype = check_int("n", n, minimum=0), check_float_dtype(dtype)
        self._plan()

    def _plan(self) -> None:
        """The schedule of chunks for ``n`` and ``dtype``, and the receive buffers."""
        p, rank = self.comm.size, self.comm.rank
        self.wire_dtype = np.dtype(np.float16) if self.compression == "fp16" else self.dtype
        self.right, self.left = (rank + 1) % p, (rank - 1) % p
        bounds = ring_chunk_bounds(self.n, p)
        chunks = [slice(int(bounds[c]), int(bounds[c + 1])) for c in range(p)]
        # Which chunk goes out and which comes in, at each step of each phase.
        self._reduce_steps = [(chunks[(rank - t) % p], chunks[(rank - t - 1) % p]) for t in range(p - 1)]
        self._gather_steps = [(chunks[(rank + 1 - t) % p], chunks[(rank - t) % p]) for t in range(p - 1)]
        self._owned = chunks[(rank + 1) % p]
        largest = int(np.max(np.diff(bounds)))
        # Uncompressed, the all-gather sends from and receives into the buffer itself;
        # compressed, it passes float16 copies along, so two are needed (one going out,
        # one coming in).
        self._incoming = np.empty(largest, dtype=self.wire_dtype)
        self._outgoing = np.empty(largest, dtype=self.wire_dtype) if self.compression == "fp16" else None

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends per :meth:`allreduce` of ``n`` elements (and receives,
        up to the rounding of chunks)."""
        steps = self._reduce_steps + self._gather_steps
        return sum(send.stop - send.start for send, _ in steps) * self.wire_dtype.itemsize  # Eq. (4)

    def allreduce(self, buffer: np.ndarray) -> np.ndarray:
        """Replace ``buffer`` by its sum over all ranks, in place; return it. Blocking."""
        if self.sized_by_buffer and isinstance(buffer, np.ndarray) and buffer.ndim == 1 \
                and (buffer.size, buffer.dtype) != (self.n, self.dtype):
            self.n, self.dtype = buffer.size, check_float_dtype(buffer.dtype)
            self._plan()
        if not isinstance(buffer, np.ndarray) or buffer.shape != (self.n,) or buffer.dtype != self.dtype:
            raise ValueError(f"RingAllreduce.allreduce: expected a numpy array of shape ({self.n},) and dtype "
                             f"{self.dtype}, got {_describe(buffer)}")
        if not (buffer.flags.c_contiguous and buffer.flags.writeable):
            raise ValueError("RingAllreduce.allreduce works in place on a contiguous, writeable buffer")
        if self.comm.size == 1:
            return buffer
        if self.compression == "fp16":
            self._reduce_scatter_fp16(buffer)
            self._all_gather_fp16(buffer)
        else:
            self._reduce_scatter(buffer)
            self._all_gather(buffer)
        return buffer

    def _reduce_scatter(self, buffer: np.ndarray) -> None:
        for send, receive in self._reduce_steps:
            incoming = self._incoming[:receive.stop - receive.start]
            self.comm.sendrecv(buffer[send], self.right, incoming, self.left)
            buffer[receive] += incoming  # Eq. (2)

    def _all_gather(self, buffer: np.ndarray) -> None:
        for send, receive in self._gather_steps:
            self.comm.sendrecv(buffer[send], self.right, buffer[receive], self.left)  # Eq. (3)

    def _reduce_scatter_fp16(self, buffer: np.ndarray) -> None:
        for send, receive in self._reduce_steps:
            outgoing = self._outgoing[:send.stop - send.start]
            incoming = self._incoming[:receive.stop - receive.start]
            outgoing[...] = buffer[send]  # fl16: rounds to nearest; beyond float16's range, inf
            self.comm.sendrecv(outgoing, self.right, incoming, self.left)
            buffer[receive] += incoming  # Eq. (5): added in the buffer's dtype

    def _all_gather_fp16(self, buffer: np.ndarray) -> None:
        # The owner rounds its finished chunk like everyone else's copy of it, so that
        # every rank ends with the same bits; afterwards each received float16 chunk is
        # stored and passed on as it came, without another conversion.
        outgoing, incoming = self._outgoing, self._incoming
        owned = self._owned
        outgoing[:owned.stop - owned.start] = buffer[owned]
        buffer[owned] = outgoing[:owned.stop - owned.start]
        for send, receive in self._gather_steps:
            arrived = incoming[:receive.stop - receive.start]
            self.comm.sendrecv(outgoing[:send.stop - send.start], self.right, arrived, self.left)
            buffer[receive] = arrived  # Eq. (3)
            outgoing, incoming = incoming, outgoing


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape}, dtype {value.dtype}"
    return type(value).__name__
