"""The live catalogue and search re-ranking over real gRPC on the session's Ray Serve, in an application of its
own ("seqrank-catalogue": the same code and artifact, two ingress replicas, its own SQLite store polled every
200 ms), so its upserts and hides never touch the other tests' catalogue.

References are computed here from the training code alone: the user vector from the run's checkpoint
(`trained_user_vector`), every item's inner product with it, the artifact's attribute values per item; an
upserted item's vector from `training/cold_items.py` (its direction held to the torch model in tests/training).
"""

from __future__ import annotations

import copy
import time

import grpc
import numpy as np
import pytest

from seqrank.serving.client.ranking_client import RankingClient, rank_request
from seqrank.serving.client.retry import NO_RETRY
from seqrank.serving.ops.deploy import submit, wait_until_running
from seqrank.serving.ops.serve_config_check import application
from seqrank.training.artifact import load_artifact
from seqrank.training.cold_items import placed_item_vectors
from seqrank.v1 import ranking_pb2 as pb
from tests.e2e.conftest import DEPLOY_TIMEOUT_S
from tests.e2e.helpers import random_history, trained_user_vector

APP = "seqrank-catalogue"
SYNC_MS = 200
CONVERGED_ANSWERS = 40  # consecutive answers from either replica: all from one of two has probability 2**-39


def applications_running(service) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return set(ServeSubmissionClient(service.dashboard_url).get_serve_details().get("applications", {}))


def catalogue_application(base: dict, history_db) -> dict:
    app = copy.deepcopy(base)
    app["name"], app["route_prefix"] = APP, f"/{APP}"
    app["args"]["ingress"]["history"] = {**app["args"]["ingress"].get("history", {}),
                                         "url": f"sqlite:///{history_db}", "catalogue_sync_ms": SYNC_MS}
    for deployment in app.get("deployments", []):
        if deployment["name"] == "RankingIngress":
            deployment["num_replicas"] = 2
            deployment["ray_actor_options"] = {**deployment.get("ray_actor_options", {}), "num_cpus": 0.5}
    return app


def deploy(service, config) -> None:
    submit(config, service.dashboard_url)
    wait_until_running(service.dashboard_url, APP, DEPLOY_TIMEOUT_S)


@pytest.fixture(scope="module")
def catalogue_app(service, tmp_path_factory):
    history_db = tmp_path_factory.mktemp("catalogue") / "history.db"
    both = {**copy.deepcopy(service.config),
            "applications": [application(service.config), catalogue_application(application(service.config),
                                                                                 history_db)]}
    deploy(service, both)
    try:
        yield both
    finally:
        submit(service.config, service.dashboard_url)  # back to the session's one app
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while APP in applications_running(service) and time.monotonic() < deadline:
            time.sleep(0.5)
        wait_until_running(service.dashboard_url, service.app_name, DEPLOY_TIMEOUT_S)


@pytest.fixture(scope="module")
def shop(service, catalogue_app):
    with RankingClient(service.grpc_target, application=APP, timeout_s=30.0, retry=NO_RETRY) as client:
        yield client


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return load_artifact(tiny_artifact)


def values_of(artifact) -> dict[str, set[str]]:
    """Each trained item's raw attribute values, read from the artifact's files."""
    return {artifact.item_ids[i]: {artifact.attribute_values[code] for code in artifact.item_attributes[i] if code}
            for i in range(1, artifact.num_items + 1)}


def exact_order(scores: dict[str, float], allowed) -> list[str]:
    return sorted((raw for raw in allowed), key=lambda raw: (-scores[raw], raw))


@pytest.fixture(scope="module")
def user(tiny_run, manifest, item_ids, artifact):
    """A history, its user vector from the training code, and every trained item's relevance for it."""
    events = random_history(item_ids, manifest["behavior_names"], seed=77)
    vector = trained_user_vector(tiny_run, manifest, item_ids, events)
    scores = {artifact.item_ids[i]: float(artifact.item_vectors[i] @ vector) for i in range(1, artifact.num_items + 1)}
    return events, vector, scores


def ranked(response) -> list[str]:
    return [item.item_id for item in response.items]


def test_caller_candidates_are_ranked_by_exact_relevance_and_unknown_ids_come_back(shop, user, item_ids):
    events, _, scores = user
    seen = {event.raw_item_id for event in events}
    rng = np.random.default_rng(3)
    candidates = list(rng.choice(item_ids[1:], size=40, replace=False)) + ["no-such-item", "another-ghost"]
    response = shop.rank("u-search", recent_events=events, candidate_item_ids=candidates, k=10, diversity=0.0)
    expected = exact_order(scores, [c for c in candidates if c in scores and c not in seen])[:10]
    assert ranked(response) == expected
    np.testing.assert_allclose([item.relevance for item in response.items], [scores[c] for c in expected],
                               rtol=1e-4, atol=1e-4)
    assert list(response.unknown_candidate_ids) == ["no-such-item", "another-ghost"]
    assert all(item.explanation.startswith("because you") for item in response.items)


@pytest.mark.parametrize("include, exclude", [(("cat-003",), ()), (("cat-001", "cat-004"), ("brand-0005",)),
                                              ((), ("cat-000", "cat-001", "cat-002"))])
def test_attribute_filters_return_the_exact_top_k_of_the_allowed_items(shop, user, artifact, include, exclude):
    events, _, scores = user
    seen = {event.raw_item_id for event in events}
    have = values_of(artifact)
    allowed = [raw for raw, values in have.items() if raw not in seen and (not include or values & set(include))
               and not values & set(exclude)]
    assert allowed, "the synthetic catalogue has items of these categories"
    response = shop.rank("u-filter", recent_events=events, include_any=include, exclude_any=exclude, k=10,
                         diversity=0.0)
    assert ranked(response) == exact_order(scores, allowed)[:10]


def test_an_upserted_item_is_retrievable_on_the_next_rank_of_either_replica(shop, user, artifact):
    events, vector, _ = user
    attributes = ["cat-002", "brand-0007", "only-in-this-test"]
    write = shop.upsert_items({"fresh-1": attributes})
    assert (write.created, write.updated) == (1, 0) and list(write.unknown_attribute_values) == ["only-in-this-test"]
    for _ in range(4):  # several calls: with two replicas, both are asked; each catches up to the version first
        response = shop.rank("u-fresh", recent_events=events, include_any=["only-in-this-test"], k=5,
                             min_catalogue_version=write.catalogue_version)
        assert ranked(response) == ["fresh-1"]
    expected = float(placed_item_vectors(artifact, [attributes]).vectors[0] @ vector)
    assert response.items[0].relevance == pytest.approx(expected, rel=1e-4, abs=1e-4)
    again = shop.upsert_items({"fresh-1": attributes[:2]})  # new values for a known item: an update
    assert (again.created, again.updated) == (0, 1)


def test_a_hidden_item_is_absent_from_every_path_and_comes_back_when_restored(shop, user, artifact):
    events, _, scores = user
    seen = {event.raw_item_id for event in events}
    top = exact_order(scores, [raw for raw in scores if raw not in seen])[0]
    popular = artifact.item_ids[int(np.argmax(artifact.item_popularity[1:])) + 1]
    hide = shop.set_item_availability([top, popular], available=False)
    assert hide.changed == 2
    version = hide.catalogue_version
    paths = {
        "retrieval": lambda: shop.rank("u-hidden", recent_events=events, k=20, min_catalogue_version=version),
        "candidates": lambda: shop.rank("u-hidden", recent_events=events, candidate_item_ids=[top, popular],
                                        min_catalogue_version=version),
        "cold start": lambda: shop.rank("u-never-seen", k=20, min_catalogue_version=version),
    }
    for name, call in paths.items():
        response = call()
        assert not {top, popular} & set(ranked(response)), name
        assert not {top, popular} & set(response.unknown_candidate_ids), name  # hidden, not unknown
    restore = shop.set_item_availability([top, popular], available=True)
    response = shop.rank("u-hidden", recent_events=events, k=1, diversity=0.0,
                         min_catalogue_version=restore.catalogue_version)
    assert ranked(response) == [top]


def test_the_catalogue_survives_a_restart_of_the_application(service, shop, catalogue_app):
    write = shop.upsert_items({"durable-1": ["cat-001", "survives-restarts"]})
    hidden = shop.set_item_availability(["durable-1"], available=False)
    assert hidden.changed == 1 and hidden.catalogue_version > write.catalogue_version
    without = {**copy.deepcopy(service.config), "applications": [application(service.config)]}
    submit(without, service.dashboard_url)  # the app and its replicas go away; the SQLite file stays
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while APP in applications_running(service) and time.monotonic() < deadline:
        time.sleep(0.5)
    deploy(service, catalogue_app)  # new replicas: everything they know comes from the store
    deadline = time.monotonic() + 30  # a replica that could not read the store within its start budget polls
    while (after := shop.model_info().catalogue).version < hidden.catalogue_version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after.version >= hidden.catalogue_version and after.hidden >= 1 and after.upserted >= 1
    # Both changes came back from the store: the upserted item is still hidden, then restorable and retrievable.
    still_hidden = shop.rank("u-after-restart", include_any=["survives-restarts"],
                             min_catalogue_version=hidden.catalogue_version)
    assert ranked(still_hidden) == []
    restored = shop.set_item_availability(["durable-1"], available=True)
    response = shop.rank("u-after-restart", include_any=["survives-restarts"],
                         min_catalogue_version=restored.catalogue_version)
    assert ranked(response) == ["durable-1"]


def test_both_replicas_converge_without_being_told_the_version(shop):
    hide = shop.set_item_availability(["sku-00010"], available=False)
    deadline = time.monotonic() + 30
    streak = 0
    while streak < CONVERGED_ANSWERS and time.monotonic() < deadline:
        streak = streak + 1 if shop.model_info().catalogue.version >= hide.catalogue_version else 0
    assert streak >= CONVERGED_ANSWERS, "a replica did not reach the new catalogue version by polling"
    shop.set_item_availability(["sku-00010"], available=True)


def test_rank_batch_answers_each_request_as_rank_would_with_its_own_status(shop, user):
    events, _, _ = user
    requests = [rank_request("u-batch-1", recent_events=events, k=5, diversity=0.0),
                rank_request("u-batch-2", k=0),  # invalid: k
                rank_request("u-batch-3", recent_events=events[:3], k=3, diversity=0.0)]
    batch = shop.rank_batch(requests)
    assert [result.status_code for result in batch.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert batch.results[1].status_message.startswith("requests[1].k: must be in [1, ")
    for request, result in zip(requests[::2], batch.results[::2]):
        single = shop.send_rank(request)
        assert ranked(result.response) == ranked(single)


def test_catalogue_calls_name_the_field_they_refuse(shop):
    with pytest.raises(grpc.RpcError) as error:
        shop.set_item_availability(["never-heard-of-it"], available=False)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("item_ids[0]: unknown item id 'never-heard-of-it'")
    with pytest.raises(grpc.RpcError) as error:
        shop.upsert_items({"x" * 200: ["a"]})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details().startswith("items[0]")
    with pytest.raises(grpc.RpcError) as error:
        shop.send_rank(pb.RankRequest(user_id="u", candidate_item_ids=["sku-00001", "sku-00001"]))
    assert error.value.details().startswith("candidate_item_ids[1]: repeats 'sku-00001'")
