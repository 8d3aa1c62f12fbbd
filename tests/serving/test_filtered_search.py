"""Filtered top-k against a brute-force oracle: the exact path equals it, the HNSW path finds it and never returns
a disallowed item, over real hnswlib indexes (plain and norm-augmented) and masks from all to none."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from seqrank.serving.bench.ann import clustered_vectors, recall_at_k
from seqrank.serving.filtered_search import (
    EMPTY,
    EXACT,
    HNSW,
    HNSW_FILTER,
    FilterPolicy,
    exact_top_k_allowed,
    filtered_search,
    filtered_top_k,
    plan_search,
)
from seqrank.training.artifact import IndexParams, build_hnsw_index

NUM_ITEMS = 400
K = 10
WIDE_EF = 400  # generous: about the whole catalogue
FORCE_EXACT = FilterPolicy(exact_max_items=10**9)
FORCE_HNSW = FilterPolicy(exact_max_items=0, exact_max_fraction=0.0, graph_filter_plain_index=True)


def oracle(item_vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray):
    """Score everything, disallowed to -inf, stable sort (ties to the lower label), keep min(k, allowed)."""
    scores = queries @ item_vectors.T  # (B, I+1)
    scores[:, ~allowed] = -np.inf
    kept = min(k, int(allowed.sum()))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kept]
    return order.astype(np.int64), np.take_along_axis(scores, order, axis=1)


def catalogue(seed: int, dim: int, num_items: int = NUM_ITEMS, num_queries: int = 30):
    rng = np.random.default_rng(seed)
    item_vectors = np.zeros((num_items + 1, dim), np.float32)  # row 0: PAD
    item_vectors[1:] = rng.standard_normal((num_items, dim)).astype(np.float32) * rng.uniform(0.5, 1.5, (num_items, 1))
    return item_vectors, rng.standard_normal((num_queries, dim)).astype(np.float32)


def mask(case: str, num_items: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    allowed = np.zeros(num_items + 1, bool)
    if case == "all":
        allowed[1:] = True
    elif case == "none":
        pass
    elif case in ("exactly_k", "fewer_than_k"):
        allowed[rng.choice(np.arange(1, num_items + 1), K if case == "exactly_k" else 3, replace=False)] = True
    else:
        allowed[1:] = rng.random(num_items) < float(case)
    return allowed


CASES = ["0.5", "0.05", "0.005", "all", "none", "exactly_k", "fewer_than_k"]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "norm_augmented"])
def indexed(request):
    item_vectors, queries = catalogue(seed=int(request.param), dim=12 if request.param else 8)
    index = build_hnsw_index(item_vectors, IndexParams(M=16, ef_construction=200, ef_search=50,
                                                       norm_augmented=request.param))
    return index, item_vectors, queries


@pytest.mark.parametrize("case", CASES)
def test_exact_path_equals_the_oracle(indexed, case):
    index, item_vectors, queries = indexed
    allowed = mask(case, NUM_ITEMS, seed=1)
    truth_labels, truth_scores = oracle(item_vectors, queries, K, allowed)
    result = filtered_search(index, item_vectors, queries, K, allowed, ef=50, policy=FORCE_EXACT)
    assert result.plan.strategy in (EXACT, HNSW, EMPTY)  # everything allowed: plain HNSW whatever the policy
    if result.plan.strategy == HNSW:
        return  # covered by the HNSW test
    np.testing.assert_array_equal(result.labels, truth_labels)
    np.testing.assert_allclose(result.scores, truth_scores, rtol=0, atol=1e-5)
    labels, scores = exact_top_k_allowed(item_vectors, queries, K, allowed)
    np.testing.assert_array_equal(labels, truth_labels)
    assert labels.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("case", CASES)
def test_hnsw_path_finds_the_oracle_and_never_returns_a_disallowed_item(indexed, case):
    index, item_vectors, queries = indexed
    allowed = mask(case, NUM_ITEMS, seed=1)
    truth_labels, truth_scores = oracle(item_vectors, queries, K, allowed)
    result = filtered_search(index, item_vectors, queries, K, allowed, ef=WIDE_EF, policy=FORCE_HNSW)
    kept = truth_labels.shape[1]
    assert result.labels.shape == result.scores.shape == (len(queries), kept)
    assert result.labels.dtype == np.int64 and result.scores.dtype == np.float32
    if kept == 0:
        assert result.plan.strategy == EMPTY
        return
    assert result.plan.strategy == (HNSW if case == "all" else HNSW_FILTER)
    assert allowed[result.labels].all()
    assert all(len(set(row)) == kept for row in result.labels.tolist())
    assert recall_at_k(result.labels, truth_labels, kept) >= 0.99
    # Scores are the inner products of the returned items, best first.
    np.testing.assert_allclose(result.scores, np.einsum("bkd,bd->bk", item_vectors[result.labels], queries),
                               rtol=0, atol=1e-5)
    assert (np.diff(result.scores, axis=1) <= 0).all()
    if kept < K:  # k' = 3: all of them, in the oracle's order and with its scores
        np.testing.assert_array_equal(result.labels, truth_labels)
        np.testing.assert_allclose(result.scores, truth_scores, rtol=0, atol=1e-5)


def test_queries_hnswlib_cannot_answer_fall_back_to_exact_search():
    """hnswlib raises instead of returning short rows; here one allowed item is deleted in the index (a caller
    that forgot to fold sold-out items into the mask), so it finds 2 of k' = 3 and every query goes exact."""
    item_vectors, queries = catalogue(seed=7, dim=8, num_items=200)
    index = build_hnsw_index(item_vectors, IndexParams(M=16, ef_construction=100, ef_search=50))
    allowed = np.zeros(201, bool)
    allowed[[5, 77, 150]] = True
    index.index.mark_deleted(77)
    result = filtered_search(index, item_vectors, queries, K, allowed, ef=50, policy=FORCE_HNSW)
    assert result.plan.strategy == HNSW_FILTER and result.exact_fallbacks == len(queries)
    truth_labels, truth_scores = oracle(item_vectors, queries, K, allowed)
    np.testing.assert_array_equal(result.labels, truth_labels)
    np.testing.assert_allclose(result.scores, truth_scores, rtol=0, atol=1e-5)
    mixed = filtered_search(index, item_vectors, queries, 2, allowed, ef=50, policy=FORCE_HNSW)
    assert mixed.exact_fallbacks == 0 and allowed[mixed.labels].all() and not (mixed.labels == 77).any()


@pytest.mark.parametrize("case", CASES)
def test_default_policy_returns_the_oracle_top_k(indexed, case):
    index, item_vectors, queries = indexed
    allowed = mask(case, NUM_ITEMS, seed=2)
    truth_labels, _ = oracle(item_vectors, queries, K, allowed)
    labels, scores = filtered_top_k(index, item_vectors, queries, K, allowed, ef=WIDE_EF, policy=FilterPolicy())
    assert labels.shape == scores.shape == truth_labels.shape and allowed[labels].all()
    if truth_labels.shape[1]:
        assert recall_at_k(labels, truth_labels, truth_labels.shape[1]) >= 0.99


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "norm_augmented"])
def test_correlated_filter_far_from_the_queries(augmented):
    """Allowed: the 5 % of a clustered catalogue least aligned with the queries' region, so graph search must
    leave it. The default policy scores these 150 items exactly. Forced graph search finds them over the
    norm-augmented index; over the plain inner-product index it cannot (recall@10 0.90 at ef 200 and at ef 1000:
    no beam helps): 50 of 300 sampled items there have no path from the entry point on layer 0 (an inner-product
    graph links to long vectors, short ones get few in-links), which unfiltered search rarely notices because such
    items are rarely anyone's top-k. Hence exact scoring for narrow filters."""
    vectors = clustered_vectors(3030, 16, seed=5)
    item_vectors = np.vstack([np.zeros((1, 16), np.float32), vectors[:3000]])
    queries = vectors[3000:]
    allowed = np.zeros(3001, bool)
    side = item_vectors[1:] @ queries.mean(axis=0)
    allowed[1:] = side < np.quantile(side, 0.05)
    index = build_hnsw_index(item_vectors, IndexParams(M=16, ef_construction=200, ef_search=50,
                                                       norm_augmented=augmented))
    truth_labels, _ = oracle(item_vectors, queries, K, allowed)
    labels, _ = filtered_top_k(index, item_vectors, queries, K, allowed, ef=200)
    np.testing.assert_array_equal(labels, truth_labels)
    result = filtered_search(index, item_vectors, queries, K, allowed, ef=200, policy=FORCE_HNSW)
    assert result.plan.strategy == HNSW_FILTER
    assert allowed[result.labels].all()
    assert recall_at_k(result.labels, truth_labels, K) >= (0.99 if augmented else 0.5)


def test_ties_go_to_the_lower_label_on_both_paths():
    item_vectors = np.zeros((41, 4), np.float32)
    item_vectors[1:] = np.repeat(np.eye(4, dtype=np.float32), 10, axis=0)  # 10 copies of each unit vector
    queries = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    allowed = np.ones(41, bool)
    allowed[0] = False
    allowed[[2, 5, 13]] = False
    truth_labels, _ = oracle(item_vectors, queries, 12, allowed)
    labels, _ = exact_top_k_allowed(item_vectors, queries, 12, allowed)
    np.testing.assert_array_equal(labels, truth_labels)
    assert labels[0].tolist() == [1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 14, 15]


def test_exact_path_in_chunks_equals_one_product():
    item_vectors, queries = catalogue(seed=3, dim=8)
    allowed = mask("0.5", NUM_ITEMS, seed=3)
    whole = exact_top_k_allowed(item_vectors, queries, K, allowed)
    chunked = exact_top_k_allowed(item_vectors, queries, K, allowed, chunk_bytes=4 * int(allowed.sum()) * 7)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_policy_thresholds_and_beam():
    policy = FilterPolicy(exact_max_items=1000, exact_max_fraction=0.02, beam_factor=2.0, max_ef=3000)

    def plan(num_allowed, k=10, augmented=True, chosen=policy):
        return plan_search(num_allowed, 100_000, k, 200, chosen, augmented)

    assert plan(0).strategy == EMPTY
    assert plan(100_000).strategy == HNSW and plan(100_000, augmented=False).strategy == HNSW
    assert plan(1000).strategy == EXACT  # count threshold
    assert plan(1500).strategy == EXACT  # 1.5 % <= 2 %
    wide = plan(50_000)
    assert (wide.strategy, wide.ef, wide.k) == (HNSW_FILTER, 200, 10)  # 2 * 10 / 0.5 = 40 < ef
    assert plan(50_000, augmented=False).strategy == EXACT  # plain inner-product index: never filtered HNSW
    from dataclasses import replace
    assert plan(50_000, augmented=False, chosen=replace(policy, graph_filter_plain_index=True)).strategy == HNSW_FILTER
    assert plan(5_000, k=100).ef == 3000  # 2 * 100 / 0.05 = 4000, capped
    assert plan(2_500).ef == 800  # 2 * 10 / 0.025
    assert plan(5, chosen=FORCE_HNSW).k == 5
    defaults = FilterPolicy()
    assert plan(50_000, chosen=defaults).strategy == EXACT  # 50k <= 64k
    assert plan_search(500_000, 1_000_000, 10, 200, defaults, True).ef == 1600  # 80 * 10 / 0.5
    assert plan_search(200_000, 1_000_000, 10, 200, defaults, True).strategy == EXACT  # 20 % <= 25 %
    with pytest.raises(ValueError, match="exact_max_fraction"):
        FilterPolicy(exact_max_fraction=1.5)
    with pytest.raises(ValueError, match="k: must be >= 1"):
        plan(10, k=0)


def test_wide_filters_score_in_place_and_equal_the_oracle():
    item_vectors, queries = catalogue(seed=8, dim=8)
    for fraction in ("0.5", "0.9"):
        allowed = mask(fraction, NUM_ITEMS, seed=8)
        for chunk_bytes in (FilterPolicy.exact_chunk_bytes, 4 * (NUM_ITEMS + 1) * 3):
            labels, scores = exact_top_k_allowed(item_vectors, queries, 50, allowed, chunk_bytes=chunk_bytes)
            truth_labels, truth_scores = oracle(item_vectors, queries, 50, allowed)
            np.testing.assert_array_equal(labels, truth_labels)
            np.testing.assert_allclose(scores, truth_scores, rtol=0, atol=1e-5)


def test_bad_inputs_are_refused(indexed):
    index, item_vectors, queries = indexed
    allowed = mask("0.5", NUM_ITEMS, seed=1)
    pad = allowed.copy()
    pad[0] = True
    with pytest.raises(ValueError, match="PAD"):
        filtered_top_k(index, item_vectors, queries, K, pad, ef=50)
    with pytest.raises(ValueError, match="allowed: expected"):
        filtered_top_k(index, item_vectors, queries, K, allowed[:-1], ef=50)
    with pytest.raises(ValueError, match="allowed: expected"):
        filtered_top_k(index, item_vectors, queries, K, allowed.astype(np.int8), ef=50)
    with pytest.raises(ValueError, match="queries: expected"):
        filtered_top_k(index, item_vectors, queries[:, :-1], K, allowed, ef=50)


def test_no_queries_and_the_beam_is_restored(indexed):
    index, item_vectors, queries = indexed
    before = index.index.ef
    labels, scores = filtered_top_k(index, item_vectors, queries[:0], K, mask("0.5", NUM_ITEMS, 1), ef=333,
                                    policy=FORCE_HNSW)
    assert labels.shape == scores.shape == (0, K)
    filtered_top_k(index, item_vectors, queries, K, mask("0.5", NUM_ITEMS, 1), ef=333, policy=FORCE_HNSW)
    assert index.index.ef == before


def test_concurrent_calls_agree_with_sequential_ones(indexed):
    index, item_vectors, queries = indexed
    masks = [mask(case, NUM_ITEMS, seed=4) for case in ("0.5", "all", "0.05")]
    expected = [filtered_top_k(index, item_vectors, queries, K, m, ef=WIDE_EF, policy=FORCE_HNSW)[0] for m in masks]
    found: dict[int, np.ndarray] = {}

    def work(n: int) -> None:
        found[n] = filtered_top_k(index, item_vectors, queries, K, masks[n % 3], ef=WIDE_EF, policy=FORCE_HNSW)[0]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(6):
        np.testing.assert_array_equal(found[n], expected[n % 3])


# ---- seqrank bench filtered ----------------------------------------------------------------------------------

def test_mixture_clusters_are_the_generators_clusters():
    from seqrank.serving.bench.filtered import mixture_clusters

    vectors = clustered_vectors(5000, 16, seed=4)
    clusters = mixture_clusters(5000, seed=4)
    assert clusters.shape == (5000,) and clusters.max() < 5
    for cluster in np.unique(clusters):  # members = centre + sigma N(0, I), sigma in [0.5, 1]
        members = vectors[clusters == cluster]
        assert 0.45 < (members - members.mean(axis=0)).std() < 1.05
    assert (vectors - vectors.mean(axis=0)).std() > 1.1  # the centres spread the whole catalogue further


def test_masks_hit_their_selectivity_and_never_allow_pad():
    from seqrank.serving.bench.filtered import cluster_mask, mixture_clusters, random_mask

    clusters = mixture_clusters(100_000, seed=0)
    for fraction in (0.5, 0.05, 0.005):
        for allowed in (random_mask(100_000, fraction, seed=1), cluster_mask(clusters, fraction, seed=1)):
            assert allowed.shape == (100_001,) and not allowed[0]
            assert 0.7 * fraction <= allowed.mean() <= 1.3 * fraction
        chosen = np.unique(clusters[cluster_mask(clusters, fraction, seed=1)[1:]])
        assert np.isin(clusters, chosen).sum() == cluster_mask(clusters, fraction, seed=1).sum()  # whole clusters


def test_tiny_filtered_bench_reports_every_mask(tmp_path):
    from seqrank.serving.bench.filtered import Row, bench_filtered, format_table, write_report

    out = tmp_path / "filtered.json"
    report = bench_filtered(num_items=3000, dim=16, num_queries=20, k=10, ef=100, M=8, ef_construction=100,
                            build_threads=1, selectivities=[0.5, 0.05], mask_kinds=["random", "cluster"],
                            index_kinds=["plain", "aug"], policy=FilterPolicy(exact_max_items=1000), compare=True,
                            repeats=1, seed=0, on_report=lambda partial: write_report(out, partial))
    rows = [Row(**row) for row in report["rows"]]
    assert [(r.index, r.mask, r.target) for r in rows] == [
        (kind, mask_kind, target) for kind in ("plain", "aug")
        for mask_kind, target in [("all", 1.0)] + [(m, s) for m in ("random", "cluster") for s in (0.5, 0.05)]]
    by = {(r.index, r.mask, r.target): r for r in rows}
    assert by[("plain", "random", 0.5)].chosen == EXACT  # plain index: exact for any partial filter
    assert by[("aug", "random", 0.5)].chosen == HNSW_FILTER and by[("aug", "random", 0.05)].chosen == EXACT
    assert all(r.recall_at_10 >= 0.99 for r in rows if r.chosen == EXACT)
    assert all(r.exact_ms is not None and r.hnsw_ms is not None for r in rows if r.mask != "all")
    assert len(report["target"]) == 2 and "| plain | random |" in format_table(rows)
    assert json.loads(out.read_text())["target"] == report["target"]
