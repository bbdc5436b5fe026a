"""The α–β cost model: its all-reduce formulas, the least-squares fit, and the step-time projection."""

import math

import numpy as np
import pytest

from mnn.distributed.experiments import costmodel
from mnn.distributed.experiments.costmodel import (
    NETWORKS,
    Network,
    Workload,
    allreduce_time,
    bandwidth_bound_efficiency,
    coefficients,
    efficiency,
    fit_alpha_beta,
    projection_ranks,
    step_time,
    throughput,
)
from test_docs import uncited_module_tags

SIZES = [2**k for k in range(2, 27)]  # 4 B ... 64 MiB, as the micro-benchmark measures


def test_every_tag_of_the_model_is_cited_by_the_line_that_implements_it():
    assert not uncited_module_tags(costmodel)


@pytest.mark.parametrize("algorithm, ranks, n_bytes, expected", [
    ("ring", 4, 1e6, (6, 1.5)),                 # 2(p-1), 2(p-1)/p
    ("ring", 2, 8, (2, 1.0)),
    ("mpi", 8, 1e6, (6, 1.75)),                 # Rabenseifner: 2 log2 p, 2(p-1)/p
    ("mpi", 8, 1024, (3, 3)),                   # recursive doubling below 2048 B
    ("mpi", 5, 1e6, (6, 3.5)),                  # on p' = 4, plus one rank's vector in and out
    ("mpi", 3, 1024, (3, 3)),                   # recursive doubling on 2, plus in and out
    ("mpi", 1, 1e6, (0, 0)),                    # one rank: nothing to send
    ("ring-fp16", 4, 1e6, (6, 1.5)),            # the ring's model
])
def test_coefficients_of_each_algorithm(algorithm, ranks, n_bytes, expected):
    assert coefficients(algorithm, ranks, n_bytes) == pytest.approx(expected)


def test_ring_time_is_the_textbook_formula():
    alpha, beta, p, n = 3e-6, 1e-9, 16, 4e6
    assert allreduce_time("ring", p, n, alpha, beta) == pytest.approx(2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta)


@pytest.mark.parametrize("algorithm, ranks", [("mpi", 2), ("mpi", 8), ("ring", 2), ("ring", 6)])
def test_fit_recovers_known_alpha_and_beta_exactly_from_noiseless_timings(algorithm, ranks):
    alpha, beta = 4e-6, 2.5e-10
    times = [allreduce_time(algorithm, ranks, size, alpha, beta) for size in SIZES]
    fit = fit_alpha_beta(SIZES, times, ranks, algorithm)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.beta == pytest.approx(beta, rel=1e-9)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert max(map(abs, fit.relative_residuals)) < 1e-9


def test_fit_recovers_alpha_and_beta_through_noise_with_honest_standard_errors():
    alpha, beta, ranks = 6e-6, 4e-10, 2
    rng = np.random.default_rng(0)
    # 5 % multiplicative noise, as on a shared machine.
    times = [allreduce_time("mpi", ranks, size, alpha, beta) * (1 + 0.05 * rng.standard_normal()) for size in SIZES]
    fit = fit_alpha_beta(SIZES, times, ranks, "mpi")
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    assert fit.beta == pytest.approx(beta, rel=0.05)
    # The truth lies within a few standard errors, and the errors are not absurdly small or large.
    assert abs(fit.alpha - alpha) < 4 * fit.alpha_se and 0 < fit.alpha_se < 0.1 * alpha
    assert abs(fit.beta - beta) < 4 * fit.beta_se and 0 < fit.beta_se < 0.1 * beta
    assert 0.9 < fit.r_squared <= 1.0
    assert fit.predict(2**20) == pytest.approx(allreduce_time("mpi", ranks, 2**20, fit.alpha, fit.beta))


def test_a_negative_latency_is_fixed_at_zero_and_beta_fitted_alone():
    # Large messages only, each a little faster than its bytes allow (a token bucket's burst):
    # the straight line through them crosses zero above the origin.
    beta, sizes = 8e-9, [2**k for k in range(19, 25)]
    times = [allreduce_time("ring", 3, size, 0.0, beta) - 2e-4 for size in sizes]
    fit = fit_alpha_beta(sizes, times, 3, "ring")
    assert fit.alpha == 0.0 and fit.alpha_se == 0.0
    assert fit.beta == pytest.approx(beta, rel=0.05) and fit.beta_se > 0
    assert fit.predict(sizes[-1], ranks=1024) > fit.predict(sizes[-1])


@pytest.mark.parametrize("sizes, seconds, ranks, message", [
    ([4, 8], [1e-6, 1e-6], 2, "at least 3 message sizes"),
    ([4, 8, 16], [1e-6, 0.0, 1e-6], 2, "positive and finite"),
    ([4, 8, 16], [1e-6, 1e-6, 1e-6], 1, "at least 2 ranks"),
    ([4, 8, 16], [1e-6, 1e-6], 2, "one length"),
])
def test_fit_rejects_what_it_cannot_fit(sizes, seconds, ranks, message):
    with pytest.raises(ValueError, match=message):
        fit_alpha_beta(sizes, seconds, ranks)


def test_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match="unknown all-reduce algorithm 'tree'"):
        coefficients("tree", 4, 100)


WORKLOAD = Workload("test", compute_s_per_sample=1e-4, optimizer_s=1e-3, bucket_bytes=(4_000_000, 3_000_000))
NETWORK = Network("test", alpha=10e-6, beta=1e-9, source="made up")


def test_step_time_adds_compute_optimizer_and_one_allreduce_per_bucket():
    expected = 256 * 1e-4 + 1e-3 + sum(allreduce_time("ring", 8, n, 10e-6, 1e-9) for n in (4e6, 3e6))
    assert step_time(WORKLOAD, 8, 256, NETWORK, "ring") == pytest.approx(expected)
    assert step_time(WORKLOAD, 1, 256, NETWORK, "ring") == pytest.approx(256 * 1e-4 + 1e-3)
    assert throughput(WORKLOAD, 8, 256, NETWORK, "ring") == pytest.approx(8 * 256 / expected)


def test_weak_and_strong_efficiency():
    weak = efficiency(WORKLOAD, 8, NETWORK, "mpi", per_rank_batch=256)
    assert weak == pytest.approx(step_time(WORKLOAD, 1, 256, NETWORK) / step_time(WORKLOAD, 8, 256, NETWORK))
    strong = efficiency(WORKLOAD, 8, NETWORK, "mpi", global_batch=2048)
    assert strong == pytest.approx(step_time(WORKLOAD, 1, 2048, NETWORK)
                                   / (8 * step_time(WORKLOAD, 8, 256, NETWORK)))
    assert efficiency(WORKLOAD, 1, NETWORK, per_rank_batch=256) == 1.0
    with pytest.raises(ValueError, match="exactly one"):
        efficiency(WORKLOAD, 8, NETWORK)


def test_efficiency_tends_to_the_bandwidth_bound_when_latency_is_free():
    free_latency = Network("bandwidth only", alpha=0.0, beta=1e-9, source="made up")
    no_optimizer = Workload("w", 1e-4, 0.0, (7_000_000,))
    at_scale = efficiency(no_optimizer, 2**20, free_latency, "ring", per_rank_batch=256)
    assert at_scale == pytest.approx(bandwidth_bound_efficiency(7e6, 256 * 1e-4, 1e-9), rel=1e-5)


def test_more_compute_for_the_same_gradient_scales_better_on_every_network():
    large = WORKLOAD.scaled_compute(16, "large")
    for network in NETWORKS.values():
        for algorithm in ("mpi", "ring"):
            small_e = efficiency(WORKLOAD, 512, network, algorithm, per_rank_batch=64)
            large_e = efficiency(large, 512, network, algorithm, per_rank_batch=64)
            assert small_e < large_e < 1


def test_presets_state_their_figures_and_sources():
    for network in NETWORKS.values():
        assert network.alpha > 0 and network.beta > 0 and network.source
        assert "us" in network.describe() and "GB/s" in network.describe()
    assert NETWORKS["100gb-ib"].beta < NETWORKS["25gbe"].beta < NETWORKS["10gbe"].beta


def test_projection_ranks():
    assert projection_ranks(1024) == [2**k for k in range(11)]
    assert projection_ranks(12) == [1, 2, 4, 8, 12]
    assert projection_ranks(1) == [1]
    assert math.log2(projection_ranks()[-1]) == 10
