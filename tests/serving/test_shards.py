"""Sharded retrieval: membership, merge, memory estimate, and 2 or 3 shards answering exactly like one index
(real hnswlib indexes, through the retrieval stage with exclusions); the shard plan of `seqrank serve`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import hnswlib
import numpy as np
import pytest

from seqrank.serving.catalogue import History
from seqrank.serving.config import AppArgs, RetrievalArgs
from seqrank.serving.messages import EncodedUser, RetrievalRequest
from seqrank.serving.ops.deploy import localize, preflight, read_serve_config
from seqrank.serving.ops.serve_config_check import application, bound_deployments
from seqrank.serving.retrieval import RetrievalStage
from seqrank.serving.shards import (
    RemoteShards,
    ShardedIndex,
    ShardIndex,
    estimate_index_bytes,
    index_file_bytes,
    merge_top_k,
    plan_num_shards,
    shard_items,
)
from seqrank.training.artifact import IndexParams, load_artifact, write_artifact
from seqrank.training.export import exact_top_k
from tests.serving.stubs import StubMetrics
from tests.topology import with_deployment_pools

NUM_ITEMS, DIM = 600, 16


def test_shards_partition_the_catalogue_evenly():
    for num_items, num_shards in [(10, 3), (600, 2), (5, 5), (7, 1)]:
        parts = [shard_items(num_items, num_shards, s) for s in range(num_shards)]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1, num_items + 1))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_items(10, 3, 1).tolist() == [2, 5, 8]
    with pytest.raises(ValueError, match="shard"):
        shard_items(10, 3, 3)


def test_merge_takes_the_best_scores_over_shards_of_different_lengths():
    shard_a = (np.array([[4, 2, 6], [2, 4, 6]]), np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.0]]))
    shard_b = (np.array([[3], [5]]), np.array([[0.6], [0.9]]))  # a one-item shard
    labels, scores = merge_top_k([shard_a, shard_b], k=3)
    assert labels.tolist() == [[4, 3, 2], [5, 2, 4]]
    np.testing.assert_allclose(scores, [[0.9, 0.6, 0.5], [0.9, 0.8, 0.7]])
    labels, _ = merge_top_k([shard_a, shard_b], k=10)  # fewer than k in total: all of them
    assert labels.shape == (2, 4)


def test_index_size_formula_matches_hnswlib():
    vectors = np.random.default_rng(0).standard_normal((3000, DIM)).astype(np.float32)
    for M in (8, 16, 32):
        index = hnswlib.Index(space="ip", dim=DIM)
        index.init_index(max_elements=3000, M=M, ef_construction=40, random_seed=0)
        index.add_items(vectors, num_threads=1)
        assert index_file_bytes(3000, DIM, M) == pytest.approx(index.index_file_size(), rel=0.02)
        assert estimate_index_bytes(3000, DIM, M) > index.index_file_size()


def test_shard_plan_follows_the_memory_budget():
    one = estimate_index_bytes(1_000_000, 64, 32) / 2**20  # about 650 MB
    assert plan_num_shards(1_000_000, 64, 32, None, 1) == 1
    assert plan_num_shards(1_000_000, 64, 32, one * 1.01, 1) == 1
    assert plan_num_shards(1_000_000, 64, 32, one / 2 * 1.01, 1) == 2
    assert plan_num_shards(1_000_000, 64, 32, one / 2.5, 1) == 3
    assert plan_num_shards(1_000_000, 64, 32, one, 4) == 4  # an explicit count is never lowered
    with pytest.raises(ValueError, match="shard_memory_budget_mb"):
        plan_num_shards(1_000_000, 64, 32, 1e-9, 1)


def write_clustered_artifact(out, norm_augmented: bool):
    """600 items in 16 dims from 12 clusters, hnswlib M=16 with a beam wider than the catalogue."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((12, DIM))
    vectors = np.zeros((NUM_ITEMS + 1, DIM), dtype=np.float32)
    vectors[1:] = centres[rng.integers(0, 12, NUM_ITEMS)] + 0.5 * rng.standard_normal((NUM_ITEMS, DIM))
    weights = out / "weights.safetensors"
    weights.write_bytes(b"not a real encoder")
    path = write_artifact(
        out / "artifact", encoder_weights=weights, item_vectors=vectors,
        item_ids=[""] + [f"sku-{i}" for i in range(1, NUM_ITEMS + 1)], item_attributes=None,
        item_popularity=np.arange(NUM_ITEMS + 1, dtype=np.float32),
        index_params=IndexParams(M=16, ef_construction=200, ef_search=NUM_ITEMS, norm_augmented=norm_augmented),
        manifest_fields={"model_version": "shards-v1", "data_fingerprint": "f" * 64, "metrics": {},
                         "encoder_config": {"num_items": NUM_ITEMS, "max_len": 7}, "behavior_names": []},
    )
    return load_artifact(path)


@pytest.fixture(scope="module")
def clustered_artifact(tmp_path_factory):
    return write_clustered_artifact(tmp_path_factory.mktemp("shards"), norm_augmented=False)


@pytest.fixture(scope="module")
def augmented_artifact(tmp_path_factory):
    return write_clustered_artifact(tmp_path_factory.mktemp("shards-augmented"), norm_augmented=True)


def queries(seed: int, count: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


@pytest.mark.parametrize("num_shards", [2, 3])
@pytest.mark.parametrize("artifact_name", ["clustered_artifact", "augmented_artifact"])
def test_shards_answer_exactly_like_one_index(request, artifact_name, num_shards):
    artifact = request.getfixturevalue(artifact_name)
    users = queries(seed=num_shards)
    one_labels, one_distances = ShardedIndex.build(artifact, 1).knn_query(users, k=100)
    labels, distances = ShardedIndex.build(artifact, num_shards).knn_query(users, k=100)
    exact = exact_top_k(users, artifact.item_vectors, 100)
    np.testing.assert_array_equal(one_labels, exact)  # the beam covers the catalogue: exact
    np.testing.assert_array_equal(labels, one_labels)
    np.testing.assert_allclose(distances, one_distances, atol=1e-5)
    np.testing.assert_allclose(1 - distances, np.take_along_axis(users @ artifact.item_vectors.T, labels, 1),
                               rtol=1e-4, atol=1e-4)  # merged scores are inner products, augmented or not


def shard_handle(shard: ShardIndex, seen_versions: list[str]):
    """Stands in for a RetrievalShard DeploymentHandle: `search.remote(...)` is awaitable."""
    async def remote(model_version, vectors, k):
        seen_versions.append(model_version)
        return shard.search(vectors, k)
    return SimpleNamespace(search=SimpleNamespace(remote=remote))


def loaded_stage(artifact, shards=None) -> RetrievalStage:
    stage = RetrievalStage(RetrievalArgs(), StubMetrics(), shards=shards)
    stage.models.reload({"artifact_path": str(artifact.path)})
    return stage


def test_sharded_stage_returns_the_unsharded_candidates_with_exclusions(clustered_artifact):
    versions: list[str] = []
    shards = RemoteShards(tuple(shard_handle(ShardIndex.build(clustered_artifact, 2, s, None), versions)
                                for s in range(2)))
    sharded, unsharded = loaded_stage(clustered_artifact, shards), loaded_stage(clustered_artifact)
    assert sharded.models.current.index is None  # the shards hold the index, not the merging replica
    users = queries(seed=7, count=4)
    top = exact_top_k(users, clustered_artifact.item_vectors, 30)
    requests = [
        RetrievalRequest(
            user=EncodedUser(users[row], "shards-v1"),
            history=History(item_ids=tuple(f"sku-{i}" for i in top[row, :10]), behaviors=("",) * 10),  # seen
            exclude_item_ids=tuple(f"sku-{i}" for i in top[row, 10:20]),
            exclude_seen=True, num_candidates=50, k=10, diversity=0.0,
        )
        for row in range(len(users))
    ]
    searches = [sharded.prepare(request) for request in requests]
    results = asyncio.run(sharded.search_async(searches))
    expected = unsharded.retrieve(requests)
    for row, (search, (labels, scores)) in enumerate(zip(searches, results)):
        candidates = sharded.candidates(search, labels, scores)
        assert len(candidates.item_ids) == 50  # k survive 20 exclusions
        assert set(candidates.item_ids).isdisjoint(f"sku-{i}" for i in top[row, :20])
        assert list(candidates.item_ids) == list(expected[row].item_ids)
        assert list(candidates.item_ids[:10]) == [f"sku-{i}" for i in top[row, 20:30]]
    assert set(versions) == {"shards-v1"} and len(versions) == 2  # one call per shard for the whole batch


def test_serve_raises_num_shards_to_fit_the_budget_and_adds_shard_deployments(clustered_artifact):
    config = with_deployment_pools(read_serve_config())  # sharding needs the Retrieval deployment
    retrieval = application(config)["args"]["retrieval"]
    per_shard_mb = estimate_index_bytes(NUM_ITEMS, DIM, 16) / 2**20
    retrieval["shard_memory_budget_mb"] = per_shard_mb / 2 * 1.05  # half the index fits, not all of it
    planned = localize(config, artifact_path=clustered_artifact.path)
    app = application(planned)
    assert app["args"]["retrieval"]["num_shards"] == 2
    shard_entries = [d for d in app["deployments"] if d["name"].startswith("RetrievalShard")]
    assert [d["name"] for d in shard_entries] == ["RetrievalShard0", "RetrievalShard1"]
    assert {d["user_config"]["artifact_path"] for d in shard_entries} == {str(clustered_artifact.path.resolve())}
    args = preflight(planned)
    assert bound_deployments(args)[-2:] == ("RetrievalShard0", "RetrievalShard1")
    with pytest.raises(ValueError, match="num_shards"):
        AppArgs.parse({"retrieval": {"num_shards": 2, "placement": "ingress"}})
