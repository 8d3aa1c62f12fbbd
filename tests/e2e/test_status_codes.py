"""Bad input over real gRPC: each case its own exact status code, a message naming the field, and a service
that keeps serving afterwards."""

from __future__ import annotations

import grpc
import pytest

from seqrank.serving.history import Event
from seqrank.v1 import ranking_pb2 as pb


@pytest.fixture
def known_items(item_ids) -> list[str]:
    return item_ids[1:6]


def assert_rejected(call, code: grpc.StatusCode, field: str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()
    assert error.value.details().startswith(f"{field}: "), error.value.details()
    return error.value.details()


@pytest.fixture(autouse=True)
def still_serving_afterwards(client, known_items):
    yield
    response = client.rank("u-after-error", recent_events=[Event(known_items[0], "pv")], k=3)
    assert len(response.items) == 3


def test_k_zero_is_invalid_argument_naming_k(client, known_items):
    details = assert_rejected(lambda: client.rank("u1", k=0, recent_events=[Event(known_items[0], "pv")]),
                              grpc.StatusCode.INVALID_ARGUMENT, "k")
    assert "[1, 100]" in details and "got 0" in details


def test_negative_k_is_invalid_argument_naming_k(client):
    assert_rejected(lambda: client.rank("u1", k=-3), grpc.StatusCode.INVALID_ARGUMENT, "k")


def test_k_above_the_maximum_is_invalid_argument_naming_k(client):
    details = assert_rejected(lambda: client.rank("u1", k=101), grpc.StatusCode.INVALID_ARGUMENT, "k")
    assert "got 101" in details


def test_lambda_below_zero_is_invalid_argument_naming_diversity(client):
    details = assert_rejected(lambda: client.rank("u1", diversity=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "diversity")
    assert "[0.0, 1.0]" in details


def test_lambda_above_one_is_invalid_argument_naming_diversity(client):
    assert_rejected(lambda: client.rank("u1", diversity=1.5), grpc.StatusCode.INVALID_ARGUMENT, "diversity")


def test_unknown_item_in_inline_events_is_invalid_argument_naming_it(client, known_items):
    events = [Event(known_items[0], "pv"), Event("no-such-item", "pv")]
    details = assert_rejected(lambda: client.rank("u1", recent_events=events), grpc.StatusCode.INVALID_ARGUMENT,
                              "recent_events[1].item_id")
    assert "'no-such-item'" in details


def test_unknown_item_in_recorded_events_is_invalid_argument_and_nothing_is_stored(client, known_items):
    events = [Event(known_items[0], "pv"), Event("no-such-item", "cart")]
    assert_rejected(lambda: client.record({"u-bad-record": events}), grpc.StatusCode.INVALID_ARGUMENT,
                    "users[0].events[1].item_id")
    assert client.rank("u-bad-record").history_source == pb.HISTORY_SOURCE_FALLBACK  # all or nothing


def test_unknown_behaviour_is_invalid_argument_naming_it(client, known_items):
    assert_rejected(lambda: client.rank("u1", recent_events=[Event(known_items[0], "teleport")]),
                    grpc.StatusCode.INVALID_ARGUMENT, "recent_events[0].behavior")


def test_candidate_pool_below_k_is_invalid_argument(client):
    assert_rejected(lambda: client.rank("u1", k=10, candidate_pool_size=5), grpc.StatusCode.INVALID_ARGUMENT,
                    "candidate_pool_size")


def test_too_many_exclusions_is_invalid_argument_naming_the_list(client):
    details = assert_rejected(lambda: client.rank("u1", exclude_item_ids=[f"x{i}" for i in range(1001)]),
                              grpc.StatusCode.INVALID_ARGUMENT, "exclude_item_ids")
    assert "1001" in details


def test_too_many_inline_events_is_invalid_argument(client, known_items):
    events = [Event(known_items[i % 5], "pv") for i in range(201)]
    assert_rejected(lambda: client.rank("u1", recent_events=events), grpc.StatusCode.INVALID_ARGUMENT,
                    "recent_events")


def test_oversized_id_is_invalid_argument(client):
    assert_rejected(lambda: client.rank("u" * 129), grpc.StatusCode.INVALID_ARGUMENT, "user_id")


def test_missing_user_id_is_invalid_argument(client):
    details = assert_rejected(lambda: client.send_rank(pb.RankRequest(k=3)), grpc.StatusCode.INVALID_ARGUMENT,
                              "user_id")
    assert "non-empty" in details


def test_missing_users_in_record_events_is_invalid_argument(client):
    assert_rejected(lambda: client.send_record(pb.RecordEventsRequest()), grpc.StatusCode.INVALID_ARGUMENT, "users")


def test_missing_item_id_in_an_event_is_invalid_argument(client):
    request = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u1", events=[pb.Event(behavior="pv")])])
    assert_rejected(lambda: client.send_record(request), grpc.StatusCode.INVALID_ARGUMENT,
                    "users[0].events[0].item_id")


def test_reused_idempotency_key_with_other_events_is_failed_precondition(client, known_items):
    client.record({"u-key": [Event(known_items[0], "pv")]}, idempotency_key="e2e-key-reuse")
    assert_rejected(lambda: client.record({"u-key": [Event(known_items[1], "pv")]}, idempotency_key="e2e-key-reuse"),
                    grpc.StatusCode.FAILED_PRECONDITION, "idempotency_key")


def test_health_of_an_unknown_service_is_not_found(client):
    assert_rejected(lambda: client.health("other.Service"), grpc.StatusCode.NOT_FOUND, "service")
