"""training/bootstrap.py against oracles: the exact bootstrap distribution of a tiny sample (every ordered resample
enumerated), the documented seed contract re-derived with numpy, coverage and width on normal data against the
normal theory, and the pairing of `paired_difference`."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from seqrank.training.bootstrap import Interval, bootstrap_interval, paired_difference
from seqrank.training.evaluate import per_user_metrics


def exact_percentile_atoms(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The exact bootstrap distribution's lower and upper quantiles, by enumerating all n**n ordered resamples;
    asserts neither lies within 0.5 % probability of a jump, so a large Monte Carlo sample must land on the atom."""
    n = len(values)
    means = np.sort([np.mean(values[list(draw)]) for draw in itertools.product(range(n), repeat=n)])
    atoms, counts = np.unique(np.round(means, 12), return_counts=True)
    cdf = np.cumsum(counts) / len(means)
    tail = (1 - confidence) / 2
    found = []
    for q in (tail, 1 - tail):
        index = int(np.searchsorted(cdf, q))
        assert cdf[index] - q > 0.005 and (index == 0 or q - cdf[index - 1] > 0.005)
        found.append(float(atoms[index]))
    return found[0], found[1]


@pytest.mark.parametrize("values, confidence", [
    ([0.0, 1.0, 2.0, 10.0], 0.95), ([0.0, 0.0, 1.0, 0.5, 3.0], 0.95), ([1.0, 2.0, 3.0, 4.0, 10.0], 0.8)])
def test_interval_matches_the_exact_bootstrap_distribution(values, confidence):
    values = np.array(values)
    low, high = exact_percentile_atoms(values, confidence)
    got = bootstrap_interval(values, resamples=40_000, confidence=confidence, seed=5)
    assert got.mean == pytest.approx(values.mean())
    assert (got.low, got.high) == pytest.approx((low, high))


def test_seed_contract_resamples_users_with_default_rng():
    values = np.array([0.3, 0.0, 1.0, 0.25, 0.5, 0.0, 0.9])
    rng = np.random.default_rng(11)
    means = np.array([values[rng.integers(0, len(values), size=len(values))].mean() for _ in range(300)])
    low, high = np.percentile(means, [2.5, 97.5])
    assert bootstrap_interval(values, resamples=300, seed=11) == Interval(float(values.mean()), low, high)


def test_coverage_and_width_on_normal_data_match_normal_theory():
    rng = np.random.default_rng(0)
    n, trials, covered = 200, 200, 0
    for trial in range(trials):
        sample = rng.normal(1.0, 2.0, size=n)
        interval = bootstrap_interval(sample, resamples=400, seed=trial)
        covered += interval.low <= 1.0 <= interval.high
    assert 0.90 <= covered / trials <= 0.99
    sample = rng.normal(0.0, 1.0, size=2000)
    interval = bootstrap_interval(sample, resamples=2000)
    half_width = 1.96 * sample.std(ddof=1) / np.sqrt(len(sample))
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert interval.low < sample.mean() < interval.high


def test_paired_difference_of_identical_values_is_zero():
    values = np.random.default_rng(1).random(50)
    assert paired_difference(values, values.copy()) == Interval(0.0, 0.0, 0.0)


def test_paired_difference_pairs_users():
    """Large differences between users, a small steady gain for b: the paired CI sees only the gain's noise."""
    rng = np.random.default_rng(2)
    base = rng.random(400) * 10
    gain = 0.05 + rng.normal(0, 0.01, size=400)
    interval = paired_difference(base + gain, base, resamples=2000)
    assert interval.mean == pytest.approx(gain.mean())
    half_width = 1.96 * gain.std(ddof=1) / np.sqrt(400)
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.15)
    shifted = paired_difference(base, base + 0.1)
    assert (shifted.mean, shifted.low, shifted.high) == pytest.approx((-0.1, -0.1, -0.1))


@pytest.mark.parametrize("call", [
    lambda: bootstrap_interval(np.array([])),
    lambda: bootstrap_interval(np.ones((2, 2))),
    lambda: bootstrap_interval(np.array([1.0, np.nan])),
    lambda: bootstrap_interval(np.ones(3), resamples=0),
    lambda: bootstrap_interval(np.ones(3), confidence=1.0),
    lambda: paired_difference(np.ones(3), np.ones(4)),
])
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()


def test_per_user_metrics_by_hand():
    got = per_user_metrics(np.array([0, 1, 4, 12]), [1, 5])
    assert set(got) == {"HR@1", "NDCG@1", "HR@5", "NDCG@5", "MRR"}
    np.testing.assert_allclose(got["HR@1"], [1, 0, 0, 0])
    np.testing.assert_allclose(got["NDCG@1"], [1, 0, 0, 0])
    np.testing.assert_allclose(got["HR@5"], [1, 1, 1, 0])
    np.testing.assert_allclose(got["NDCG@5"], [1, 1 / np.log2(3), 1 / np.log2(6), 0])
    np.testing.assert_allclose(got["MRR"], [1, 1 / 2, 1 / 5, 1 / 13])
