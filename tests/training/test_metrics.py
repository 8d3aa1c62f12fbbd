"""Metric functions against hand-computed cases."""

import numpy as np
import pytest

from seqrank.training.metrics import coverage, hit_rate, intra_list_diversity, mrr, ndcg, ranking_report


def test_hit_rate_counts_targets_inside_k():
    ranks = np.array([0, 4, 5, 100])
    assert hit_rate(ranks, 5) == pytest.approx(0.5)
    assert hit_rate(ranks, 1) == pytest.approx(0.25)


def test_ndcg_single_relevant_item():
    ranks = np.array([0, 1, 3, 10])
    expected = (1.0 + 1 / np.log2(3) + 1 / np.log2(5) + 0.0) / 4
    assert ndcg(ranks, 10) == pytest.approx(expected)
    assert ndcg(np.array([0]), 1) == 1.0


def test_mrr_is_not_cut_at_k():
    assert mrr(np.array([0, 1, 99])) == pytest.approx((1 + 0.5 + 0.01) / 3)


def test_coverage_counts_distinct_listed_items():
    top = np.array([[1, 2, 3], [1, 2, 4]])
    assert coverage(top, 2, num_items=10) == pytest.approx(0.2)
    assert coverage(top, 3, num_items=10) == pytest.approx(0.4)


def test_intra_list_diversity_orthogonal_and_identical():
    vectors = np.array([[0, 0], [1, 0], [0, 1], [2, 0]], dtype=np.float32)
    assert intra_list_diversity(np.array([[1, 2]]), vectors, 2) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[1, 3]]), vectors, 2) == pytest.approx(0.0, abs=1e-6)
    # three items: pairs (1,2)=1, (1,3)=0, (2,3)=1 → mean distance 2/3
    assert intra_list_diversity(np.array([[1, 2, 3]]), vectors, 3) == pytest.approx(2 / 3)


def test_report_has_the_documented_keys():
    report = ranking_report(np.array([0, 3]), np.array([[1, 2], [2, 1]]), np.eye(3), [1, 2], num_items=2)
    assert report["HR@1"] == 0.5 and report["HR@2"] == 0.5
    assert report["coverage@2"] == 1.0
    assert set(report) >= {"NDCG@1", "HR@2", "coverage@1", "ILD@2", "MRR"}
