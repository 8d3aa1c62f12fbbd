"""Hostile and malformed requests over real gRPC to the session's service (strategies: tests/hostile.py).

Each request's answer must be exactly what the pure validation decides for it (same code, same details), or
RESOURCE_EXHAUSTED from the proxy for a message over its size limit, or FAILED_PRECONDITION for an idempotency
key reused with another payload; never INTERNAL or UNKNOWN. Accepted Rank requests must keep the documented
contract (k items unless the catalogue minus exclusions holds fewer, none excluded or seen). Afterwards the same
replicas still answer Health and a valid Rank: nothing crashed or restarted.
"""

from __future__ import annotations

import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import given

from seqrank.serving.config import AppArgs
from seqrank.serving.errors import InvalidArgument
from seqrank.serving.history import Event
from seqrank.serving.ops.serve_config_check import application
from seqrank.serving.validation import validate_rank_request, validate_record_events_request
from seqrank.v1 import ranking_pb2 as pb
from tests.hostile import fuzz_settings, rank_requests, record_events_requests

OUTCOMES: Counter = Counter()  # (rpc, status code name) over the module; printed at its end (-s)


@pytest.fixture(scope="module")
def app_args(service) -> AppArgs:
    return AppArgs.parse(application(service.config)["args"])


@pytest.fixture(scope="module")
def vocabulary(manifest, item_ids):
    known = item_ids[1:]  # index 0 is padding
    return known, {raw: index for index, raw in enumerate(item_ids) if index}, manifest["behavior_names"]


def replica_ids(service) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()
    deployments = details["applications"][service.app_name]["deployments"]
    return {replica["replica_id"] for deployment in deployments.values() for replica in deployment["replicas"]}


@pytest.fixture(scope="module", autouse=True)
def no_replica_crashed(service, client, item_ids):
    before = replica_ids(service)
    yield
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert len(client.rank("u-after-fuzz", recent_events=[Event(item_ids[1], "")], k=3).items) == 3
    assert replica_ids(service) == before  # the same replicas: none died and was replaced
    print(f"\nhostile-input outcomes over real gRPC: {dict(sorted(OUTCOMES.items()))}")


def answer(call, request):
    """(status code, details, response) of one call."""
    try:
        return grpc.StatusCode.OK, "", call(request)
    except grpc.RpcError as error:
        return error.code(), error.details(), None


def expected_verdict(validate, request, app_args, vocabulary):
    """INVALID_ARGUMENT with its details as the pure validation words them, or OK."""
    _, item_index_of, behavior_names = vocabulary
    try:
        validate(request, app_args.ingress.limits, item_index_of, behavior_names)
    except InvalidArgument as error:
        return grpc.StatusCode.INVALID_ARGUMENT, f"{error.field}: {error.reason}"
    return grpc.StatusCode.OK, ""


def check_against_verdict(rpc, code, details, request, app_args, vocabulary):
    OUTCOMES[(rpc, code.name)] += 1
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
    if request.ByteSize() > app_args.local.grpc_max_message_bytes:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        return
    expected_code, expected_details = expected_verdict(
        validate_rank_request if rpc == "Rank" else validate_record_events_request, request, app_args, vocabulary)
    if code == grpc.StatusCode.FAILED_PRECONDITION:  # a fuzzed key met again with another payload
        assert rpc == "RecordEvents" and expected_code == grpc.StatusCode.OK and request.idempotency_key
        assert details.startswith("idempotency_key: "), details
        return
    assert (code, details) == (expected_code, expected_details)


def check_ranked_list(request, response, app_args, manifest, vocabulary):
    known, _, _ = vocabulary
    k = request.k if request.HasField("k") else app_args.ingress.limits.default_k
    returned = [item.item_id for item in response.items]
    excluded = set(request.exclude_item_ids)
    seen = {event.item_id for event in request.recent_events}
    assert response.model_version == manifest["model_version"]
    assert len(returned) == len(set(returned)) <= k and not excluded & set(returned)
    if response.history_source == pb.HISTORY_SOURCE_STORE:
        return  # the stored history is not known here
    available = set(known) - excluded
    if response.history_source == pb.HISTORY_SOURCE_INLINE and request.exclude_seen is not False:
        assert not seen & set(returned)
        available -= seen
    assert len(returned) == min(k, len(available))


def test_hostile_rank_requests(client, service, app_args, manifest, vocabulary):
    known, _, behavior_names = vocabulary

    @fuzz_settings()
    @given(rank_requests(known, behavior_names, app_args.ingress.limits))
    def run(request):
        code, details, response = answer(client.send_rank, request)
        check_against_verdict("Rank", code, details, request, app_args, vocabulary)
        if code == grpc.StatusCode.OK:
            check_ranked_list(request, response, app_args, manifest, vocabulary)

    run()


def test_hostile_record_events_requests(client, app_args, vocabulary):
    known, _, behavior_names = vocabulary

    @fuzz_settings(scale=0.7)
    @given(record_events_requests(known, behavior_names, app_args.ingress.limits))
    def run(request):
        code, details, response = answer(client.send_record, request)
        check_against_verdict("RecordEvents", code, details, request, app_args, vocabulary)
        if code == grpc.StatusCode.OK:
            assert response.accepted == sum(len(user.events) for user in request.users)
            assert response.stored + response.duplicates_ignored == response.accepted

    run()


def test_a_message_over_the_size_limit_is_resource_exhausted_at_once(client, app_args):
    limit = app_args.local.grpc_max_message_bytes
    started = time.monotonic()
    code, details, _ = answer(client.send_rank, pb.RankRequest(user_id="u" * (limit + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(limit) in details, (code, details)
    assert time.monotonic() - started < 10.0  # refused by the proxy, far inside its 30 s request timeout
    OUTCOMES[("Rank", code.name)] += 1


def test_huge_echoed_values_keep_their_code_and_a_short_message(client, item_ids):
    """Values echoed in status details travel in HTTP/2 trailers: a 100k-character one once turned
    INVALID_ARGUMENT into the client's RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit'."""
    huge = "x" * 100_000
    code, details, _ = answer(client.send_rank, pb.RankRequest(
        user_id="u1", recent_events=[pb.Event(item_id=item_ids[1], behavior=huge)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("recent_events[0].behavior: ")
    assert "(100000 characters)" in details and len(details) < 400
    with pytest.raises(grpc.RpcError) as error:
        client.health(huge)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and error.value.details().startswith("service: ")


def test_an_expired_deadline_is_deadline_exceeded_at_once(service, item_ids):
    with service.client(timeout_s=0.001) as hurried:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            hurried.rank("u-deadline", recent_events=[Event(item_ids[1], "")])
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5.0  # the 1 ms deadline ends the call, not the proxy's 30 s timeout
