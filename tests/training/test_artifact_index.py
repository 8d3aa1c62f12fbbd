"""The artifact's item index: norm augmentation keeps inner-product answers exact where the beam covers the
catalogue, lifts recall where it does not, and manifests from before the option still load as plain indexes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from seqrank.training.artifact import (
    INDEX_FILE,
    MANIFEST_FILE,
    ArtifactError,
    IndexParams,
    augment_items,
    augment_queries,
    build_hnsw_index,
    load_artifact,
    sha256_file,
    write_artifact,
)
from seqrank.training.export import exact_top_k


def clustered(num_items: int, dim: int, seed: int) -> np.ndarray:
    """(num_items + 1, dim) with row 0 the padding: clusters of different spread, so norms differ."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_items // 500, dim))
    cluster = rng.integers(0, len(centres), num_items)
    spread = rng.uniform(0.5, 1.0, len(centres))[cluster, None]
    vectors = centres[cluster] + spread * rng.standard_normal((num_items, dim))
    return np.vstack([np.zeros((1, dim)), vectors]).astype(np.float32)


def recall(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(labels.tolist(), truth.tolist())]))


def test_augmentation_preserves_inner_products():
    items = clustered(1000, 8, seed=0)[1:]
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(augment_queries(queries) @ augment_items(items).T, queries @ items.T, rtol=1e-4,
                               atol=1e-4)
    norms = np.linalg.norm(augment_items(items), axis=1)
    np.testing.assert_allclose(norms, norms.max(), rtol=1e-5)


def test_augmented_index_lifts_recall_at_100_where_the_plain_one_levels_off():
    vectors = clustered(10_000, 16, seed=1)
    queries = np.random.default_rng(2).standard_normal((100, 16)).astype(np.float32) * 2
    truth = exact_top_k(queries, vectors, 100)
    found = {}
    for augmented in (False, True):
        index = build_hnsw_index(vectors, IndexParams(M=8, ef_construction=100, ef_search=400,
                                                      norm_augmented=augmented))
        labels, distances = index.knn_query(queries, k=100)
        found[augmented] = recall(labels, truth)
        # distances stay 1 - <user, item> either way
        rows = np.arange(len(queries))[:, None]
        np.testing.assert_allclose(1 - distances, (queries @ vectors.T)[rows, labels.astype(np.int64)], rtol=1e-4,
                                   atol=1e-3)
    assert found[True] >= 0.95 and found[True] > found[False] + 0.05, found


@pytest.mark.parametrize("augmented", [False, True])
def test_artifact_index_round_trip(tmp_path, augmented):
    vectors = clustered(600, 8, seed=3)
    params = IndexParams(M=16, ef_construction=200, ef_search=600, norm_augmented=augmented)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not a real encoder")
    path = write_artifact(
        tmp_path / "artifact", encoder_weights=weights, item_vectors=vectors,
        item_ids=[""] + [f"i{n}" for n in range(1, 601)], item_attributes=None,
        item_popularity=np.ones(601, dtype=np.float32), index_params=params,
        manifest_fields={"model_version": "v", "data_fingerprint": "f", "metrics": {}, "encoder_config": {},
                         "behavior_names": []},
    )
    if not augmented:  # an artifact written before the option existed: no key in the manifest
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["index"]["norm_augmented"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    artifact = load_artifact(path)
    assert artifact.index_params.norm_augmented is augmented
    queries = np.random.default_rng(4).standard_normal((10, 8)).astype(np.float32)
    labels, _ = artifact.load_index().knn_query(queries, k=50)
    # the saved graph is what every load serves (export builds on all cores, so a rebuild may differ)
    np.testing.assert_array_equal(labels, load_artifact(path).load_index().knn_query(queries, k=50)[0])
    exact = exact_top_k(queries, vectors, 50)
    if augmented:  # the beam covers the catalogue: exact
        np.testing.assert_array_equal(labels, exact)
    else:  # even a beam as wide as the catalogue misses items of the raw inner-product graph here (about 0.7)
        assert recall(labels, exact) < 0.99


def small_artifact(tmp_path, augmented: bool = False):
    """600 clustered items in 8 dims, written like an export; returns (path, vectors, params)."""
    vectors = clustered(600, 8, seed=5)
    params = IndexParams(M=8, ef_construction=50, ef_search=50, norm_augmented=augmented)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not a real encoder")
    path = write_artifact(
        tmp_path / "artifact", encoder_weights=weights, item_vectors=vectors,
        item_ids=[""] + [f"i{n}" for n in range(1, 601)], item_attributes=None,
        item_popularity=np.ones(601, dtype=np.float32), index_params=params,
        manifest_fields={"model_version": "v", "data_fingerprint": "f", "metrics": {}, "encoder_config": {},
                         "behavior_names": []},
    )
    return path, vectors, params


def swap_index(path, index) -> None:
    """Replace the artifact's index by `index` and re-sign the manifest, so only load_index can object."""
    index.save_index(str(path / INDEX_FILE))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][INDEX_FILE] = sha256_file(path / INDEX_FILE)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_an_index_over_fewer_items_than_the_catalogue_is_refused(tmp_path):
    path, vectors, params = small_artifact(tmp_path)
    swap_index(path, build_hnsw_index(vectors, params, items=np.arange(1, 501)))  # another (older, smaller) catalogue
    artifact = load_artifact(path)  # the arrays are consistent; the index is checked when it is loaded
    with pytest.raises(ArtifactError, match=re.escape(f"{INDEX_FILE}: 500 elements, expected num_items = 600")):
        artifact.load_index()


def test_an_index_whose_labels_are_not_the_catalogues_items_is_refused(tmp_path):
    path, vectors, params = small_artifact(tmp_path)
    wider = np.vstack([vectors, vectors[1:2]])  # labels 2..601: as many elements, one label past the catalogue
    swap_index(path, build_hnsw_index(wider, params, items=np.arange(2, 602)))
    with pytest.raises(ArtifactError, match=re.escape(f"{INDEX_FILE}: labels are not the item indices 1..600")):
        load_artifact(path).load_index()


def test_a_plain_index_read_as_norm_augmented_is_refused(tmp_path):
    """hnswlib takes the dimension from the caller: a manifest flipped to `norm_augmented` would read each stored
    vector with one coordinate too many (the bytes after it) and serve distances over misread vectors. (The other
    way round reads the first D coordinates of D + 1, which are the item vectors: exact inner products, nothing
    to refuse.)"""
    path, _, _ = small_artifact(tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["index"]["norm_augmented"] = True
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))  # the manifest is not checksummed
    with pytest.raises(ArtifactError, match=re.escape(f"{INDEX_FILE}: stored vectors differ from")):
        load_artifact(path).load_index()


def test_an_index_over_other_vectors_is_refused(tmp_path):
    path, vectors, params = small_artifact(tmp_path)
    swap_index(path, build_hnsw_index(vectors * 2, params))  # same items and labels, another model's vectors
    with pytest.raises(ArtifactError, match=re.escape(f"{INDEX_FILE}: stored vectors differ from")):
        load_artifact(path).load_index()
