"""Percentile bootstrap confidence intervals over per-user metric values.

Users are the resampling unit: each resample draws len(values) users with replacement and takes the mean.
`paired_difference` resamples the same user indices for both arms, so it measures mean(a - b) on shared users
(the variance between users cancels, which is why a paired CI is narrower than two separate ones).
Percentiles use numpy's default (linear) interpolation. Efron & Tibshirani, "An Introduction to the Bootstrap"
(1993), ch. 13.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Resamples drawn per chunk: bounds the (chunk, n) index matrix for large user counts.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """The sample mean and the percentile interval [low, high] around it."""

    mean: float
    low: float
    high: float


def _check(values: np.ndarray, name: str, resamples: int, confidence: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-user values, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return values


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples,) means of `values` under user indices drawn by default_rng(seed).integers(0, n, (resamples, n)).

    Drawn in chunks of rows; a Generator's integer stream is the same whether drawn at once or row-block by
    row-block, so the result does not depend on the chunk size.
    """
    n = len(values)
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows_per_chunk):
        stop = min(resamples, start + rows_per_chunk)
        indices = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        means[start:stop] = values[indices].mean(axis=1)
    return means


def _interval(values: np.ndarray, resamples: int, confidence: float, seed: int) -> Interval:
    means = _resampled_means(values, resamples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Interval(mean=float(values.mean()), low=float(low), high=float(high))


def bootstrap_interval(
    values: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap CI of mean(values); values (U,) one number per user."""
    values = _check(values, "values", resamples, confidence)
    return _interval(values, resamples, confidence, seed)


def paired_difference(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap CI of mean(a - b); a and b (U,) per-user values on the same users in the same order."""
    a = _check(a, "a", resamples, confidence)
    b = _check(b, "b", resamples, confidence)
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same users: shapes {a.shape} and {b.shape} differ")
    return _interval(a - b, resamples, confidence, seed)
