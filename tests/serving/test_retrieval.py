"""Exclusion filtering and over-fetch: exclusions never cost the caller items, order is kept."""

import numpy as np
import pytest

from seqrank.serving.retrieval import fetch_size, filter_candidates, ip_scores


def test_filter_keeps_order_and_drops_excluded():
    labels = np.array([7, 3, 9, 1, 4])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    candidates = filter_candidates(labels, scores, {3, 1, 42}, k=2)
    np.testing.assert_array_equal(candidates.item_indices, [7, 9])
    np.testing.assert_array_equal(candidates.scores, [0.9, 0.7])


def test_excluded_as_set_or_array_give_the_same_result():
    labels = np.arange(1, 21)[::-1]
    scores = np.linspace(1, 0, 20)
    from_set = filter_candidates(labels, scores, {20, 5, 17}, k=10)
    from_array = filter_candidates(labels, scores, np.array([20, 5, 17], dtype=np.int32), k=10)
    np.testing.assert_array_equal(from_set.item_indices, from_array.item_indices)
    np.testing.assert_array_equal(filter_candidates(labels, scores, set(), k=3).item_indices, [20, 19, 18])


def test_fewer_than_k_only_when_the_input_runs_out():
    candidates = filter_candidates(np.array([1, 2, 3]), np.array([3.0, 2.0, 1.0]), {2}, k=5)
    np.testing.assert_array_equal(candidates.item_indices, [1, 3])


@pytest.mark.parametrize("seed", range(20))
def test_fetch_size_always_leaves_k_after_exclusions(seed):
    rng = np.random.default_rng(seed)
    num_items = int(rng.integers(20, 300))
    k = int(rng.integers(1, 20))
    num_excluded = int(rng.integers(0, num_items - k))
    excluded = set(rng.choice(np.arange(1, num_items + 1), size=num_excluded, replace=False).tolist())
    fetched = fetch_size(k, len(excluded), num_items)
    # Worst case for an approximate index: it returns the excluded items first.
    worst_first = np.array(sorted(excluded) + [i for i in range(1, num_items + 1) if i not in excluded])[:fetched]
    candidates = filter_candidates(worst_first, np.zeros(fetched), excluded, k)
    assert len(candidates.item_indices) == k


def test_fetch_size_is_capped_by_the_catalogue():
    assert fetch_size(10, 5, 1_000) == 15
    assert fetch_size(10, 5, 12) == 12


@pytest.mark.parametrize(
    "args, message",
    [((0, 0, 10), "k: must be >= 1, got 0"), ((1, -1, 10), "num_excluded: must be >= 0"),
     ((1, 0, 0), "num_items: must be >= 1")],
)
def test_fetch_size_rejects_impossible_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        fetch_size(*args)


def test_ip_scores_undo_hnswlib_distance():
    np.testing.assert_allclose(ip_scores(np.array([0.0, 1.0, 1.5], dtype=np.float32)), [1.0, 0.0, -0.5])


# The retrieval stage's pure parts: the cold-start list and the exclusion set under one catalogue.

from seqrank.serving.catalogue import Catalogue  # noqa: E402
from seqrank.serving.retrieval import LoadedIndex, excluded_indices, popular_candidates  # noqa: E402
from seqrank.training.artifact import load_artifact  # noqa: E402
from seqrank.training.export import exact_top_k  # noqa: E402
from tests.serving.artifacts import write_small_artifact  # noqa: E402


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    return load_artifact(write_small_artifact(tmp_path_factory.mktemp("artifact") / "v1"))


def test_popular_candidates_skip_exclusions_and_still_return_k(small_artifact):
    catalogue = Catalogue.from_artifact(small_artifact)
    popular = popular_candidates(catalogue, np.array([1, 2, 5]), k=4)
    np.testing.assert_array_equal(popular.item_indices, [3, 4, 6, 7])
    np.testing.assert_array_equal(popular.scores, [10.0, 9.0, 7.0, 6.0])
    assert len(popular_candidates(catalogue, np.arange(1, 11), k=5).item_indices) == 2  # only 2 items remain


def test_excluded_indices_union_known_ids_and_seen_items(small_artifact):
    catalogue = Catalogue.from_artifact(small_artifact)
    excluded = excluded_indices(catalogue, ("sku-3", "unknown", "sku-3"), seen=np.array([7, 3, 1]))
    np.testing.assert_array_equal(excluded, [1, 3, 7])
    np.testing.assert_array_equal(excluded_indices(catalogue, ("sku-2",), seen=None), [2])


def test_loaded_index_answers_like_exact_search(small_artifact):
    loaded = LoadedIndex.from_artifact(small_artifact, ef=None)
    user_vectors = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    labels, distances = loaded.index.knn_query(user_vectors, k=6)
    np.testing.assert_array_equal(labels, exact_top_k(user_vectors, loaded.item_vectors, 6))
    expected = np.take_along_axis(user_vectors @ loaded.item_vectors.T, labels.astype(np.int64), 1)
    np.testing.assert_allclose(ip_scores(distances), expected, rtol=1e-5, atol=1e-5)
    assert loaded.model_version == "small-v1"


# The item-to-item transition prior in retrieval: the same scores offline evaluation ranks by.

from seqrank.serving.catalogue import History  # noqa: E402
from seqrank.serving.config import RetrievalArgs  # noqa: E402
from seqrank.serving.messages import EncodedUser, RetrievalRequest  # noqa: E402
from seqrank.serving.retrieval import RetrievalStage, add_transition_prior  # noqa: E402
from seqrank.training.transitions import TransitionPrior  # noqa: E402
from tests.serving.stubs import StubMetrics  # noqa: E402


def small_prior(weight: float) -> TransitionPrior:
    """Over the 12 items: 5 -> 9 (20 times), 5 -> 2 (3 times), 5 -> 11 (once), 7 -> 5 (4 times); nothing else."""
    rows = {5: [(9, 20.0), (2, 3.0), (11, 1.0)], 7: [(5, 4.0)]}
    indptr = np.concatenate([[0], np.cumsum([len(rows.get(i, [])) for i in range(13)])]).astype(np.int64)
    pairs = [pair for i in range(13) for pair in rows.get(i, [])]
    return TransitionPrior(indptr, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.float32), weight)


def test_prior_adds_the_newest_items_successors_and_rescores_every_candidate():
    vectors = np.random.default_rng(0).normal(size=(13, 4)).astype(np.float32)
    user = np.ones(4, dtype=np.float32)
    labels = np.array([1, 2, 3])
    scores = vectors[labels] @ user.astype(np.float64)
    prior = small_prior(0.5)
    out_labels, out_scores = add_transition_prior(labels, scores, user, 5, prior, vectors, extra=2)
    # 9 (not returned by the index) joins with its exact inner product; 11 is beyond the 2 extra successors
    assert sorted(out_labels) == [1, 2, 3, 9]
    expected = {i: float(vectors[i] @ user) for i in (1, 2, 3, 9)}
    expected[9] += 0.5 * np.log1p(20.0)
    expected[2] += 0.5 * np.log1p(3.0)
    assert list(out_labels) == sorted(expected, key=expected.get, reverse=True)
    np.testing.assert_allclose(out_scores, [expected[i] for i in out_labels], rtol=1e-6)


def test_stage_with_a_prior_ranks_by_inner_product_plus_prior_after_the_newest_known_item(tmp_path):
    artifact = load_artifact(write_small_artifact(tmp_path / "v1", transitions=small_prior(1.0)))
    stage = RetrievalStage(RetrievalArgs(), StubMetrics())
    stage.models.reload({"artifact_path": str(artifact.path)})
    user = np.random.default_rng(1).normal(size=4).astype(np.float32)
    # newest known item: sku-5 ("unknown" is newer but not in the catalogue)
    history = History(item_ids=("sku-7", "sku-5", "unknown"), behaviors=("pv", "pv", "pv"))
    request = RetrievalRequest(user=EncodedUser(user, "small-v1"), history=history, exclude_item_ids=("sku-2",),
                               exclude_seen=True, num_candidates=6, k=6, diversity=0.0)
    (candidates,) = stage.retrieve([request])
    scores = artifact.item_vectors.astype(np.float64) @ user + small_prior(1.0).dense_rows(np.array([5]))[0]
    scores[[0, 2, 5, 7]] = -np.inf  # padding, excluded, seen
    expected = np.argsort(-scores, kind="stable")[:6]
    assert list(candidates.item_ids) == [f"sku-{i}" for i in expected]
    np.testing.assert_allclose(candidates.relevance, scores[expected], rtol=1e-5, atol=1e-6)  # float32 scores


# Every excluded id counts, wherever it stands in the request's list (not only the first one).


def test_excluded_indices_hold_every_known_id_of_the_list(small_artifact):
    """Five distinct ids after an unknown one: all five are excluded, the unknown ones dropped."""
    catalogue = Catalogue.from_artifact(small_artifact)
    ids = ("unknown", "sku-12", "sku-3", "gone", "sku-7", "sku-1", "sku-9")
    np.testing.assert_array_equal(excluded_indices(catalogue, ids, seen=None), [1, 3, 7, 9, 12])
    np.testing.assert_array_equal(excluded_indices(catalogue, ids, seen=np.array([2])), [1, 2, 3, 7, 9, 12])


@pytest.mark.parametrize("seed", range(8))
def test_the_stage_honours_every_excluded_id_not_only_the_first(small_artifact, seed):
    """Exact search is the oracle: the candidates are the best items by inner product minus ALL the excluded ids.
    The list opens with an unknown id and the lowest-scoring item, so a stage that honoured only the first entry
    would leak the best items, which stand second and later (shuffled, with another unknown id among them)."""
    stage = RetrievalStage(RetrievalArgs(), StubMetrics())
    stage.models.reload({"artifact_path": str(small_artifact.path)})
    rng = np.random.default_rng(seed)
    user = rng.normal(size=4).astype(np.float32)
    scores = small_artifact.item_vectors[1:].astype(np.float64) @ user
    best_first = [int(i) + 1 for i in np.argsort(-scores, kind="stable")]
    excluded = [int(i) for i in rng.choice(best_first[:6], size=int(rng.integers(2, 6)), replace=False)]
    later = [f"sku-{i}" for i in excluded] + ["not-in-the-model"]
    rng.shuffle(later)
    exclude_ids = ("unknown", f"sku-{best_first[-1]}", *later)
    request = RetrievalRequest(user=EncodedUser(user, "small-v1"), history=History((), ()),
                               exclude_item_ids=exclude_ids, exclude_seen=True, num_candidates=5, k=5, diversity=0.0)
    (candidates,) = stage.retrieve([request])
    expected = [i for i in best_first if i not in excluded and i != best_first[-1]][:5]
    assert list(candidates.item_ids) == [f"sku-{i}" for i in expected]
