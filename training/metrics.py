"""Full-ranking metrics at K: pure numpy over target ranks and top-K lists.

One held-out item per user, so HR@K equals Recall@K. `target_ranks` are 0-based: the number of candidate items
scored strictly above the target (seen items already removed by the caller).
"""

from __future__ import annotations

import re

import numpy as np

# The keys ranking_report writes: what GetModelInfo serves as the model's metrics.
EVALUATION_METRIC = re.compile(r"(?:HR|NDCG|coverage|ILD)@\d+|MRR|users")
# A run's bookkeeping beside its test metrics in test_metrics.json (run_dir.FitResult.summary), not metrics.
TRAINING_SUMMARY_KEYS = ("best_epoch", "epochs_run", "seconds", "seconds_to_best", "workers", "transition_weight")


def is_evaluation_metric(name: str) -> bool:
    return EVALUATION_METRIC.fullmatch(name) is not None


def hit_rate(target_ranks: np.ndarray, k: int) -> float:
    return float(np.mean(target_ranks < k)) if len(target_ranks) else 0.0


def ndcg(target_ranks: np.ndarray, k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG@K = 1 / log2(rank + 2) inside the top K."""
    if not len(target_ranks):
        return 0.0
    gains = np.where(target_ranks < k, 1.0 / np.log2(target_ranks + 2.0), 0.0)
    return float(np.mean(gains))


def mrr(target_ranks: np.ndarray) -> float:
    """Mean reciprocal rank over the full ranking (not cut at K)."""
    return float(np.mean(1.0 / (target_ranks + 1.0))) if len(target_ranks) else 0.0


def coverage(top_items: np.ndarray, k: int, num_items: int) -> float:
    """Share of the catalogue that appears in at least one user's top-K list; top_items (U, >=K)."""
    if not len(top_items):
        return 0.0
    return float(len(np.unique(top_items[:, :k])) / num_items)


def intra_list_diversity(top_items: np.ndarray, item_vectors: np.ndarray, k: int) -> float:
    """Mean pairwise cosine distance (1 - cos) between the K listed items' vectors, averaged over users."""
    if not len(top_items) or k < 2:
        return 0.0
    vectors = item_vectors[top_items[:, :k]]  # (U, K, D)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    similarity = vectors @ vectors.transpose(0, 2, 1)  # (U, K, K)
    off_diagonal = (similarity.sum(axis=(1, 2)) - np.trace(similarity, axis1=1, axis2=2)) / (k * (k - 1))
    return float(np.mean(1.0 - off_diagonal))


def ranking_report(
    target_ranks: np.ndarray, top_items: np.ndarray, item_vectors: np.ndarray | None, ks: list[int], num_items: int
) -> dict[str, float]:
    """All metrics, keyed like "NDCG@10", "HR@10", "MRR", "coverage@10", "ILD@10"."""
    report: dict[str, float] = {}
    for k in ks:
        report[f"HR@{k}"] = hit_rate(target_ranks, k)
        report[f"NDCG@{k}"] = ndcg(target_ranks, k)
        report[f"coverage@{k}"] = coverage(top_items, k, num_items)
        if item_vectors is not None:
            report[f"ILD@{k}"] = intra_list_diversity(top_items, item_vectors, k)
    report["MRR"] = mrr(target_ranks)
    report["users"] = float(len(target_ranks))
    return report
