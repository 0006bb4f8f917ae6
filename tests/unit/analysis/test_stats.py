"""Metric formulas and random-routing baselines against hand-computed values and docs/metrics.md's references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeprobe.analysis import stats

# E = 4 experts with loads 4, 2, 1, 1: total 8, c_bar 2.
LOAD = np.array([4, 2, 1, 1])


def test_load_metrics_on_a_constructed_load() -> None:
    assert stats.maxvio(LOAD) == pytest.approx(1.0)  # (4 - 2) / 2
    assert stats.cv(LOAD) == pytest.approx(math.sqrt(1.5) / 2)  # std sqrt((4+0+1+1)/4) over mean 2
    # sum over ordered pairs |c_i - c_j| = 20, / (2 E^2 mean) = 20 / 64
    assert stats.gini(LOAD) == pytest.approx(0.3125)
    # p = 1/2, 1/4, 1/8, 1/8: H = 1.75 ln 2, over ln 4
    assert stats.entropy_norm(LOAD) == pytest.approx(0.875)
    assert stats.top_n_coverage(LOAD, 1) == pytest.approx(0.5)
    assert stats.top_n_coverage(LOAD, 2) == pytest.approx(0.75)


def test_uniform_and_degenerate_loads() -> None:
    even = np.full(8, 5)
    assert stats.maxvio(even) == 0 and stats.cv(even) == 0 and stats.gini(even) == pytest.approx(0)
    assert stats.entropy_norm(even) == pytest.approx(1.0)
    one = np.array([10, 0, 0, 0])
    assert stats.maxvio(one) == pytest.approx(3.0)
    assert stats.gini(one) == pytest.approx(0.75)  # (E - 1) / E
    assert stats.entropy_norm(one) == 0
    assert math.isnan(stats.maxvio(np.zeros(4)))


def test_balancedness_is_one_over_one_plus_maxvio_when_ranks_are_experts() -> None:
    placement = stats.contiguous_placement(4, 4)
    loads = stats.ep_loads(LOAD, placement, 4)
    assert stats.balancedness(loads) == pytest.approx(1 / (1 + stats.maxvio(LOAD)))
    # two ranks, contiguous: experts 0,1 on rank 0 (6) and 2,3 on rank 1 (2): mean 4 / max 6
    assert stats.balancedness(stats.ep_loads(LOAD, stats.contiguous_placement(4, 2), 2)) == pytest.approx(2 / 3)
    assert list(stats.contiguous_placement(6, 4)) == [0, 0, 1, 2, 2, 3]  # near-equal blocks when W does not divide E


@pytest.mark.parametrize(
    ("experts", "k", "reference"),
    [(8, 2, 0.040), (64, 8, 0.099), (256, 8, 0.25)],
)
def test_random_maxvio_batch_matches_metrics_md_references(experts: int, k: int, reference: float) -> None:
    # docs/metrics.md: MaxVio_batch of random routing at T = 4096 tokens a batch. The E=8 case runs the exact
    # token-by-token simulation, the others the moment-matched multinomial.
    got = stats.random_maxvio_batch(experts, k, np.array([4096]), np.array([1]))
    assert got == pytest.approx(reference, rel=0.06)


def test_random_counts_are_exact_k_subsets_in_the_small_regime() -> None:
    reps = stats.random_counts(8, 2, 100, replicates=16)
    assert reps.shape == (16, 8)
    assert np.all(reps.sum(axis=1) == 200)
    # deterministic: the seed comes from the inputs
    assert np.array_equal(reps, stats.random_counts(8, 2, 100, replicates=16))


def test_repetition_baselines_are_mixtral_table_5_values() -> None:
    first, any_ = stats.repetition_baselines(8, 2)
    assert first == 0.125
    assert any_ == pytest.approx(0.4642857, abs=1e-6)  # 1 - C(6,2)/C(8,2) = 1 - 15/28


@pytest.mark.parametrize(("experts", "k", "tokens"), [(8, 2, 3), (64, 8, 60), (64, 8, 7245), (60, 4, 1000), (16, 16, 5)])
def test_random_baselines_are_the_mean_over_replicates_of_each_replicates_metric(experts: int, k: int, tokens: int) -> None:
    # Exactly, to the bit: the baselines reduce every replicate at once, each as the metric reduces one load vector.
    reps = stats.random_counts(experts, k, tokens)
    got = stats.random_load_baseline(experts, k, tokens, k)
    assert got.maxvio == float(np.mean([stats.maxvio(c) for c in reps]))
    assert got.cv == float(np.mean([stats.cv(c) for c in reps]))
    assert stats.random_maxvio_batch(experts, k, np.array([tokens]), np.array([1])) == got.maxvio


def test_expected_max_share_exact_small_cases() -> None:
    assert stats.expected_max_share(8, 1) == 1.0
    # two occurrences: same expert with probability 1/8 (share 1), else share 1/2
    assert stats.expected_max_share(8, 2) == pytest.approx(1 / 8 + 7 / 8 * 0.5)
    # E=2, n=3: max is 3 with probability 1/4, else 2
    assert stats.expected_max_share(2, 3) == pytest.approx((0.25 * 3 + 0.75 * 2) / 3)
    # the exact branch (n <= 64) and the Monte Carlo one (n > 64) agree where they meet
    assert stats.expected_max_share(16, 64) == pytest.approx(stats.expected_max_share(16, 65), rel=0.03)


@pytest.mark.parametrize(("experts", "n"), [(1, 5), (2, 4), (3, 4), (5, 3), (6, 5), (7, 2), (8, 6)])
def test_expected_max_share_against_every_outcome(experts: int, n: int) -> None:
    # Every one of the E^n equally likely routings of n occurrences, counted: E covers powers of two and others,
    # whose power by squaring multiplies several factors.
    import itertools

    total = sum(max(np.bincount(choice, minlength=experts)) for choice in itertools.product(range(experts), repeat=n))
    assert stats.expected_max_share(experts, n) == pytest.approx(total / experts**n / n, rel=1e-12)


def test_mutual_information_bias_correction_and_normalisation() -> None:
    # expert determines the domain: I = H(domain); only the small bias correction keeps NMI under 1
    table = np.diag([250, 250, 250, 250])
    mi = stats.mutual_information(table)
    assert mi.mi_nats == pytest.approx(math.log(4))
    assert mi.bias_nats == pytest.approx(3 * 3 / (2 * 1000))
    assert mi.nmi == pytest.approx((math.log(4) - 0.0045) / math.log(4))
    # a product table has zero plug-in MI, which the correction pushes below 0; the score is clipped to 0
    assert stats.mutual_information(np.outer([1, 1], [5, 5, 5])).nmi == 0.0


def test_spread_across_layers() -> None:
    out = stats.spread([0.1, 0.5, float("nan"), 0.3], [0, 1, 2, 3])
    assert out["mean"] == pytest.approx(0.3) and out["max"] == 0.5 and out["worst_layer"] == 1
    assert stats.spread([0.9, 0.5], [4, 7], higher_is_worse=False)["worst_layer"] == 7
    assert stats.spread([0, 0], [0, 1])["worst_layer"] is None
