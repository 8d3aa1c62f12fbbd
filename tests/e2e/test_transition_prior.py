"""An artifact with an item-to-item transition prior, served over real gRPC: at diversity 0 the list is the
offline score (inner product + the prior's term after the newest event), and a newly recorded event moves it."""

from __future__ import annotations

import numpy as np
import pytest

from seqrank.serving.history import Event
from seqrank.training.artifact import load_artifact
from tests.e2e.helpers import exact_ranking, random_history, run_with_prior, trained_user_vector

WEIGHT = 1.0


@pytest.fixture(scope="module")
def prior_artifact(tiny_run, tmp_path_factory):
    """The session's tiny run with a prior at WEIGHT (as `fit` writes it), exported."""
    _, artifact = run_with_prior(tiny_run, tmp_path_factory.mktemp("prior"), WEIGHT, name="prior")
    return load_artifact(artifact)


def offline_ranking(user_vector, artifact, events, k) -> list[str]:
    ids = artifact.item_ids
    history = np.array([artifact.item_index_of[e.raw_item_id] for e in events])
    scores = artifact.item_vectors.astype(np.float64) @ user_vector + artifact.transitions.dense_rows(history[-1:])[0]
    scores[0] = -np.inf
    scores[history] = -np.inf
    return [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_served_lists_follow_the_prior_after_the_newest_event(service, tiny_run, prior_artifact):
    artifact = prior_artifact
    assert artifact.transitions.weight == WEIGHT
    manifest = artifact.manifest
    try:
        service.apply(service.with_artifact(artifact.path))
        with service.client() as client:
            assert client.model_info().model_version == manifest["model_version"]
            for seed in (31, 32, 33):
                events = random_history(artifact.item_ids, manifest["behavior_names"], seed=seed)
                user_vector = trained_user_vector(tiny_run, manifest, artifact.item_ids, events)
                response = client.rank(f"u-prior-{seed}", recent_events=events, k=10, diversity=0.0)
                assert [item.item_id for item in response.items] == offline_ranking(user_vector, artifact, events, 10)
            # the newest event decides which successors are boosted, and the prior changes the list
            events = random_history(artifact.item_ids, manifest["behavior_names"], seed=34)
            newest = max(range(1, len(artifact.item_ids)), key=lambda i: artifact.transitions.indptr[i + 1]
                         - artifact.transitions.indptr[i])  # the item with the most distinct successors
            moved = [e for e in events if e.raw_item_id != artifact.item_ids[newest]] + [
                Event(artifact.item_ids[newest], "pv")]
            user_vector = trained_user_vector(tiny_run, manifest, artifact.item_ids, moved)
            response = client.rank("u-prior-moved", recent_events=moved, k=10, diversity=0.0)
            expected = offline_ranking(user_vector, artifact, moved, 10)
            assert [item.item_id for item in response.items] == expected
            assert expected != exact_ranking(user_vector, artifact.item_vectors, artifact.item_ids, moved)[:10]
    finally:
        service.apply(service.config)  # back to the session's artifact for the other tests
