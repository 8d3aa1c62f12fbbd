"""The other topology over real gRPC: retrieval and the re-ranker each as their own deployment (two more hops),
applied through the config path, must rank exactly like the default in-ingress topology."""

from __future__ import annotations

import copy

import pytest

from serving.deploy import application
from tests.e2e.helpers import exact_ranking, random_history, trained_user_vector


@pytest.fixture(scope="module")
def separate_stages(service):
    config = copy.deepcopy(service.config)
    app = application(config)
    app["args"]["retrieval"]["placement"] = "deployment"
    app["args"]["rerank"]["placement"] = "deployment"
    artifact = {"artifact_path": str(service.artifact)}
    app["deployments"] += [
        {"name": "Retrieval", "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5},
         "user_config": artifact},
        {"name": "Reranker", "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}},
    ]
    service.apply(config)  # new args: Serve rebuilds the app
    try:
        yield
    finally:
        service.apply(service.config)


def test_separate_retrieval_and_reranker_deployments_rank_exactly(separate_stages, service, client, tiny_run,
                                                                   manifest, item_ids, item_vectors):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()["applications"][service.app_name]
    assert set(details["deployments"]) == {"RankingIngress", "Encoder", "Retrieval", "Reranker"}
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
