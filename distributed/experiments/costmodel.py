r"""The α–β cost model of data-parallel training: fit it here, project it to 1024 ranks.

A message of :math:`n` bytes between two ranks costs :math:`\alpha + n\beta`:
:math:`\alpha` is the latency (seconds per message) and :math:`\beta` the inverse
bandwidth (seconds per byte; here an *effective* one that also holds the cost of
adding the received numbers, which is also proportional to :math:`n`).
An all-reduce of :math:`n` bytes over :math:`p` ranks is a sequence of such messages;
each algorithm costs :math:`c_\alpha(p, n)\,\alpha + c_\beta(p, n)\, n\beta`.

**Ring** (reduce-scatter, then all-gather, each of :math:`p - 1` rounds in which
every rank sends one of :math:`p` chunks of :math:`n/p` bytes to its neighbour):

.. math::
    T_\text{ring}(p, n) = 2(p - 1)\,\alpha + 2\,\frac{p - 1}{p}\, n\beta. \tag{1}

Every byte leaves every rank about twice, whatever :math:`p`: the bandwidth term
is the lower bound for any all-reduce, but the latency term grows linearly in :math:`p`.

**Recursive doubling** (:math:`\log_2 p` rounds, each exchanging the whole vector):

.. math::
    T_\text{rd}(p, n) = (\log_2 p' + 2\delta)\, (\alpha + n\beta). \tag{2}

**Rabenseifner** (reduce-scatter by recursive halving, then all-gather by recursive doubling):

.. math::
    T_\text{rab}(p, n) = 2(\log_2 p' + \delta)\,\alpha
                         + \Bigl(2\,\frac{p' - 1}{p'} + 2\delta\Bigr)\, n\beta. \tag{3}

Both pair ranks up, so they run on :math:`p' = 2^{\lfloor \log_2 p \rfloor}` ranks;
when :math:`p` is not a power of two (:math:`\delta = 1`, else 0), MPICH first has
:math:`p - p'` ranks send their whole vector to a partner and at the end sends them
the result: two more messages of :math:`n` bytes, one before and one after, that
nothing overlaps (Thakur, Rabenseifner and Gropp 2005, section 4). On 3 ranks that
is :math:`3n\beta` against the ring's :math:`\tfrac{4}{3}n\beta`.

**MPI's choice.** We assume MPICH's classic selection (Thakur, Rabenseifner and
Gropp, "Optimization of Collective Communication Operations in MPICH", 2005, and
``MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE`` = 2048 bytes): recursive doubling for short
messages, Rabenseifner's algorithm for the rest,

.. math::
    T_\text{mpi}(p, n) = \begin{cases} T_\text{rd}(p, n) & n < 2048 \\
                                       T_\text{rab}(p, n) & \text{otherwise.} \end{cases} \tag{4}

Real libraries tune the switch points per machine (MPICH 4's JSON tuning files,
Open MPI's ``coll_tuned`` decision rules), so this is a model of the shape, not of
every library.

**Fitting α and β.** The micro-benchmark gives times :math:`t_i` for sizes
:math:`n_i` on :math:`p` ranks. With the algorithm's coefficients as the rows
:math:`x_i = (c_\alpha(p, n_i),\ c_\beta(p, n_i)\, n_i)`, the model is linear in
:math:`\theta = (\alpha, \beta)`. Sizes span seven decades, so relative errors are
what matter: weights :math:`w_i = 1/t_i^2` and

.. math::
    \hat\theta = \arg\min_\theta \sum_i w_i\, (t_i - x_i^\top\theta)^2
               = (X^\top W X)^{-1} X^\top W t. \tag{5}

Its standard errors come from the residual variance,
:math:`s^2 = \sum_i w_i r_i^2 / (m - 2)` and
:math:`\operatorname{Cov}\hat\theta = s^2 (X^\top W X)^{-1}`, and the fit's
(weighted) coefficient of determination is

.. math::
    R^2 = 1 - \frac{\sum_i w_i r_i^2}{\sum_i w_i (t_i - \bar t_w)^2}, \qquad
    \bar t_w = \frac{\sum_i w_i t_i}{\sum_i w_i}. \tag{6}

A latency cannot be negative. When Eq. (5) gives :math:`\hat\alpha < 0` (all the
sizes lie where bandwidth rules, and noise tips the intercept below zero), α is
fixed at 0 and β fitted alone, with its standard error from :math:`m - 1` degrees
of freedom; α's standard error is then 0, as it was not estimated. A negative α
would make the ring's :math:`2(p - 1)\alpha` shrink the step as :math:`p` grows.

**A training step.** Measured on one rank: the compute time per sample
:math:`t_s` (forward and backward; taken as the same at every batch size) and the
optimizer's time :math:`t_o` per step. ``DataParallel`` reduces the gradients in
buckets of :math:`n_k` bytes; the model assumes none of that communication is
hidden behind backward (an upper bound on the step, so a lower bound on the
efficiency; on a core that computes, MPI makes little progress in the background):

.. math::
    T_\text{step}(p, b) = b\, t_s + t_o + \sum_k T_\text{coll}(p, n_k), \tag{7}

with :math:`b` the samples per rank and :math:`T_\text{coll}` Eq. (1) or (4)
(zero at :math:`p = 1`). Throughput and efficiency follow, for weak scaling
(:math:`b` fixed) and for strong scaling (global batch :math:`B`, :math:`b = B/p`):

.. math::
    S(p) = \frac{p\, b}{T_\text{step}(p, b)}, \qquad
    E_\text{weak}(p) = \frac{T_\text{step}(1, b)}{T_\text{step}(p, b)}, \qquad
    E_\text{strong}(p) = \frac{T_\text{step}(1, B)}{p\, T_\text{step}(p, B/p)}. \tag{8}

**Why big gradients per unit of compute scale worse.** For large :math:`p` (a power
of two for Eq. 3) the bandwidth term of Eq. (1) or (3) tends to :math:`2n\beta` with
:math:`n = \sum_k n_k`, so, leaving latency and the optimizer aside,

.. math::
    E_\infty = \frac{b\, t_s}{b\, t_s + 2 n \beta}
             = \frac{1}{1 + 2\beta\, n / (b\, t_s)}. \tag{9}

Only the ratio of gradient bytes to compute seconds, :math:`n / (b\, t_s)`,
matters: a net with a large gradient and little compute per step (a wide MLP
at a small batch, VGG-16 beside ResNet-101) loses efficiency on every network
on which a larger-compute one scales well.

Usage::

    fit = fit_alpha_beta([4, 8, ...], [2.1e-6, 2.2e-6, ...], ranks=2, algorithm="mpi")
    network = Network("local", fit.alpha, fit.beta, "fitted here")
    workload = Workload(compute_s_per_sample=1.2e-4, optimizer_s=0.8e-3, bucket_bytes=(4_194_304, 3_215_360))
    step_time(workload, ranks=64, per_rank_batch=256, network=NETWORKS["25gbe"], algorithm="ring")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "ALGORITHMS",
    "MPICH_SHORT_MESSAGE_BYTES",
    "NETWORKS",
    "AlphaBetaFit",
    "Network",
    "Workload",
    "allreduce_time",
    "bandwidth_bound_efficiency",
    "coefficients",
    "describe_algorithm",
    "efficiency",
    "fit_alpha_beta",
    "projection_ranks",
    "step_time",
    "throughput",
]

#: MPICH's MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE: below it recursive doubling, from it Rabenseifner.
MPICH_SHORT_MESSAGE_BYTES = 2048


@dataclass(frozen=True)
class Network:
    """A network's α (seconds per message) and β (seconds per byte), and where they come from."""

    name: str
    alpha: float
    beta: float
    source: str

    def describe(self) -> str:
        return (f"{self.name}: alpha = {self.alpha * 1e6:.3g} us, beta = {self.beta * 1e9:.3g} ns/B "
                f"({1 / self.beta / 1e9:.3g} GB/s); {self.source}")


#: Typical MPI figures for common cluster networks (half round-trip latency of a small message,
#: large-message bandwidth). They are orders of magnitude to project with, not measurements of any
#: particular cluster: measure yours (mnn-scaling --collectives) and pass --alpha/--beta.
NETWORKS = {
    "10gbe": Network(
        "10gbe", alpha=25e-6, beta=1 / 1.17e9, source=(
        "10 Gb/s Ethernet, MPI over kernel TCP: ~25 us small-message latency (MPICH over TCP, OSU "
        "osu_latency, gist.github.com/jfgrimm/3af692a5475bdd4ed836b5a18197a209); 1.17 GB/s = 9.4 Gb/s "
        "of TCP payload at 10 Gb/s line rate (IEEE 802.3ae) with 1500-byte frames")),
    "25gbe": Network(
        "25gbe", alpha=25e-6, beta=1 / 2.9e9, source=(
        "25 Gb/s Ethernet, MPI over kernel TCP: the same ~25 us latency as 10 GbE (the TCP stack, not "
        "the wire, sets it); 2.9 GB/s = 23.5 Gb/s of TCP payload at 25 Gb/s line rate (IEEE 802.3by). "
        "RDMA (RoCE) would cut alpha to a few us")),
    "100gb-ib": Network(
        "100gb-ib", alpha=1.2e-6, beta=1 / 12.3e9, source=(
        "100 Gb/s InfiniBand EDR class fabric with RDMA: ~1.2 us latency (OSU osu_latency) and ~12.3 GB/s "
        "(OSU osu_mbw_mr) as published for a 100 Gb/s fabric in gist.github.com/hppritcha "
        "(8da4436a216c9d96bf10ad9d403da03f, 200bc7a2d4dfde709245d6ffa7b2b971)")),
}


def _rounds(ranks: int) -> int:
    """log2 of the largest power of two not above ``ranks``: the rounds of the pairwise algorithms."""
    return ranks.bit_length() - 1


def _extra(ranks: int) -> int:
    # 1 when ranks is not a power of two: the pairwise algorithms' message in and message out.
    return 0 if ranks & (ranks - 1) == 0 else 1


def _ring(ranks: int, n_bytes: float) -> tuple[float, float]:
    return 2 * (ranks - 1), 2 * (ranks - 1) / ranks  # Eq. (1)


def _recursive_doubling(ranks: int, n_bytes: float) -> tuple[float, float]:
    steps = _rounds(ranks) + 2 * _extra(ranks)
    return steps, steps  # Eq. (2)


def _rabenseifner(ranks: int, n_bytes: float) -> tuple[float, float]:
    paired = 2 ** _rounds(ranks)
    return 2 * (_rounds(ranks) + _extra(ranks)), 2 * (paired - 1) / paired + 2 * _extra(ranks)  # Eq. (3)


def _mpich(ranks: int, n_bytes: float) -> tuple[float, float]:
    if n_bytes < MPICH_SHORT_MESSAGE_BYTES:  # Eq. (4)
        return _recursive_doubling(ranks, n_bytes)
    return _rabenseifner(ranks, n_bytes)


#: The all-reduce models by name: "ring" is Eq. (1), "mpi" MPICH's choice, Eq. (4). "ring-fp16"
#: (float16 on the wire) is the ring's model too; its fitted beta holds the halved bytes.
ALGORITHMS: dict[str, Callable[[int, float], tuple[float, float]]] = {"ring": _ring, "mpi": _mpich}
_MODEL_OF = {"ring-fp16": "ring"}

_ALGORITHM_TEXT = {
    "ring": "ring all-reduce, 2(p-1) alpha + 2 (p-1)/p n beta",
    "mpi": (f"MPICH's choice: recursive doubling log2 p (alpha + n beta) below {MPICH_SHORT_MESSAGE_BYTES} B, "
            "Rabenseifner 2 log2 p alpha + 2 (p-1)/p n beta from there; on p not a power of two both run "
            "on the largest power of two p' below it, plus 2 (alpha + n beta) to gather and scatter the rest"),
}


def _check_algorithm(algorithm: str) -> None:
    if _MODEL_OF.get(algorithm, algorithm) not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}: expected one of {sorted(ALGORITHMS)}")


def describe_algorithm(algorithm: str) -> str:
    """One line saying what ``algorithm``'s model assumes."""
    _check_algorithm(algorithm)
    return _ALGORITHM_TEXT[_MODEL_OF.get(algorithm, algorithm)]


def coefficients(algorithm: str, ranks: int, n_bytes: float) -> tuple[float, float]:
    """:math:`(c_\\alpha, c_\\beta)` of ``algorithm`` for ``n_bytes`` on ``ranks``:
    the time is ``c_alpha * alpha + c_beta * n_bytes * beta``."""
    _check_algorithm(algorithm)
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if ranks == 1:
        return 0.0, 0.0
    return ALGORITHMS[_MODEL_OF.get(algorithm, algorithm)](ranks, n_bytes)


def allreduce_time(algorithm: str, ranks: int, n_bytes: float, alpha: float, beta: float) -> float:
    """Seconds for one all-reduce of ``n_bytes`` on ``ranks``: Eq. (1) for "ring", Eq. (4) for "mpi"."""
    c_alpha, c_beta = coefficients(algorithm, ranks, n_bytes)
    return c_alpha * alpha + c_beta * n_bytes * beta


@dataclass(frozen=True)
class AlphaBetaFit:
    """The least-squares α and β of one collective (Eq. 5), with standard errors and R² (Eq. 6).

    ``relative_residuals`` are ``(measured - fitted) / measured`` per size, in input order.
    """

    algorithm: str
    ranks: int
    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    r_squared: float
    sizes: tuple[int, ...]
    relative_residuals: tuple[float, ...]

    def predict(self, n_bytes: float, ranks: int | None = None) -> float:
        return allreduce_time(self.algorithm, self.ranks if ranks is None else ranks, n_bytes, self.alpha, self.beta)

    def describe(self) -> str:
        alpha = ("alpha = 0 (fixed: the fitted intercept was negative)" if self.alpha == 0 and self.alpha_se == 0
                 else f"alpha = {self.alpha * 1e6:.3g} +- {self.alpha_se * 1e6:.2g} us")
        return (f"{alpha}, "
                f"beta = {self.beta * 1e9:.3g} +- {self.beta_se * 1e9:.2g} ns/B "
                f"({1 / self.beta / 1e9:.3g} GB/s), R^2 = {self.r_squared:.4f} "
                f"({len(self.sizes)} sizes on {self.ranks} ranks, model: {self.algorithm})")


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float], ranks: int,
                   algorithm: str = "mpi") -> AlphaBetaFit:
    """Fit α and β of ``algorithm``'s model to all-reduce times measured on ``ranks`` (Eq. 5, 6).

    ``sizes`` in bytes and ``seconds`` per all-reduce, one pair per message size;
    at least three sizes, all times positive, ``ranks`` at least 2.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    times = np.asarray(seconds, dtype=np.float64)
    if sizes.shape != times.shape or sizes.ndim != 1:
        raise ValueError(f"sizes and seconds must be 1-D and of one length, got {sizes.shape} and {times.shape}")
    if len(sizes) < 3:
        raise ValueError(f"fitting alpha and beta needs at least 3 message sizes, got {len(sizes)}")
    if not (np.all(np.isfinite(times)) and np.all(times > 0) and np.all(sizes > 0)):
        raise ValueError("sizes and seconds must be positive and finite")
    if ranks < 2:
        raise ValueError(f"an all-reduce on {ranks} rank costs nothing to fit: measure on at least 2 ranks")
    rows = np.array([coefficients(algorithm, ranks, size) for size in sizes])
    design = np.column_stack([rows[:, 0], rows[:, 1] * sizes])
    weights = 1.0 / times**2
    theta, covariance, residuals = _weighted_least_squares(design, times, weights)  # Eq. (5)
    if theta[0] < 0:  # a negative latency: fix it at 0 (module docstring)
        beta, beta_covariance, residuals = _weighted_least_squares(design[:, 1:], times, weights)
        theta, covariance = np.array([0.0, beta[0]]), np.diag([0.0, beta_covariance[0, 0]])
    mean = np.sum(weights * times) / np.sum(weights)
    r_squared = 1.0 - np.sum(weights * residuals**2) / np.sum(weights * (times - mean) ** 2)  # Eq. (6)
    return AlphaBetaFit(algorithm, int(ranks), float(theta[0]), float(theta[1]),
                        float(np.sqrt(covariance[0, 0])), float(np.sqrt(covariance[1, 1])), float(r_squared),
                        tuple(int(size) for size in sizes), tuple(float(r) for r in residuals / times))


def _weighted_least_squares(design: np.ndarray, times: np.ndarray,
                            weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """θ of Eq. (5) for the columns of ``design``, its covariance and the residuals."""
    root_w = np.sqrt(weights)
    # Scale the columns to unit size first: c_alpha is ~1, c_beta * n up to ~1e8.
    scale = np.max(np.abs(design), axis=0)
    scale[scale == 0] = 1.0
    solution, *_ = np.linalg.lstsq(design / scale * root_w[:, None], times * root_w, rcond=None)
    theta = solution / scale
    residuals = times - design @ theta
    variance = np.sum(weights * residuals**2) / max(len(times) - design.shape[1], 1)
    covariance = variance * np.linalg.pinv((design * weights[:, None]).T @ design)
    return theta, covariance, residuals


@dataclass(frozen=True)
class Workload:
    """One data-parallel training step: compute per sample, optimizer per step, gradient buckets.

    ``bucket_bytes`` are the bytes of each all-reduce of a step (``DataParallel``'s buckets).
    """

    name: str
    compute_s_per_sample: float
    optimizer_s: float
    bucket_bytes: tuple[int, ...]

    @property
    def gradient_bytes(self) -> int:
        return int(sum(self.bucket_bytes))

    def scaled_compute(self, factor: float, name: str) -> "Workload":
        """The same gradient with ``factor`` times the compute per sample (a larger-compute net)."""
        return Workload(name, self.compute_s_per_sample * factor, self.optimizer_s, self.bucket_bytes)


def step_time(workload: Workload, ranks: int, per_rank_batch: float, network: Network,
              algorithm: str = "mpi") -> float:
    """Predicted seconds per step, Eq. (7)."""
    communication = sum(allreduce_time(algorithm, ranks, n_bytes, network.alpha, network.beta)
                        for n_bytes in workload.bucket_bytes)
    return per_rank_batch * workload.compute_s_per_sample + workload.optimizer_s + communication  # Eq. (7)


def throughput(workload: Workload, ranks: int, per_rank_batch: float, network: Network,
               algorithm: str = "mpi") -> float:
    """Predicted samples per second over all ranks, Eq. (8)."""
    return ranks * per_rank_batch / step_time(workload, ranks, per_rank_batch, network, algorithm)  # Eq. (8)


def efficiency(workload: Workload, ranks: int, network: Network, algorithm: str = "mpi", *,
               per_rank_batch: float | None = None, global_batch: float | None = None) -> float:
    """Predicted weak-scaling (``per_rank_batch``) or strong-scaling (``global_batch``) efficiency, Eq. (8)."""
    if (per_rank_batch is None) == (global_batch is None):
        raise ValueError("give exactly one of per_rank_batch (weak scaling) and global_batch (strong scaling)")
    if per_rank_batch is not None:
        return (step_time(workload, 1, per_rank_batch, network, algorithm)
                / step_time(workload, ranks, per_rank_batch, network, algorithm))  # Eq. (8), weak
    return (step_time(workload, 1, global_batch, network, algorithm)
            / (ranks * step_time(workload, ranks, global_batch / ranks, network, algorithm)))  # Eq. (8), strong


def bandwidth_bound_efficiency(gradient_bytes: float, compute_s: float, beta: float) -> float:
    """The efficiency that large ``p`` tends to when bandwidth dominates, Eq. (9):
    ``compute_s`` of forward and backward per step against ``gradient_bytes`` reduced."""
    return 1.0 / (1.0 + 2.0 * beta * gradient_bytes / compute_s)  # Eq. (9)


def projection_ranks(largest: int = 1024) -> list[int]:
    """1, 2, 4, ... up to ``largest`` (included even when not a power of two)."""
    ranks = [1]
    while ranks[-1] * 2 <= largest:
        ranks.append(ranks[-1] * 2)
    if ranks[-1] != largest:
        ranks.append(largest)
    return ranks
