"""seqrank bench ann / mmr: recall and exact search on hand-made cases, the norm augmentation keeps the
ranking, and a tiny sweep end to end (the exact row is the truth, HNSW finds it, files are written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqrank.serving.bench.ann import bench_ann, clustered_vectors, exact_top_k, recall_at_k, split_queries
from seqrank.serving.bench.mmr import bench_mmr
from seqrank.training.artifact import augment_items, augment_queries


def test_recall_counts_shared_labels_whatever_their_order():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [8, 0, 0, 0]])
    assert recall_at_k(found, truth, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert recall_at_k(found, truth, 2) == pytest.approx((0 / 2 + 0 / 2) / 2)  # 4, 3 are not in truth's top 2
    assert recall_at_k(truth, truth, 4) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        recall_at_k(found, truth, 5)


def test_exact_search_ranks_by_inner_product_not_distance():
    items = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], dtype=np.float32)
    labels, scores = exact_top_k(items, np.array([[1.0, 0.1], [-1.0, -0.1]], dtype=np.float32), k=3)
    assert labels.tolist() == [[1, 0, 2], [3, 2, 0]]  # nearest in L2 to [1, 0.1] would be item 0, not item 1
    np.testing.assert_allclose(scores, [[3.0, 1.0, 0.2], [1.0, -0.2, -1.0]], rtol=1e-6)


def test_exact_search_in_chunks_equals_one_matrix_product(monkeypatch):
    import seqrank.serving.bench.ann as bench

    rng = np.random.default_rng(0)
    items, queries = rng.standard_normal((500, 8)).astype(np.float32), rng.standard_normal((37, 8)).astype(np.float32)
    monkeypatch.setattr(bench, "EXACT_SCORE_BYTES", 4 * 500 * 5)  # 5 queries per chunk
    labels, _ = exact_top_k(items, queries, 20)
    np.testing.assert_array_equal(labels, np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :20])


def test_norm_augmentation_keeps_the_inner_product_ranking_and_equalises_norms():
    vectors = clustered_vectors(2000, 16, seed=3)
    items, queries = split_queries(vectors, 50, seed=3)
    augmented = augment_items(items)
    np.testing.assert_allclose(np.linalg.norm(augmented, axis=1), np.linalg.norm(items, axis=1).max(), rtol=1e-4)
    raw, _ = exact_top_k(items, queries, 50)
    via_augmented, _ = exact_top_k(augmented, augment_queries(queries), 50)
    assert recall_at_k(via_augmented, raw, 50) == 1.0


def test_generated_catalogue_is_clustered_and_reproducible():
    vectors = clustered_vectors(20_000, 16, seed=0)
    assert vectors.shape == (20_000, 16) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, clustered_vectors(20_000, 16, seed=0))
    # Clustered: neighbours are much closer than in one Gaussian (cosine of the 10th nearest neighbour 0.88 here,
    # 0.73 for 20,000 standard normal vectors in 16 dims).
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = np.sort(unit[:200] @ unit.T, axis=1)[:, -11]
    assert nearest.mean() > 0.82


def test_tiny_sweep_writes_report_and_finds_the_exact_neighbours(tmp_path):
    pytest.importorskip("faiss")
    report = bench_ann(artifact=None, num_items=3000, dim=16, num_queries=40, methods=["hnswlib-aug", "faiss"],
                       ms=[8], ef_construction=100, efs=[100, 400], k=100, build_threads=1, repeats=1, seed=0,
                       out_dir=tmp_path)
    rows = report["rows"]
    assert [(r["method"], r["ef"]) for r in rows] == [("exact", None), ("hnswlib-aug", 100), ("hnswlib-aug", 400),
                                                      ("faiss", 100), ("faiss", 400)]
    assert rows[0]["recall_at_100"] == 1.0
    assert all(r["recall_at_10"] > 0.9 and r["single_qps"] > 0 for r in rows)
    assert rows[2]["recall_at_100"] >= rows[1]["recall_at_100"]  # a wider beam never loses neighbours here
    assert json.loads((tmp_path / "ann.json").read_text())["num_items"] == 3000
    assert (tmp_path / "ann.png").stat().st_size > 10_000


def test_mmr_bench_reports_each_diversity():
    report = bench_mmr(200, 20, 16, [0.0, 0.5], repeats=30)
    assert [r["diversity"] for r in report["rows"]] == [0.0, 0.5]
    for row in report["rows"]:
        for clock in ("wall", "cpu"):
            assert 0 < row[f"{clock}_median_ms"] <= row[f"{clock}_p99_ms"] <= row[f"{clock}_max_ms"]


def test_search_bench_ranks_the_targets_category_three_ways(tiny_artifact, synthetic_dataset):
    """On the synthetic log (strongly sequential) the service's re-ranking of a category beats its given order."""
    from seqrank.serving.bench.search import bench_search

    events, attributes = synthetic_dataset
    report = bench_search(tiny_artifact, events, attributes, diversities=(0.0,), max_users=120)
    rows = {row["ranking"]: row for row in report["rows"]}
    assert set(rows) == {"service re-ranking (diversity 0)", "most popular within the candidates",
                         "the candidates' given order"}
    assert all(0.0 <= row["NDCG@10"] <= row["HR@10"] <= 1.0 for row in rows.values())
    assert rows["service re-ranking (diversity 0)"]["NDCG@10"] > rows["the candidates' given order"]["NDCG@10"]
    assert report["candidates_max"] <= 2000  # the request limit the service enforces


def test_new_items_prepare_drops_every_event_of_the_chosen_items_and_nothing_else(tmp_path):
    import json

    from seqrank.serving.bench.new_items import NEW_ITEMS_FILE, prepare

    log = tmp_path / "log.txt"
    log.write_text("1 10 11 12 13\n2 11 14 15\n3 16 17 10\n4 12 12 18\n")
    summary = prepare(log, tmp_path / "out", fraction=0.3, seed=1)
    chosen = set(json.loads((tmp_path / "out" / NEW_ITEMS_FILE).read_text())["new_items"])
    assert len(chosen) == round(0.3 * 9) == summary["new_items"]
    before = [line.split() for line in log.read_text().splitlines()]
    after = {line.split()[0]: line.split()[1:] for line in (tmp_path / "out" / "log.txt").read_text().splitlines()}
    for user, *items in before:  # order kept, exactly the chosen items gone
        assert after.get(user, []) == [item for item in items if item not in chosen]
    assert summary["events_dropped"] == sum(item in chosen for _, *items in before for item in items)
