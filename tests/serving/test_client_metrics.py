"""The client's Prometheus metrics over real gRPC against the scripted local server of test_client.py: one request
per client call whatever its retries, its final status code, retries by the code that caused them, latency in
seconds; nothing recorded (and no global registry touched) without a registry. The oracle is the test's own count
of the calls it made and the codes they ended with; the exposition text is read with prometheus_client's parser."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from seqrank.serving.client.metrics import CLIENT_ERROR, CODES, DURATION_BUCKETS_S, METHODS, ClientMetrics
from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.history import Event
from tests import exposition
from tests.serving.test_client import FAST, Scripted, serve

C = grpc.StatusCode
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
DELAY_S = 0.03  # the slow server's time per attempt: above the 0.025 s bucket, far below the 5 s one


class Slow(Scripted):
    """Scripted, and each attempt takes DELAY_S."""

    def _attempt(self, method, request, context):
        time.sleep(DELAY_S)
        super()._attempt(method, request, context)


def outcome(call) -> str:
    """The call's final status code name, as the test sees it."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    except ValueError:
        return CLIENT_ERROR
    return "OK"


def text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_requests_retries_and_latency_counts_match_the_calls_made(scripted):
    servicer, target = scripted
    registry = CollectorRegistry()
    seen = Counter()  # (method, final code) -> calls: the oracle
    retried = Counter()  # (method, code that caused a retry) -> retries
    # (method, scripted failures, the client call, retries it causes)
    script = [
        ("Rank", [], lambda c: c.rank("u1"), []),
        ("Rank", [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED], lambda c: c.rank("u1"), [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED]),
        ("Rank", [C.INVALID_ARGUMENT], lambda c: c.rank("u1"), []),
        ("Rank", [C.UNAVAILABLE] * FAST.max_attempts, lambda c: c.rank("u1"), [C.UNAVAILABLE] * (FAST.max_attempts - 1)),
        ("RecordEvents", [C.DEADLINE_EXCEEDED], lambda c: c.record({"u1": [Event("a", "")]}), []),  # a write: no retry
        ("RecordEvents", [C.UNAVAILABLE], lambda c: c.record({"u1": [Event("a", "")]}), [C.UNAVAILABLE]),
        ("GetModelInfo", [], lambda c: c.model_info(), []),
        ("GetModelInfo", [C.NOT_FOUND], lambda c: c.model_info(), []),
        ("Check", [], lambda c: c.health(), []),  # the scripted server has no health service: UNIMPLEMENTED
    ]
    with RankingClient(target, retry=FAST, metrics=registry) as client:
        for method, failures, call, retries in script:
            servicer.failures = list(failures)
            seen[method, outcome(lambda: call(client))] += 1
            for code in retries:
                retried[method, code.name] += 1
    assert seen["Check", "UNIMPLEMENTED"] == 1 and seen["Rank", "UNAVAILABLE"] == 1  # the script did what it says

    exported = text(registry)
    requests = exposition.values(exported, "seqrank_client_requests_total")
    assert requests == {frozenset({("method", m), ("code", c)}): float(n) for (m, c), n in seen.items()}
    retries = exposition.values(exported, "seqrank_client_retries_total")
    assert retries == {frozenset({("method", m), ("code", c)}): float(n) for (m, c), n in retried.items()}
    # attempts = requests + retries: what the server saw
    assert sum(seen.values()) - 1 + sum(retried.values()) == len(servicer.attempts)  # Check never reached it
    per_method = Counter()
    for (method, _), n in seen.items():
        per_method[method] += n
    assert exposition.values(exported, "seqrank_client_request_duration_seconds_count") == {
        frozenset({("method", m)}): float(n) for m, n in per_method.items()}
    for method, n in per_method.items():
        buckets = {float(labels["le"]): v for name, labels, v in exposition.samples(exported)
                   if name == "seqrank_client_request_duration_seconds_bucket" and labels["method"] == method}
        assert sorted(buckets) == sorted([*DURATION_BUCKETS_S, float("inf")])
        counts = [buckets[le] for le in sorted(buckets)]
        assert counts == sorted(counts) and counts[-1] == n  # cumulative, +Inf holds every call
    for sample in exposition.samples(exported):  # bounded label sets
        assert sample.labels.get("method", "Rank") in METHODS and sample.labels.get("code", "OK") in CODES
    families = {name: kind for name, kind in exposition.types(exported).items() if not name.endswith("_created")}
    assert families == {"seqrank_client_requests": "counter", "seqrank_client_retries": "counter",
                        "seqrank_client_request_duration_seconds": "histogram"}


def test_latency_is_in_seconds_and_includes_the_retries():
    servicer = Slow()
    server, target = serve(servicer)
    registry = CollectorRegistry()
    waited = []  # what the test measured around each call: an upper bound of what the client may record
    try:
        with RankingClient(target, retry=FAST, metrics=registry) as client:
            for failures in ([], [], [C.UNAVAILABLE]):  # the last call takes two attempts
                servicer.failures = failures
                started = time.perf_counter()
                client.rank("u1")
                waited.append(time.perf_counter() - started)
    finally:
        server.stop(None)
    exported = text(registry)
    recorded = exposition.value(exported, "seqrank_client_request_duration_seconds_sum", method="Rank")
    assert 4 * DELAY_S <= recorded <= sum(waited)  # 4 attempts of DELAY_S each; milliseconds would be ~1000x more
    assert exposition.value(exported, "seqrank_client_request_duration_seconds_bucket", method="Rank",
                            le="0.025") == 0.0  # every call took at least DELAY_S
    assert exposition.value(exported, "seqrank_client_request_duration_seconds_bucket", method="Rank",
                            le="5.0") == 3.0


def test_clients_sharing_a_registry_add_up_and_a_closed_client_counts_as_a_client_error(scripted):
    _, target = scripted
    registry = CollectorRegistry()
    with RankingClient(target, retry=FAST, metrics=registry) as first, \
            RankingClient(target, retry=FAST, metrics=ClientMetrics.for_registry(registry)) as second:
        first.rank("u1")
        second.rank("u1")
        second.model_info()
    assert outcome(lambda: first.rank("u1")) == CLIENT_ERROR  # closed: grpc raises ValueError, no status code
    exported = text(registry)
    assert exposition.value(exported, "seqrank_client_requests_total", method="Rank", code="OK") == 2.0
    assert exposition.value(exported, "seqrank_client_requests_total", method="Rank", code=CLIENT_ERROR) == 1.0
    assert exposition.value(exported, "seqrank_client_requests_total", method="GetModelInfo", code="OK") == 1.0


def test_without_a_registry_nothing_is_recorded_anywhere(scripted):
    servicer, target = scripted
    before = text(prometheus_client.REGISTRY)
    servicer.failures = [C.UNAVAILABLE]
    with RankingClient(target, retry=FAST) as client:
        client.rank("u1")
        assert client.retries == 1
    after = text(prometheus_client.REGISTRY)
    assert "seqrank_client" not in after and after.count("\n# TYPE") == before.count("\n# TYPE")


def test_bad_metrics_arguments_are_refused(scripted):
    _, target = scripted
    with pytest.raises(TypeError, match="metrics: must be"):
        RankingClient(target, metrics="yes")
    with pytest.raises(ValueError, match="method: must be one of"):
        ClientMetrics(CollectorRegistry()).timed("rank", lambda: None)  # the RPC name, not the client method


def test_every_client_series_passes_promtool_and_is_documented_with_its_labels():
    metrics = ClientMetrics(CollectorRegistry())
    metrics.timed("Rank", lambda: None)
    metrics.observe_retry("Rank", ValueError())
    exported = text(metrics.registry)
    problems = exposition.promtool_problems(exported)
    assert not problems, problems  # seconds, _total, HELP: Prometheus's conventions (None: no promtool here)
    rows = exposition.documented_rows(exported, DOCS.read_text())
    assert set(rows) == {"seqrank_client_requests_total", "seqrank_client_request_duration_seconds_count",
                         "seqrank_client_retries_total"}
    for name, row in rows.items():
        assert row, f"docs/metrics.md lacks {name}"
        for label in exposition.label_names(exported, name.rsplit("_", 1)[0]):
            assert f"`{label}`" in row, f"docs/metrics.md: {name} row lacks label {label}"
