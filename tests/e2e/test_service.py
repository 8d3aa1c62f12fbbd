"""The running service over real gRPC: ranking contract, parity with training, history store, health, model
info, and the Prometheus export."""

from __future__ import annotations

import time

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from seqrank.serving.metrics import (
    ALL_METRICS,
    ATTRIBUTED_EVENTS,
    CANARY_PERCENT,
    UNATTRIBUTED_EVENTS,
    VERSION_RETRIES,
)
from seqrank.training.metrics import intra_list_diversity
from seqrank.v1 import ranking_pb2 as pb
from tests import exposition
from tests.e2e.helpers import exact_ranking, random_history, trained_user_vector

METRICS_DEADLINE_S = 90.0  # Serve pushes replica metrics about every 10 s


def test_rank_returns_exactly_k_distinct_items_never_excluded_or_seen(client, manifest, item_ids):
    events = random_history(item_ids, manifest["behavior_names"], seed=1, length=15)
    excluded = list(np.random.default_rng(2).choice(item_ids[1:], size=20, replace=False))
    response = client.rank("u-contract", recent_events=events, exclude_item_ids=excluded, k=25, diversity=0.3)
    returned = [item.item_id for item in response.items]
    assert len(returned) == 25 and len(set(returned)) == 25
    assert not set(returned) & (set(excluded) | {e.raw_item_id for e in events})
    assert response.history_source == pb.HISTORY_SOURCE_INLINE
    assert response.model_version == manifest["model_version"]
    assert all(item.because_item_id in {e.raw_item_id for e in events} for item in response.items)
    assert [t.stage for t in response.timings] == ["history", "encode", "retrieve", "rerank", "total"]


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_lambda_zero_equals_exact_dot_product_search(client, tiny_run, manifest, item_ids, item_vectors, seed):
    events = random_history(item_ids, manifest["behavior_names"], seed=seed)
    user_vector = trained_user_vector(tiny_run, manifest, item_ids, events)
    expected = exact_ranking(user_vector, item_vectors, item_ids, events)[:10]
    response = client.rank(f"u-exact-{seed}", recent_events=events, k=10, diversity=0.0)
    assert [item.item_id for item in response.items] == expected
    relevance = [item.relevance for item in response.items]
    np.testing.assert_allclose(relevance, item_vectors[[item_ids.index(i) for i in expected]] @ user_vector,
                               rtol=1e-4, atol=1e-4)


def test_served_user_vector_equals_the_trained_one(client, tiny_run, manifest, item_ids, item_vectors):
    """Through Rank, wherever the encoder runs (in the committed config: inside the ingress, so no handle to call):
    at diversity 0 each returned relevance is <served user vector, item vector>; 50 of them against the trained
    vector's pin the (D,) vector down. The history is longer than max_len, so truncation is checked too.
    tests/e2e/test_topologies.py compares the Encoder deployment's vector itself."""
    events = random_history(item_ids, manifest["behavior_names"], seed=6, length=60)
    user_vector = trained_user_vector(tiny_run, manifest, item_ids, events)
    expected = exact_ranking(user_vector, item_vectors, item_ids, events)[:50]
    response = client.rank("u-parity", recent_events=events, k=50, diversity=0.0)
    assert response.model_version == manifest["model_version"]
    assert [item.item_id for item in response.items] == expected
    np.testing.assert_allclose([item.relevance for item in response.items],
                               item_vectors[[item_ids.index(i) for i in expected]] @ user_vector, rtol=1e-5, atol=1e-5)


def test_raising_lambda_raises_intra_list_diversity(client, manifest, item_ids, item_vectors):
    ild = {}
    for diversity in (0.0, 0.5, 0.9):
        lists = []
        for seed in range(10, 16):
            events = random_history(item_ids, manifest["behavior_names"], seed=seed)
            response = client.rank(f"u-ild-{seed}", recent_events=events, k=10, diversity=diversity)
            lists.append([item_ids.index(item.item_id) for item in response.items])
        ild[diversity] = intra_list_diversity(np.array(lists), item_vectors, 10)
    assert ild[0.0] < ild[0.5] < ild[0.9], ild


def test_recorded_events_drive_the_next_rank(client, manifest, item_ids):
    events = random_history(item_ids, manifest["behavior_names"], seed=20, length=8)
    recorded = client.record({"u-recorded": events}, idempotency_key="e2e-record-1")
    assert (recorded.accepted, recorded.stored, recorded.idempotent_replay) == (8, 8, False)
    from_store = client.rank("u-recorded", k=10, diversity=0.2)
    assert from_store.history_source == pb.HISTORY_SOURCE_STORE
    assert not {item.item_id for item in from_store.items} & {e.raw_item_id for e in events}
    inline = client.rank("u-someone-else", recent_events=events, k=10, diversity=0.2)
    assert [i.item_id for i in from_store.items] == [i.item_id for i in inline.items]  # same history, same list
    more = random_history(item_ids, manifest["behavior_names"], seed=21, length=3)
    client.record({"u-recorded": more})
    updated = client.rank("u-recorded", k=10, diversity=0.2)
    assert [i.item_id for i in updated.items] != [i.item_id for i in from_store.items]
    assert not {item.item_id for item in updated.items} & {e.raw_item_id for e in events + more}
    replay = client.record({"u-recorded": events}, idempotency_key="e2e-record-1")
    assert (replay.stored, replay.idempotent_replay) == (0, True)


def test_inline_events_are_not_stored(client, manifest, item_ids):
    events = random_history(item_ids, manifest["behavior_names"], seed=30, length=5)
    assert client.rank("u-inline-only", recent_events=events).history_source == pb.HISTORY_SOURCE_INLINE
    assert client.rank("u-inline-only").history_source == pb.HISTORY_SOURCE_FALLBACK


def test_unknown_user_gets_the_popular_fallback_minus_exclusions(client, tiny_artifact, item_ids):
    popularity = np.load(tiny_artifact / "item_popularity.npy")
    order = [item_ids[i] for i in np.argsort(-popularity[1:], kind="stable") + 1]
    response = client.rank("u-never-seen", k=5, exclude_item_ids=order[:2])
    assert response.history_source == pb.HISTORY_SOURCE_FALLBACK
    assert [item.item_id for item in response.items] == order[2:7]
    assert [t.stage for t in response.timings] == ["history", "fallback", "total"]


def test_health_is_serving(client):
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.health("seqrank.v1.RankingService") == health_pb2.HealthCheckResponse.SERVING


def test_model_info_matches_the_manifest(client, manifest):
    info = client.model_info()
    assert info.model_version == manifest["model_version"]
    assert (info.num_items, info.dim) == (manifest["num_items"], manifest["dim"])
    assert (info.index.m, info.index.ef_construction, info.index.ef_search) == (
        manifest["index"]["M"], manifest["index"]["ef_construction"], manifest["index"]["ef_search"])
    assert list(info.behavior_names) == manifest["behavior_names"]
    assert info.max_history_length == manifest["encoder_config"]["max_len"]
    assert info.data_fingerprint == manifest["data_fingerprint"] and info.created_at == manifest["created_at"]
    # The manifest records test metrics and the run's bookkeeping together; the API keeps them apart.
    recorded = {k: float(v) for k, v in manifest["metrics"].items()}
    bookkeeping = {"best_epoch", "epochs_run", "seconds", "seconds_to_best", "workers", "transition_weight"}
    assert dict(info.metrics) == pytest.approx({k: v for k, v in recorded.items() if k not in bookkeeping})
    assert all(k.split("@")[0] in {"HR", "NDCG", "coverage", "ILD"} or k in {"MRR", "users"} for k in info.metrics)
    assert dict(info.training_summary) == pytest.approx({k: v for k, v in recorded.items() if k in bookkeeping})
    assert info.limits.max_k == 100 and info.limits.max_request_candidates == 2000  # the committed config's
    assert info.catalogue.items == manifest["num_items"] + info.catalogue.upserted


def scrape(url: str) -> dict[str, float]:
    """Sum of each series over its labels, e.g. {"ray_seqrank_requests_total": 42.0} (prometheus_client's parser)."""
    return exposition.totals(exposition.scrape(url))


def test_prometheus_export_serves_the_documented_metrics(service, client, manifest, item_ids):
    for seed in range(40, 45):  # traffic of every kind, in case this test runs alone
        events = random_history(item_ids, manifest["behavior_names"], seed=seed)
        client.rank(f"u-metrics-{seed}", recent_events=events)
    client.rank("u-metrics-cold")
    client.record({"u-metrics": events[:2]})
    client.set_item_availability([item_ids[-1]], available=False)  # a catalogue change, undone at once
    client.set_item_availability([item_ids[-1]], available=True)
    expected = {spec.exported_name for spec in ALL_METRICS} - {VERSION_RETRIES.exported_name}  # rollouts only
    # events naming a list and canaries: tests/e2e/test_attribution.py and test_canary.py
    expected -= {ATTRIBUTED_EVENTS.exported_name, UNATTRIBUTED_EVENTS.exported_name, CANARY_PERCENT.exported_name}
    expected |= {"ray_serve_num_grpc_requests_total", "ray_serve_grpc_request_latency_ms_count"}
    deadline = time.monotonic() + METRICS_DEADLINE_S
    while True:
        totals = scrape(service.metrics_url)
        missing = {name for name in expected if totals.get(name, 0.0) <= 0.0}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert not missing, f"absent or zero after {METRICS_DEADLINE_S:.0f} s: {sorted(missing)}"
    assert totals["ray_seqrank_requests_total"] >= 7
