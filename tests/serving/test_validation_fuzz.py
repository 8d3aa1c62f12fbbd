"""Hostile requests against the pure validation (tests/hostile.py): every request is either a query that keeps
every documented bound or an InvalidArgument whose field is a real path of that request, with short details."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import event, given

from seqrank.serving.errors import MAX_DETAILS_CHARS, InvalidArgument, status_details
from seqrank.serving.validation import MAX_TIMESTAMP_S, Limits, validate_rank_request, validate_record_events_request
from tests.hostile import fuzz_settings, rank_requests, record_events_requests

KNOWN = [f"sku-{i}" for i in range(1, 40)]
ITEM_INDEX_OF = {raw: index for index, raw in enumerate(KNOWN, start=1)}
BEHAVIORS = ["pv", "cart", "fav", "buy"]
LIMITS = Limits()
PATH_PART = re.compile(r"^([a-z_]+)(?:\[(\d+)\])?$")


def field_value(message, path: str):
    """The value at `path` (e.g. `users[3].events[0].item_id`) of a proto message; KeyError if there is none."""
    value = message
    for part in path.split("."):
        match = PATH_PART.match(part)
        if match is None or match.group(1) not in value.DESCRIPTOR.fields_by_name:
            raise KeyError(f"{path}: {part!r} is not a field of {value.DESCRIPTOR.name}")
        value = getattr(value, match.group(1))
        if match.group(2) is not None:
            value = value[int(match.group(2))]  # IndexError names a bad index
    return value


def assert_names_a_real_field(error: InvalidArgument, request) -> None:
    event(f"rejected: {re.sub(r'[0-9]+', 'N', error.field)}")  # --hypothesis-show-statistics
    field_value(request, error.field)
    assert error.reason and len(status_details(error)) <= MAX_DETAILS_CHARS


def event_is_valid(event) -> bool:
    return (0 < len(event.item_id) <= LIMITS.max_id_length and event.item_id in ITEM_INDEX_OF
            and event.behavior in ("", *BEHAVIORS)
            and (not event.HasField("timestamp") or 0 <= event.timestamp <= MAX_TIMESTAMP_S))


@fuzz_settings(scale=3)
@given(rank_requests(KNOWN, BEHAVIORS, LIMITS))
def test_rank_requests_are_a_bounded_query_or_name_their_field(request):
    try:
        query = validate_rank_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
    except InvalidArgument as error:
        assert_names_a_real_field(error, request)
        return
    event("accepted")
    # Accepted: every bound holds, whatever the request said.
    assert 0 < len(query.user_id) <= LIMITS.max_id_length and len(query.request_id) <= LIMITS.max_id_length
    assert 1 <= query.k <= LIMITS.max_k and query.k <= query.num_candidates <= LIMITS.max_candidates
    assert 0.0 <= query.diversity <= 1.0 and not math.isnan(query.diversity)
    assert len(query.inline_events) == len(request.recent_events) <= LIMITS.max_inline_events
    assert all(event_is_valid(event) for event in request.recent_events)
    assert len(request.exclude_item_ids) <= LIMITS.max_exclude_ids
    assert query.exclude_item_indices <= set(ITEM_INDEX_OF.values())


@fuzz_settings(scale=3)
@given(record_events_requests(KNOWN, BEHAVIORS, LIMITS))
def test_record_events_requests_are_a_bounded_batch_or_name_their_field(request):
    try:
        batch = validate_record_events_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
    except InvalidArgument as error:
        assert_names_a_real_field(error, request)
        return
    event("accepted")
    assert 1 <= len(batch.users) <= LIMITS.max_users_per_call
    assert batch.num_events <= LIMITS.max_events_per_call
    assert all(0 < len(user.user_id) <= LIMITS.max_id_length and user.events for user in batch.users)
    assert all(event_is_valid(event) for user in request.users for event in user.events)
    assert len(request.idempotency_key) <= LIMITS.max_id_length


def test_a_huge_unknown_behaviour_is_echoed_cut_short():
    from seqrank.v1 import ranking_pb2 as pb

    request = pb.RankRequest(user_id="u1", recent_events=[pb.Event(item_id="sku-1", behavior="x" * 100_000)])
    with pytest.raises(InvalidArgument) as error:
        validate_rank_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
    assert error.value.field == "recent_events[0].behavior"
    assert "(100000 characters)" in error.value.reason and len(status_details(error.value)) < 300


def test_field_paths_resolve_and_bad_ones_do_not():
    from seqrank.v1 import ranking_pb2 as pb

    request = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u", events=[pb.Event(item_id="a")])])
    assert field_value(request, "users[0].events[0].item_id") == "a"
    with pytest.raises(KeyError):
        field_value(request, "users[0].item")
    with pytest.raises(IndexError):
        field_value(request, "users[1]")
