"""Online quality over real Ray Serve + gRPC: events that name a Rank list (Event.list_request_id) are counted as
hits by position bucket or misses, per model version, in Prometheus counters; the expected counts are computed
here from the responses received and the events sent."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from seqrank.serving.history import Event
from seqrank.v1 import ranking_pb2
from tests.e2e.helpers import random_history

ATTRIBUTED = "ray_seqrank_attributed_events_total"
LISTS = "ray_seqrank_lists_shown_total"
UNATTRIBUTED = "ray_seqrank_unattributed_events_total"
METRICS_DEADLINE_S = 60.0  # replicas push every ~10 s


def bucket(position: int | None) -> str:
    """The documented buckets (docs/metrics.md "Online quality"), written out by hand."""
    if position is None:
        return "miss"
    if position == 1:
        return "1"
    if position <= 3:
        return "2-3"
    return "4-10" if position <= 10 else "11+"


def scrape_by_labels(url: str, names: set[str]) -> Counter:
    """{(series name, sorted seqrank labels): value}, summed over Ray's and Serve's own labels."""
    seqrank_labels = {"model_version", "position_bucket", "behavior"}
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in seqrank_labels))
                totals[(sample.name, labels)] += sample.value
    return totals


def delta(after: Counter, before: Counter) -> Counter:
    return Counter({key: after[key] - before.get(key, 0.0) for key in after if after[key] - before.get(key, 0.0)})


def wait_for(service, before: Counter, expected: Counter) -> Counter:
    deadline = time.monotonic() + METRICS_DEADLINE_S
    while True:
        got = delta(scrape_by_labels(service.metrics_url, {ATTRIBUTED, LISTS, UNATTRIBUTED}), before)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(2.0)


def test_events_naming_a_list_are_counted_by_version_position_and_behavior(service, client, manifest, item_ids):
    behaviors = manifest["behavior_names"]
    before = scrape_by_labels(service.metrics_url, {ATTRIBUTED, LISTS, UNATTRIBUTED})
    expected: Counter = Counter()
    shown = {}  # request id -> (model version, item ids in order)
    for seed in range(6):
        history = random_history(item_ids, behaviors, seed=200 + seed)
        response = client.rank(f"u-attr-{seed}", recent_events=history, k=12)
        shown[response.request_id] = (response.model_version, [item.item_id for item in response.items])
        expected[(LISTS, (("model_version", response.model_version),))] += 1
    # a RankBatch answer is remembered under each entry's request id too
    batch = client.rank_batch([ranking_pb2.RankRequest(user_id="u-attr-batch", request_id="attr-batch-0",
                                                       recent_events=[ranking_pb2.Event(item_id=item_ids[5])])])
    (result,) = batch.results
    shown[result.response.request_id] = (result.response.model_version, [i.item_id for i in result.response.items])
    expected[(LISTS, (("model_version", result.response.model_version),))] += 1

    request_ids = list(shown)
    for n, request_id in enumerate(request_ids):
        version, items = shown[request_id]
        on_list = [items[p] for p in (0, 1, 2, 5, 11) if p < len(items)]  # positions 1, 2, 3, 6, 12
        off_list = [raw for raw in item_ids[1:] if raw not in items][:2]
        events = [Event(raw, behaviors[(n + i) % len(behaviors)]) for i, raw in enumerate(on_list + off_list)]
        events.append(Event(on_list[0], ""))  # unspecified behaviour
        key = f"attr-{n}"
        client.record_after_list(f"u-attr-{n}", request_id, events, idempotency_key=key)
        client.record_after_list(f"u-attr-{n}", request_id, events, idempotency_key=key)  # a retry: counted once
        for event in events:
            position = items.index(event.raw_item_id) + 1 if event.raw_item_id in items else None
            labels = (("behavior", event.behavior or "unspecified"), ("model_version", version),
                      ("position_bucket", bucket(position)))
            expected[(ATTRIBUTED, labels)] += 1
    # a list this replica never served: stored, counted as unattributed only
    client.record_after_list("u-attr-x", "never-served", [Event(item_ids[3], behaviors[0])] * 3)
    expected[(UNATTRIBUTED, ())] += 3
    # events without a list id change nothing
    client.record({"u-attr-plain": [Event(item_ids[4], behaviors[0])]})

    got = wait_for(service, before, expected)
    assert got == expected


def test_a_bad_list_request_id_is_invalid_argument_naming_the_field(service, client, item_ids):
    import grpc
    import pytest

    for bad in ("x" * 129, "tab\there", "rlo\u202e"):
        with pytest.raises(grpc.RpcError) as error:
            client.record_after_list("u-attr-bad", bad, [Event(item_ids[1], "")])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "users[0].events[0].list_request_id" in error.value.details()
