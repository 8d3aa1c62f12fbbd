"""Candidate retrieval: pure exclusion helpers first; the hnswlib deployment around them comes later.

Exclusions (items seen, items the caller excludes) are applied after the index search rather than inside it,
so the index stays shared and read-only. To still return k items, the search over-fetches: see `fetch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet

import numpy as np


@dataclass(frozen=True)
class Candidates:
    """Retrieved items, best first."""

    item_indices: np.ndarray  # (n,) int64 internal item indices (1..num_items)
    scores: np.ndarray  # (n,) float64 inner product of user vector and item vector


def fetch_size(k: int, num_excluded: int, num_items: int) -> int:
    """How many neighbours to ask the index for so that k survive the exclusions.

    Any `k + num_excluded` distinct items hold at least k non-excluded ones, whatever the (approximate) index
    returns, so no second search is needed. Capped at the catalogue size (hnswlib refuses more); then fewer than
    k remain only when the catalogue minus the exclusions holds fewer than k items.
    `num_excluded` counts distinct excluded items that are in the index.
    """
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if num_excluded < 0:
        raise ValueError(f"num_excluded: must be >= 0, got {num_excluded}")
    if num_items < 1:
        raise ValueError(f"num_items: must be >= 1, got {num_items}")
    return min(k + num_excluded, num_items)


def ip_scores(distances: np.ndarray) -> np.ndarray:
    """hnswlib "ip" space reports distance = 1 - <u, v>; this returns <u, v> as float64."""
    return 1.0 - np.asarray(distances, dtype=np.float64)


def filter_candidates(
    labels: np.ndarray, scores: np.ndarray, excluded: AbstractSet[int] | np.ndarray, k: int
) -> Candidates:
    """Drops excluded labels and keeps the first k of the rest, in their given (best-first) order.

    labels, scores: (F,) from one index query. Returns at most k candidates.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, got {labels.shape} and {scores.shape}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if isinstance(excluded, np.ndarray):
        excluded_array = excluded.astype(np.int64, copy=False).reshape(-1)
    else:
        excluded_array = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
    keep = np.flatnonzero(~np.isin(labels, excluded_array))[:k]  # positions, still in order
    return Candidates(item_indices=labels[keep], scores=scores[keep])
