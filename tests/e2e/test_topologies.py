"""The other topologies over real gRPC, applied through the config path, must rank exactly like the committed
one: retrieval inside the ingress replica with MMR as its own deployment, and the index split over two
RetrievalShard deployments."""

from __future__ import annotations

import copy

import pytest

from serving.deploy import application, plan_shards
from tests.e2e.helpers import exact_ranking, random_history, trained_user_vector


@pytest.fixture(scope="module")
def retrieval_in_ingress_own_reranker(service):
    config = copy.deepcopy(service.config)
    app = application(config)
    app["args"]["retrieval"]["placement"] = "ingress"
    app["args"]["rerank"]["placement"] = "deployment"
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Retrieval"]
    app["deployments"].append({"name": "Reranker", "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}})
    service.apply(config)  # new args: Serve rebuilds the app
    try:
        yield
    finally:
        service.apply(service.config)


def test_retrieval_in_the_ingress_with_its_own_reranker_ranks_exactly(
    retrieval_in_ingress_own_reranker, service, client, tiny_run, manifest, item_ids, item_vectors
):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()["applications"][service.app_name]
    assert set(details["deployments"]) == {"RankingIngress", "Encoder", "Reranker"}
    for seed in (50, 51):
        events = random_history(item_ids, manifest["behavior_names"], seed=seed)
        expected = exact_ranking(trained_user_vector(tiny_run, manifest, item_ids, events), item_vectors, item_ids,
                                 events)
        response = client.rank(f"u-topology-{seed}", recent_events=events, k=10, diversity=0.0,
                               exclude_item_ids=expected[:3])
        assert [item.item_id for item in response.items] == expected[3:13]
        assert response.model_version == manifest["model_version"]
        diverse = client.rank(f"u-topology-{seed}", recent_events=events, k=10, diversity=0.8)
        assert len({item.item_id for item in diverse.items}) == 10


@pytest.fixture
def two_retrieval_shards(service):
    config = copy.deepcopy(service.config)
    application(config)["args"]["retrieval"]["num_shards"] = 2
    service.apply(plan_shards(config))  # RetrievalShard0 and 1, each a copy of the Retrieval entry
    try:
        yield
    finally:
        service.apply(service.config)


def test_two_retrieval_shards_rank_exactly_like_one_index(
    two_retrieval_shards, service, client, tiny_run, manifest, item_ids, item_vectors
):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()["applications"][service.app_name]
    assert set(details["deployments"]) == {"RankingIngress", "Encoder", "Retrieval", "RetrievalShard0",
                                           "RetrievalShard1"}
    for seed in (60, 61):
        events = random_history(item_ids, manifest["behavior_names"], seed=seed)
        expected = exact_ranking(trained_user_vector(tiny_run, manifest, item_ids, events), item_vectors, item_ids,
                                 events)
        response = client.rank(f"u-shards-{seed}", recent_events=events, k=10, diversity=0.0,
                               exclude_item_ids=expected[:3])
        assert [item.item_id for item in response.items] == expected[3:13]  # seen and excluded items out, k back
        assert response.model_version == manifest["model_version"]
