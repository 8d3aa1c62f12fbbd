"""Retrieval through the live catalogue: caller candidates, attribute filters, upserted and hidden items.

Every expectation is a brute-force ranking computed here with numpy: all item vectors scored against the user
vector (plus the transition prior's term where the artifact has one), disallowed items set to -inf, then sorted.
The small artifact has no attribute model, so an upserted item's vector is the average of the trained items'
vectors (the documented rule for an item without known attribute values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from seqrank.serving import retrieval
from seqrank.serving.catalogue import History
from seqrank.serving.config import RetrievalArgs
from seqrank.serving.live_catalogue import LiveItemsSync
from seqrank.serving.messages import EncodedUser, RetrievalRequest
from seqrank.serving.retrieval import RetrievalStage
from seqrank.training.artifact import load_artifact
from tests.serving.artifacts import write_small_artifact
from tests.serving.stubs import StubMetrics
from tests.serving.test_retrieval import small_prior


@dataclass(frozen=True)
class State:
    raw_item_id: str
    attributes: tuple[str, ...] | None
    available: bool


class Store:
    def __init__(self):
        self.version, self.states = 0, {}

    def write(self, *states: State) -> int:
        self.version += 1
        self.states.update({state.raw_item_id: (self.version, state) for state in states})
        return self.version

    def items_since(self, version):
        return [state for changed, state in self.states.values() if changed > version], self.version


@pytest.fixture
def world(tmp_path):
    artifact = load_artifact(write_small_artifact(tmp_path / "v1", transitions=small_prior(1.0)))
    store = Store()
    sync = LiveItemsSync(store.items_since, interval_s=3600, owner="test")
    stage = RetrievalStage(RetrievalArgs(), StubMetrics(), live=sync)
    stage.models.reload({"artifact_path": str(artifact.path)})
    return artifact, store, stage


def request(user, history=(), version=0, **fields) -> RetrievalRequest:
    fields = {"exclude_item_ids": (), "exclude_seen": True, "num_candidates": 20, "k": 20, "diversity": 0.0,
              **fields}
    return RetrievalRequest(user=EncodedUser(user, "small-v1"), history=History(tuple(history), ("pv",) * len(history)),
                            catalogue_version=version, **fields)


def oracle(artifact, user, allowed_ids, newest=None, new_items=()):
    """Raw ids ranked by exact relevance among `allowed_ids`: trained vectors, the average item for new ones."""
    vectors = {artifact.item_ids[i]: artifact.item_vectors[i] for i in range(1, artifact.num_items + 1)}
    average = artifact.item_vectors[1:].mean(axis=0)
    vectors.update({raw: average for raw in new_items})
    boost = small_prior(1.0).dense_rows(np.array([newest]))[0] if newest else np.zeros(artifact.num_items + 1)
    scores = {raw: float(vectors[raw].astype(np.float64) @ user.astype(np.float64))
              + (boost[artifact.item_index_of[raw]] if raw in artifact.item_index_of else 0.0)
              for raw in allowed_ids}
    return sorted(scores, key=lambda raw: -scores[raw]), scores


def test_caller_candidates_are_ranked_by_the_retrieval_relevance_minus_hidden_seen_and_excluded(world):
    artifact, store, stage = world
    version = store.write(State("new-1", ("promo",), True), State("sku-3", None, False))  # a new item; hide sku-3
    user = np.random.default_rng(4).normal(size=4).astype(np.float32)
    given = ("sku-1", "sku-3", "new-1", "sku-9", "sku-5", "sku-2", "sku-11")
    (candidates,) = stage.retrieve([request(user, history=("sku-7", "sku-5"), version=version,
                                            candidate_item_ids=given, exclude_item_ids=("sku-2",))])
    allowed = [raw for raw in given if raw not in {"sku-3", "sku-5", "sku-2"}]  # hidden, seen, excluded
    expected, scores = oracle(artifact, user, allowed, newest=5, new_items=("new-1",))
    assert list(candidates.item_ids) == expected
    np.testing.assert_allclose(candidates.relevance, [scores[raw] for raw in expected], rtol=1e-5)


def test_an_attribute_filter_returns_exactly_the_allowed_top_k(world):
    artifact, store, stage = world
    version = store.write(State("new-1", ("promo",), True), State("sku-4", ("promo", "brand-z"), True),
                          State("sku-8", ("promo",), True), State("new-2", ("promo", "brand-z"), True))
    user = np.random.default_rng(5).normal(size=4).astype(np.float32)
    (candidates,) = stage.retrieve([request(user, version=version, include_any=("promo",),
                                            exclude_any=("brand-z",), num_candidates=10, k=10)])
    expected, _ = oracle(artifact, user, ["new-1", "sku-8"], new_items=("new-1", "new-2"))
    assert list(candidates.item_ids) == expected


@pytest.mark.parametrize("as_exclusions", [True, False], ids=["few_hidden", "many_hidden"])
def test_hidden_items_never_come_back_from_retrieval_or_the_prior(world, monkeypatch, as_exclusions):
    artifact, store, stage = world
    if not as_exclusions:  # past the threshold the stage runs a filtered search instead of over-fetching
        monkeypatch.setattr(retrieval, "MAX_HIDDEN_AS_EXCLUSIONS", 0)
    version = store.write(*(State(f"sku-{i}", None, False) for i in (9, 1, 12)))  # 9 is sku-5's top successor
    user = np.random.default_rng(6).normal(size=4).astype(np.float32)
    (candidates,) = stage.retrieve([request(user, history=("sku-5",), version=version)])
    allowed = [f"sku-{i}" for i in range(1, 13) if i not in (9, 1, 12, 5)]
    expected, _ = oracle(artifact, user, allowed, newest=5)
    assert list(candidates.item_ids) == expected


def test_an_upserted_item_is_retrievable_by_the_next_request_and_a_restored_one_comes_back(world):
    artifact, store, stage = world
    user = np.random.default_rng(7).normal(size=4).astype(np.float32)
    everything = [f"sku-{i}" for i in range(1, 13)] + ["brand-new"]
    expected, _ = oracle(artifact, user, everything, new_items=("brand-new",))

    def ranked(version):
        (candidates,) = stage.retrieve([request(user, version=version, num_candidates=13, k=13)])
        return list(candidates.item_ids)

    assert ranked(store.write(State("brand-new", ("x",), True))) == expected
    assert ranked(store.write(State("brand-new", ("x",), False))) == [raw for raw in expected if raw != "brand-new"]
    assert ranked(store.write(State("brand-new", ("x",), True))) == expected
