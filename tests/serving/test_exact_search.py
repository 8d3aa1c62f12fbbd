"""Exact search in retrieval (`retrieval.search`): the best items by inner product (plus the transition prior's
term after the newest item), whatever the request excludes, filters or hides, and when `auto` chooses it.

Every expectation is a brute-force ranking written here: float64 scores of every item, disallowed items dropped,
then sorted by score descending and item index ascending (the tie rule).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest

from seqrank.serving import retrieval
from seqrank.serving.catalogue import History
from seqrank.serving.config import AppArgs, RetrievalArgs
from seqrank.serving.live_catalogue import LiveItemsSync
from seqrank.serving.messages import EncodedUser, RetrievalRequest
from seqrank.serving.retrieval import (
    EXACT_SEARCH_MAX_ITEMS,
    RetrievalStage,
    exact_top_k,
    use_exact_search,
)
from seqrank.serving.shards import RemoteShards, ShardIndex
from seqrank.training.artifact import IndexParams, load_artifact, write_artifact
from seqrank.training.transitions import TransitionPrior
from tests.serving.stubs import StubMetrics
from tests.serving.test_retrieval_live import State, Store

NUM_ITEMS = 400
DIM = 8


def oracle(vectors: np.ndarray, query: np.ndarray, allowed: set[int], boost: dict[int, float] | None = None,
           count: int | None = None) -> list[int]:
    """Item indices in `allowed` by float64 score (inner product + boost), best first, ties to the lower index."""
    boost = boost or {}
    scores = {i: float(vectors[i].astype(np.float64) @ query.astype(np.float64)) + boost.get(i, 0.0) for i in allowed}
    return sorted(scores, key=lambda i: (-scores[i], i))[:count]


def random_prior(num_items: int, seed: int, weight: float = 0.7) -> TransitionPrior:
    """Each item followed by 0-30 random successors with random counts, most frequent first."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_items + 1):
        successors = rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(0, 31)), replace=False)
        counts = rng.integers(1, 60, size=len(successors)).astype(np.float32)
        order = np.argsort(-counts, kind="stable")
        rows.append((successors[order], counts[order]))
    rows[0] = (np.zeros(0, np.int64), np.zeros(0, np.float32))  # PAD is no one's predecessor
    indptr = np.concatenate([[0], np.cumsum([len(s) for s, _ in rows])])  # (I + 2,)
    return TransitionPrior(indptr.astype(np.int64), np.concatenate([s for s, _ in rows]).astype(np.int64),
                           np.concatenate([c for _, c in rows]), weight)


def prior_terms(prior: TransitionPrior, newest: int) -> dict[int, float]:
    items, terms = prior.successors_of(newest)
    return dict(zip(items.tolist(), terms.tolist()))


# ---- exact_top_k against the oracle ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fetch", [1, 10, 57, NUM_ITEMS - 1, NUM_ITEMS, NUM_ITEMS + 50])
def test_exact_top_k_is_the_brute_force_top_k(seed, fetch):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(NUM_ITEMS + 1, DIM)).astype(np.float32)
    vectors[0] = 0.0
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    labels, scores = exact_top_k(vectors, queries, fetch, NUM_ITEMS)
    assert labels.shape == (5, min(fetch, NUM_ITEMS))
    for row, query in enumerate(queries):
        expected = oracle(vectors, query, set(range(1, NUM_ITEMS + 1)), count=fetch)
        assert labels[row].tolist() == expected
        assert exact_top_k(vectors, query[None, :], fetch, NUM_ITEMS)[0][0].tolist() == expected  # one query
        np.testing.assert_allclose(scores[row], vectors[expected].astype(np.float64) @ query.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_exact_top_k_breaks_ties_to_the_lower_index_even_at_the_cut(seed):
    """Small integer vectors: many exactly equal scores, in float32 and float64 alike, also across the k-th place."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, size=(NUM_ITEMS + 1, 3)).astype(np.float32)
    vectors[0] = 0.0
    queries = rng.integers(-2, 3, size=(4, 3)).astype(np.float32)
    for fetch in (1, 7, 40, 200):
        labels, _ = exact_top_k(vectors, queries, fetch, NUM_ITEMS)
        for row, query in enumerate(queries):
            expected = oracle(vectors, query, set(range(1, NUM_ITEMS + 1)), count=fetch)
            assert labels[row].tolist() == expected
            assert exact_top_k(vectors, query[None, :], fetch, NUM_ITEMS)[0][0].tolist() == expected  # one query


@pytest.mark.parametrize("seed", range(6))
def test_exact_top_k_honours_the_mask_and_chooses_by_the_prior_but_returns_inner_products(seed):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(NUM_ITEMS + 1, DIM)).astype(np.float32)
    vectors[0] = 0.0
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    allowed = rng.random(NUM_ITEMS + 1) < 0.3
    allowed[0] = False
    prior = random_prior(NUM_ITEMS, seed, weight=2.0)
    newest = [int(rng.integers(1, NUM_ITEMS + 1)) for _ in queries]
    priors = [prior.successors_of(newest[0]), None, prior.successors_of(newest[2])]
    labels, scores = exact_top_k(vectors, queries, 25, NUM_ITEMS, allowed, priors)
    for row, query in enumerate(queries):
        boost = prior_terms(prior, newest[row]) if priors[row] is not None else {}
        expected = oracle(vectors, query, set(np.flatnonzero(allowed).tolist()), boost, count=25)
        assert labels[row].tolist() == expected
        alone = exact_top_k(vectors, query[None, :], 25, NUM_ITEMS, allowed, [priors[row]])
        assert alone[0][0].tolist() == expected
        np.testing.assert_allclose(alone[1][0], scores[row], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores[row], vectors[expected].astype(np.float64) @ query.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)  # the prior chose and ordered, it is not in the scores
    few = np.zeros(NUM_ITEMS + 1, bool)
    few[[4, 9]] = True
    labels, _ = exact_top_k(vectors, queries, 25, NUM_ITEMS, few)
    assert labels.shape == (3, 2) and {tuple(sorted(row)) for row in labels.tolist()} == {(4, 9)}
    assert exact_top_k(vectors, queries, 25, NUM_ITEMS, np.zeros(NUM_ITEMS + 1, bool))[0].shape == (3, 0)


def test_exact_top_k_scores_only_the_trained_rows():
    """Rows beyond num_items (upserted items, scored elsewhere) are never returned, however good."""
    vectors = np.ones((12, 2), np.float32)
    vectors[0] = 0.0
    vectors[11] = 100.0
    labels, _ = exact_top_k(vectors, np.ones((1, 2), np.float32), 20, 10)
    assert labels[0].tolist() == list(range(1, 11))


# ---- the auto choice and the config ---------------------------------------------------------------------------

def test_auto_is_exact_up_to_the_crossover_and_hnsw_beyond():
    assert use_exact_search("auto", 1)
    assert use_exact_search("auto", EXACT_SEARCH_MAX_ITEMS)
    assert not use_exact_search("auto", EXACT_SEARCH_MAX_ITEMS + 1)
    assert not use_exact_search("auto", 10, sharded=True)  # shards exist because the index is large
    assert use_exact_search("exact", 10 * EXACT_SEARCH_MAX_ITEMS) and use_exact_search("exact", 10, sharded=True)
    assert not use_exact_search("hnsw", 1)
    with pytest.raises(ValueError, match="retrieval.search"):
        use_exact_search("brute", 1)


def test_the_serve_config_field_parses_and_refuses_unknown_values():
    assert RetrievalArgs().search == "auto"
    assert AppArgs.parse({"retrieval": {"search": "hnsw"}}).retrieval.search == "hnsw"
    with pytest.raises(pydantic.ValidationError, match="search"):
        AppArgs.parse({"retrieval": {"search": "brute"}})


def write_artifact_of(out_dir, num_items: int = NUM_ITEMS, seed: int = 0, transitions=None):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(num_items + 1, DIM)).astype(np.float32)
    vectors[0] = 0.0
    weights = out_dir.parent / f"{out_dir.name}-weights.safetensors"
    weights.write_bytes(b"not a real encoder")  # never loaded here
    return load_artifact(write_artifact(
        out_dir, encoder_weights=weights, item_vectors=vectors,
        item_ids=[""] + [f"sku-{i}" for i in range(1, num_items + 1)], item_attributes=None,
        item_popularity=np.concatenate([[0.0], np.arange(num_items, 0, -1)]).astype(np.float32),
        index_params=IndexParams(M=4, ef_construction=8, ef_search=1),  # a poor graph: HNSW is visibly inexact
        manifest_fields={"model_version": "exact-v1", "data_fingerprint": "f" * 64, "metrics": {},
                         "encoder_config": {"num_items": num_items, "max_len": 7}, "behavior_names": ["pv"]},
        transitions=transitions))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_artifact_of(tmp_path_factory.mktemp("exact") / "v1", transitions=random_prior(NUM_ITEMS, 99))


def stage_of(artifact, live=None, shards=None, **args) -> RetrievalStage:
    stage = RetrievalStage(RetrievalArgs(**args), StubMetrics(), live=live, shards=shards)
    stage.models.reload({"artifact_path": str(artifact.path)})
    return stage


def plain_request(user, history=(), exclude=(), num_candidates=30, **fields) -> RetrievalRequest:
    return RetrievalRequest(user=EncodedUser(user, "exact-v1"), history=History(tuple(history), ("pv",) * len(history)),
                            exclude_item_ids=tuple(exclude), exclude_seen=True, num_candidates=num_candidates,
                            k=num_candidates, diversity=0.0, **fields)


def users(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


@pytest.mark.parametrize("margin, exact", [(0, True), (-1, False)])
def test_auto_chooses_by_the_artifacts_size_on_both_sides_of_the_crossover(tmp_path, monkeypatch, margin, exact):
    """The crossover moved to this artifact's size (and one below it): exact at it, the graph above. The graph is
    built poorly (ef 1, M 4), so which path answered shows in the answers too."""
    small = write_artifact_of(tmp_path / "v1", num_items=300, seed=3)
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX_ITEMS", small.num_items + margin)
    stage = stage_of(small)
    assert stage.models.current.exact is exact
    queries = users(40, seed=5)
    requests = [plain_request(user, num_candidates=10) for user in queries]
    found = [list(c.item_ids) for c in stage.retrieve(requests)]
    expected = [[f"sku-{i}" for i in oracle(small.item_vectors, user, set(range(1, 301)), count=10)]
                for user in queries]
    assert (found == expected) is exact


def test_the_config_overrides_auto_both_ways(tmp_path, monkeypatch):
    small = write_artifact_of(tmp_path / "v1", num_items=300, seed=3)
    assert not stage_of(small, search="hnsw").models.current.exact  # small enough for exact, told hnsw
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX_ITEMS", 10)
    assert stage_of(small).models.current.exact is False
    assert stage_of(small, search="exact").models.current.exact  # too large for auto, told exact


# ---- the retrieval stage with exact search: everything the index path honours --------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_exact_stage_excludes_ids_and_seen_items_and_adds_the_prior_after_the_newest(artifact, seed):
    stage = stage_of(artifact, search="exact", transition_candidates=0)  # the exact path needs no extra successors
    rng = np.random.default_rng(seed)
    queries = users(6, seed)
    requests, expected = [], []
    for user in queries:
        history = rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(1, 20)), replace=False)
        best = oracle(artifact.item_vectors, user, set(range(1, NUM_ITEMS + 1)), count=40)
        excluded = rng.choice(best, size=8, replace=False)  # the very items the search would return
        requests.append(plain_request(user, [f"sku-{i}" for i in history], ["unknown", *(f"sku-{i}" for i in excluded)]))
        allowed = set(range(1, NUM_ITEMS + 1)) - set(history.tolist()) - set(excluded.tolist())
        expected.append(oracle(artifact.item_vectors, user, allowed, prior_terms(artifact.transitions,
                                                                                 int(history[-1])), count=30))
    for candidates, want in zip(stage.retrieve(requests), expected):
        assert list(candidates.item_ids) == [f"sku-{i}" for i in want]


def test_exact_stage_relevance_is_inner_product_plus_prior(artifact):
    stage = stage_of(artifact, search="exact")
    user = users(1, seed=11)[0]
    newest = max(range(1, NUM_ITEMS + 1), key=lambda i: len(artifact.transitions.successors_of(i)[0]))
    (candidates,) = stage.retrieve([plain_request(user, [f"sku-{newest}"])])
    boost = prior_terms(artifact.transitions, newest)
    indices = [artifact.item_index_of[raw] for raw in candidates.item_ids]
    assert indices == oracle(artifact.item_vectors, user, set(range(1, NUM_ITEMS + 1)) - {newest}, boost, count=30)
    np.testing.assert_allclose(candidates.relevance, [float(artifact.item_vectors[i].astype(np.float64)
                                                            @ user.astype(np.float64)) + boost.get(i, 0.0)
                                                      for i in indices], rtol=1e-5, atol=1e-5)


def test_exact_stage_honours_hidden_items_upserts_filters_and_caller_candidates(artifact):
    store = Store()
    stage = stage_of(artifact, live=LiveItemsSync(store.items_since, 3600, "test"), search="exact")
    user = users(1, seed=21)[0]
    best = oracle(artifact.item_vectors, user, set(range(1, NUM_ITEMS + 1)), count=5)
    hidden = best[:3]
    version = store.write(*(State(f"sku-{i}", None, False) for i in hidden),
                          State("new-1", ("promo",), True), State(f"sku-{best[4]}", ("promo",), True))
    everything = set(range(1, NUM_ITEMS + 1))
    average = artifact.item_vectors[1:].mean(axis=0)  # an upserted item without an attribute model
    vectors = np.vstack([artifact.item_vectors, average[None, :]])  # new-1 is index NUM_ITEMS + 1

    def ids(indices):
        return [f"sku-{i}" if i <= NUM_ITEMS else "new-1" for i in indices]

    (plain,) = stage.retrieve([plain_request(user, catalogue_version=version)])
    assert list(plain.item_ids) == ids(oracle(vectors, user, everything - set(hidden) | {NUM_ITEMS + 1}, count=30))
    (promo,) = stage.retrieve([plain_request(user, catalogue_version=version, include_any=("promo",))])
    assert list(promo.item_ids) == ids(oracle(vectors, user, {best[4], NUM_ITEMS + 1}))
    (no_promo,) = stage.retrieve([plain_request(user, catalogue_version=version, exclude_any=("promo",),
                                                exclude=[f"sku-{best[3]}"])])
    assert list(no_promo.item_ids) == ids(oracle(vectors, user, everything - set(hidden) - {best[3], best[4]},
                                                 count=30))
    given = [f"sku-{best[0]}", f"sku-{best[3]}", "new-1", "sku-7", "unknown"]
    (chosen,) = stage.retrieve([plain_request(user, catalogue_version=version, candidate_item_ids=tuple(given))])
    assert list(chosen.item_ids) == ids(oracle(vectors, user, {best[3], NUM_ITEMS + 1, 7}))


def test_exact_stage_with_many_hidden_items_searches_the_allowed_ones(artifact, monkeypatch):
    """Past MAX_HIDDEN_AS_EXCLUSIONS hidden items the stage filters instead of over-fetching: still exact."""
    monkeypatch.setattr(retrieval, "MAX_HIDDEN_AS_EXCLUSIONS", 5)
    store = Store()
    stage = stage_of(artifact, live=LiveItemsSync(store.items_since, 3600, "test"), search="exact")
    user = users(1, seed=31)[0]
    hidden = oracle(artifact.item_vectors, user, set(range(1, NUM_ITEMS + 1)), count=60)[::2]  # every other best
    version = store.write(*(State(f"sku-{i}", None, False) for i in hidden))
    (candidates,) = stage.retrieve([plain_request(user, ["sku-3"], catalogue_version=version)])
    boost = prior_terms(artifact.transitions, 3)
    allowed = set(range(1, NUM_ITEMS + 1)) - set(hidden) - {3}
    assert list(candidates.item_ids) == [f"sku-{i}" for i in oracle(artifact.item_vectors, user, allowed, boost,
                                                                    count=30)]


def shard_handle(shard: ShardIndex, calls: list):
    """Stands in for a RetrievalShard DeploymentHandle: `search.remote(...)` is awaitable."""
    async def remote(model_version, vectors, k):
        calls.append(model_version)
        return shard.search(vectors, k)
    return SimpleNamespace(search=SimpleNamespace(remote=remote))


@pytest.mark.parametrize("search, shards_asked", [("exact", False), ("auto", True)])
def test_sharded_stage_answers_exactly_from_its_own_vectors_when_told_exact(artifact, search, shards_asked):
    calls: list[str] = []
    shards = RemoteShards(tuple(shard_handle(ShardIndex.build(artifact, 2, s, 512), calls) for s in range(2)))
    stage = stage_of(artifact, shards=shards, search=search, transition_candidates=NUM_ITEMS)
    queries = users(4, seed=41)
    requests = [plain_request(user, ["sku-5"], ["sku-9"]) for user in queries]
    searches = [stage.prepare(request) for request in requests]
    results = asyncio.run(stage.search_async(searches))
    boost = prior_terms(artifact.transitions, 5)
    for search_, (labels, scores), user in zip(searches, results, queries):
        candidates = stage.candidates(search_, labels, scores)
        allowed = set(range(1, NUM_ITEMS + 1)) - {5, 9}
        assert list(candidates.item_ids) == [f"sku-{i}" for i in oracle(artifact.item_vectors, user, allowed, boost,
                                                                        count=30)]
    assert bool(calls) is shards_asked


def test_the_benchmark_measures_both_paths_on_the_same_vectors():
    """`seqrank bench exact` at a toy size: a row per catalogue, recall against exact search, the auto choice."""
    from seqrank.serving.bench.exact_vs_hnsw import Row, bench_exact, format_rows

    report = bench_exact(sizes=[300], dim=8, num_queries=30, k=50, batch=8, M=8, ef_construction=50, ef=50,
                         build_threads=1, repeats=1, seed=0)
    (row,) = [Row(**r) for r in report["rows"]]
    assert (row.num_items, row.dim, row.batch, row.auto) == (300, 8, 8, "exact")
    assert 0.5 <= row.hnsw_recall_at_100 <= 1.0
    assert min(row.exact_ms_single, row.hnsw_ms_single, row.exact_ms_batched, row.hnsw_ms_batched) > 0
    assert "| generated | 300 | 8 |" in format_rows([row])
