"""MMR: lambda = 0 is exact top-k, a hand-computed case, diversity rises with lambda; explanations."""

import numpy as np
import pytest

from seqrank.serving.rerank import explanation, mmr, normalise_relevance, supporting_history, unit_rows


def intra_list_diversity(vectors):
    """Mean pairwise cosine distance of a list (the ILD of the offline metrics)."""
    unit = unit_rows(vectors)
    similarity = unit @ unit.T
    n = len(vectors)
    return float((1.0 - similarity)[~np.eye(n, dtype=bool)].mean())


@pytest.mark.parametrize("seed", range(5))
def test_zero_diversity_is_exactly_top_k_by_relevance_with_ties_by_position(seed):
    rng = np.random.default_rng(seed)
    relevance = rng.integers(0, 8, size=200).astype(np.float32)  # many ties
    item_vectors = rng.normal(size=(200, 16)).astype(np.float32)
    selection = mmr(relevance, item_vectors, k=30, diversity=0.0)
    np.testing.assert_array_equal(selection.indices, np.argsort(-relevance, kind="stable")[:30])
    np.testing.assert_allclose(selection.scores, normalise_relevance(relevance)[selection.indices])


def test_zero_diversity_distinguishes_relevances_that_normalise_to_the_same_value():
    low = 0.63696169
    relevance = np.array([low, np.nextafter(low, 1.0), -7.30213286, 41.93255041])
    assert normalise_relevance(relevance)[0] == normalise_relevance(relevance)[1]  # min-max rounding collapses them
    selection = mmr(relevance, np.eye(4), k=4, diversity=0.0)
    np.testing.assert_array_equal(selection.indices, [3, 1, 0, 2])


def test_hand_computed_case():
    # Candidates 0 and 1 are the same direction, 2 is orthogonal. Normalised relevance: [1.0, 0.8, 0.0].
    relevance = np.array([1.0, 0.9, 0.5])
    item_vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # lambda = 0.5: pick 0 (0.5*1.0); then 1 scores 0.5*0.8 - 0.5*1 = -0.1 and 2 scores 0 - 0.5*0 = 0 -> pick 2;
    # then 1 scores 0.4 - 0.5*max(1, 0) = -0.1.
    selection = mmr(relevance, item_vectors, k=3, diversity=0.5)
    np.testing.assert_array_equal(selection.indices, [0, 2, 1])
    np.testing.assert_allclose(selection.scores, [0.5, 0.0, -0.1])
    relevance_only = mmr(relevance, item_vectors, k=3, diversity=0.0)
    np.testing.assert_array_equal(relevance_only.indices, [0, 1, 2])
    np.testing.assert_allclose(relevance_only.scores, [1.0, 0.8, 0.0])


def test_raising_diversity_raises_intra_list_diversity():
    # 4 clusters; the most relevant 12 candidates all sit in cluster 0, so pure relevance returns one cluster.
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8) * 5.0
    cluster = np.repeat(np.arange(4), 15)
    item_vectors = centres[cluster] + rng.normal(scale=0.3, size=(60, 8))
    relevance = np.where(cluster == 0, 10.0, 6.0) + rng.uniform(0, 1, size=60)
    ild = []
    clusters_covered = []
    for diversity in (0.0, 0.3, 0.6, 0.9):
        picked = mmr(relevance, item_vectors, k=8, diversity=diversity).indices
        ild.append(intra_list_diversity(item_vectors[picked]))
        clusters_covered.append(len(set(cluster[picked])))
    assert clusters_covered[0] == 1 and clusters_covered[-1] == 4
    assert ild == sorted(ild) and ild[-1] > ild[0] + 0.3


def test_full_diversity_still_starts_with_the_most_relevant_item():
    relevance = np.array([0.1, 0.7, 0.3])
    assert mmr(relevance, np.eye(3), k=1, diversity=1.0).indices[0] == 1


def test_picks_are_distinct_and_k_long_even_with_identical_vectors():
    selection = mmr(np.ones(6), np.ones((6, 4)), k=6, diversity=0.7)
    assert sorted(selection.indices.tolist()) == list(range(6))


@pytest.mark.parametrize(
    "relevance, vectors, k, diversity, message",
    [
        (np.ones(3), np.ones((3, 2)), 4, 0.5, r"k: must be in \[1, 3\]"),
        (np.ones(3), np.ones((3, 2)), 0, 0.5, r"k: must be in \[1, 3\]"),
        (np.ones(3), np.ones((3, 2)), 2, 1.5, r"diversity: must be in \[0, 1\]"),
        (np.ones(3), np.ones((2, 2)), 1, 0.5, r"relevance must be \(C,\) and item_vectors \(C, D\)"),
        (np.array([1.0, np.nan]), np.ones((2, 2)), 1, 0.5, "relevance: must be finite"),
    ],
)
def test_contract_violations_raise(relevance, vectors, k, diversity, message):
    with pytest.raises(ValueError, match=message):
        mmr(relevance, vectors, k, diversity)


def test_supporting_history_picks_the_most_similar_event_and_prefers_recent_on_ties():
    history = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # oldest first; events 0 and 2 point the same way
    items = np.array([[5.0, 0.1], [0.2, 3.0]])
    np.testing.assert_array_equal(supporting_history(items, history), [2, 1])


def test_explanation_uses_the_behaviour_verb():
    assert explanation("pv", "sku-00042") == "because you viewed sku-00042"
    assert explanation("buy", "sku-1") == "because you bought sku-1"
    assert explanation("", "sku-1") == "because you interacted with sku-1"


# `rerank`: MMR applied to a retrieval CandidateSet, with explanations.

from seqrank.serving.catalogue import History  # noqa: E402
from seqrank.serving.messages import CandidateSet  # noqa: E402
from seqrank.serving.rerank import rerank  # noqa: E402


def candidate_set(num_candidates=6, history_ids=("h-1", "h-2"), seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(num_candidates, 4)).astype(np.float32)
    history_vectors = rng.normal(size=(len(history_ids), 4)).astype(np.float32)
    return CandidateSet(
        model_version="v1",
        item_ids=np.array([f"sku-{i}" for i in range(num_candidates)], dtype=object),
        relevance=np.linspace(2.0, 1.0, num_candidates),
        item_vectors=vectors,
        history=History(item_ids=tuple(history_ids), behaviors=("pv", "buy")[: len(history_ids)]),
        history_vectors=history_vectors,
    )


def test_rerank_at_zero_diversity_keeps_the_relevance_order_with_explanations():
    candidates = candidate_set()
    ranked = rerank(candidates, k=4, diversity=0.0)
    assert [item.item_id for item in ranked.items] == ["sku-0", "sku-1", "sku-2", "sku-3"]
    assert [item.relevance for item in ranked.items] == candidates.relevance[:4].tolist()
    support = supporting_history(candidates.item_vectors[:4], candidates.history_vectors)
    assert [item.because_item_id for item in ranked.items] == [candidates.history.item_ids[s] for s in support]
    for item, s in zip(ranked.items, support):
        assert item.explanation == explanation(candidates.history.behaviors[s], item.because_item_id)
    assert ranked.model_version == "v1" and ranked.rerank_ms >= 0.0


def test_rerank_returns_all_candidates_when_fewer_than_k_and_nothing_for_none():
    assert len(rerank(candidate_set(num_candidates=3), k=10, diversity=0.5).items) == 3
    assert rerank(candidate_set(num_candidates=0), k=10, diversity=0.5).items == ()


def test_rerank_without_history_gives_no_explanation():
    ranked = rerank(candidate_set(history_ids=()), k=2, diversity=0.3)
    assert [(item.because_item_id, item.explanation) for item in ranked.items] == [("", ""), ("", "")]


def reference_mmr(relevance, item_vectors, k, diversity):
    """The plain loop: max similarity recomputed over the whole selected set each step (floored at 0, as mmr's
    docstring states), the picked ones masked; cosines in float32 as in mmr, so near-ties round alike."""
    weighted = (1.0 - diversity) * normalise_relevance(relevance)
    unit = unit_rows(item_vectors).astype(np.float32)
    picked = []
    for _ in range(k):
        # One mat-vec per selected item, as in mmr(): a matrix product would round differently and flip near-ties.
        penalty = np.max([np.zeros(len(relevance))] + [unit @ unit[j] for j in picked], axis=0)
        score = weighted - diversity * penalty
        score[picked] = -np.inf
        tied = np.flatnonzero(score == score.max())
        picked.append(int(tied[np.argmax(relevance[tied])]))
    return np.array(picked)


@pytest.mark.parametrize("diversity", [0.0, 0.1, 0.3, 0.7, 1.0])
def test_optimised_mmr_picks_what_the_plain_loop_picks(diversity):
    # The benchmark's size (1,000 candidates -> 50, dim 64) on clustered vectors, plus quantised relevance (ties).
    rng = np.random.default_rng(int(diversity * 10))
    centres = rng.normal(size=(20, 64))
    item_vectors = (centres[rng.integers(0, 20, 1000)] + 0.5 * rng.normal(size=(1000, 64))).astype(np.float32)
    for relevance in (item_vectors @ rng.normal(size=64), np.round(rng.normal(size=1000), 1)):
        selection = mmr(relevance, item_vectors, k=50, diversity=diversity)
        np.testing.assert_array_equal(selection.indices, reference_mmr(relevance, item_vectors, 50, diversity))
        assert len(set(selection.indices.tolist())) == 50
