"""The other topologies over real gRPC, applied through the config path to the session's one cluster, must rank
exactly like the committed one (encoder, retrieval and MMR inside the ingress): the Kubernetes topology with the
Encoder and Retrieval deployments, MMR as its own deployment, and the index split over two RetrievalShard
deployments."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest

from seqrank.serving.catalogue import History
from seqrank.serving.messages import EncodeRequest
from seqrank.serving.ops.deploy import plan_shards
from seqrank.serving.ops.serve_config_check import application
from tests.e2e.helpers import exact_ranking, random_history, trained_user_vector
from tests.topology import with_deployment_pools


def deployed(service) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return set(ServeSubmissionClient(service.dashboard_url).get_serve_details()["applications"][service.app_name]
               ["deployments"])


def assert_ranks_exactly(client, tiny_run, manifest, item_ids, item_vectors, seeds, user_prefix):
    for seed in seeds:
        events = random_history(item_ids, manifest["behavior_names"], seed=seed)
        expected = exact_ranking(trained_user_vector(tiny_run, manifest, item_ids, events), item_vectors, item_ids,
                                 events)
        response = client.rank(f"{user_prefix}-{seed}", recent_events=events, k=10, diversity=0.0,
                               exclude_item_ids=expected[:3])
        assert [item.item_id for item in response.items] == expected[3:13]  # seen and excluded items out, k back
        assert response.model_version == manifest["model_version"]


@pytest.fixture
def deployment_pools(service):
    """The Kubernetes topology (k8s/base/serve-overrides.yaml): Encoder and Retrieval in deployments of their own."""
    service.apply(with_deployment_pools(service.config))  # new args: Serve rebuilds the app
    try:
        yield
    finally:
        service.apply(service.config)


def test_the_encoder_and_retrieval_deployments_rank_exactly_and_encode_like_training(
    deployment_pools, service, client, driver_loop, tiny_run, manifest, item_ids, item_vectors
):
    from ray import serve

    assert deployed(service) == {"RankingIngress", "Encoder", "Retrieval"}
    assert_ranks_exactly(client, tiny_run, manifest, item_ids, item_vectors, (40, 41), "u-pools")
    events = random_history(item_ids, manifest["behavior_names"], seed=6, length=60)  # longer than max_len
    history = History(item_ids=tuple(e.raw_item_id for e in events), behaviors=tuple(e.behavior for e in events))

    async def encode():
        encoder = serve.get_deployment_handle("Encoder", app_name=service.app_name)
        return await encoder.encode.remote([EncodeRequest(history)])

    (served,) = asyncio.run_coroutine_threadsafe(encode(), driver_loop).result(timeout=60)
    assert served.model_version == manifest["model_version"]
    np.testing.assert_allclose(served.user_vector, trained_user_vector(tiny_run, manifest, item_ids, events),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def retrieval_in_ingress_own_reranker(service):
    config = copy.deepcopy(service.config)
    app = application(config)
    app["args"]["retrieval"]["placement"] = "ingress"
    app["args"]["rerank"]["placement"] = "deployment"
    app["deployments"].append({"name": "Reranker", "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}})
    service.apply(config)  # new args: Serve rebuilds the app
    try:
        yield
    finally:
        service.apply(service.config)


def test_retrieval_in_the_ingress_with_its_own_reranker_ranks_exactly(
    retrieval_in_ingress_own_reranker, service, client, tiny_run, manifest, item_ids, item_vectors
):
    assert deployed(service) == {"RankingIngress", "Reranker"}
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
    config = with_deployment_pools(service.config)  # shards need the Retrieval deployment
    application(config)["args"]["retrieval"]["num_shards"] = 2
    service.apply(plan_shards(config))  # RetrievalShard0 and 1, each a copy of the Retrieval entry
    try:
        yield
    finally:
        service.apply(service.config)


def test_two_retrieval_shards_rank_exactly_like_one_index(
    two_retrieval_shards, service, client, tiny_run, manifest, item_ids, item_vectors
):
    assert deployed(service) == {"RankingIngress", "Encoder", "Retrieval", "RetrievalShard0", "RetrievalShard1"}
    assert_ranks_exactly(client, tiny_run, manifest, item_ids, item_vectors, (60, 61), "u-shards")
