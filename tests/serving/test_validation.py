"""Every input rule: defaults apply when unset, and each rejection names its field, range and value."""

import math

import pytest

from seqrank.serving.errors import InvalidArgument
from seqrank.serving.history import Event, UserEvents
from seqrank.serving.validation import (
    EventBatch,
    Limits,
    validate_rank_request,
    validate_record_events_request,
)
from seqrank.v1 import ranking_pb2 as pb

LIMITS = Limits(max_k=50, max_candidates=300, max_inline_events=5, max_exclude_ids=3, max_events_per_call=6,
                max_users_per_call=2, max_id_length=16, default_k=10, default_candidates=100, default_diversity=0.25)
ITEM_INDEX_OF = {"sku-1": 1, "sku-2": 2, "sku-3": 3}
BEHAVIORS = ("pv", "cart", "fav", "buy")
NOW_S = 1_800_000_000  # the server clock these tests validate against
LATEST_S = NOW_S + Limits().max_future_s  # 300 s of clock skew allowed by default


def rank(**fields):
    fields.setdefault("user_id", "u1")
    return validate_rank_request(pb.RankRequest(**fields), LIMITS, ITEM_INDEX_OF, BEHAVIORS, now_s=NOW_S)


def record(users, key=""):
    request = pb.RecordEventsRequest(users=users, idempotency_key=key)
    return validate_record_events_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS, now_s=NOW_S)


def event(item="sku-1", behavior="pv", **fields):
    return pb.Event(item_id=item, behavior=behavior, **fields)


def test_unset_fields_take_the_defaults():
    query = rank()
    assert (query.k, query.num_candidates, query.diversity) == (10, 100, 0.25)
    assert query.exclude_seen is True
    assert query.inline_events == () and query.exclude_item_indices == frozenset()
    assert query.request_id == ""


def test_explicit_values_are_kept():
    query = rank(k=50, candidate_pool_size=300, diversity=0.0, exclude_seen=False, request_id="r-1",
                 recent_events=[event("sku-2", "cart", timestamp=1_700_000_000), event("sku-1", "")])
    assert (query.k, query.num_candidates, query.diversity, query.exclude_seen) == (50, 300, 0.0, False)
    assert query.inline_events == (Event("sku-2", "cart", 1_700_000_000), Event("sku-1", "", None))
    assert query.request_id == "r-1"


def test_default_candidate_pool_grows_to_k():
    assert rank(k=5).num_candidates == 100
    assert rank(k=50, candidate_pool_size=50).num_candidates == 50
    small_default = Limits(default_candidates=20)
    assert validate_rank_request(pb.RankRequest(user_id="u", k=50), small_default, {}, ()).num_candidates == 50


def test_exclude_ids_become_indices_and_unknown_ones_are_ignored():
    assert rank(exclude_item_ids=["sku-3", "new-item", "sku-1"]).exclude_item_indices == frozenset({1, 3})


@pytest.mark.parametrize(
    "fields, field, fragment",
    [
        ({"user_id": ""}, "user_id", "must be a non-empty string"),
        ({"user_id": "u" * 17}, "user_id", "at most 16 characters, got 17"),
        ({"request_id": "r" * 17}, "request_id", "at most 16 characters, got 17"),
        ({"k": 0}, "k", "must be in [1, 50], got 0"),
        ({"k": -3}, "k", "must be in [1, 50], got -3"),
        ({"k": 51}, "k", "must be in [1, 50], got 51"),
        ({"k": 20, "candidate_pool_size": 19}, "candidate_pool_size", "must be in [20, 300], got 19"),
        ({"candidate_pool_size": 301}, "candidate_pool_size", "must be in [10, 300], got 301"),
        ({"candidate_pool_size": 0}, "candidate_pool_size", "got 0"),
        ({"diversity": -0.1}, "diversity", "must be in [0.0, 1.0], got -0.1"),
        ({"diversity": 1.5}, "diversity", "must be in [0.0, 1.0], got 1.5"),
        ({"diversity": math.nan}, "diversity", "got nan"),
        ({"diversity": math.inf}, "diversity", "got inf"),
        ({"recent_events": [event()] * 6}, "recent_events", "between 0 and 5 entries, got 6"),
        ({"recent_events": [event(), event("sku-9")]}, "recent_events[1].item_id", "unknown item id 'sku-9'"),
        ({"recent_events": [event("")]}, "recent_events[0].item_id", "must be a non-empty string"),
        ({"recent_events": [event(behavior="click")]}, "recent_events[0].behavior",
         "must be one of '', 'pv', 'cart', 'fav', 'buy', got 'click'"),
        ({"recent_events": [event(timestamp=-1)]}, "recent_events[0].timestamp",
         f"must be Unix seconds in [0, {LATEST_S}] (the server clock plus 300 s), got -1"),
        ({"recent_events": [event(timestamp=LATEST_S + 1)]}, "recent_events[0].timestamp", f"got {LATEST_S + 1}"),
        ({"recent_events": [event(event_id="e" * 17)]}, "recent_events[0].event_id", "at most 16 characters"),
        ({"recent_events": [event(timestamp=1_700_000_000_000)]}, "recent_events[0].timestamp",
         "got 1700000000000"),
        ({"exclude_item_ids": ["a", "b", "c", "d"]}, "exclude_item_ids", "between 0 and 3 entries, got 4"),
        ({"exclude_item_ids": ["sku-1", ""]}, "exclude_item_ids[1]", "must be a non-empty string"),
        ({"exclude_item_ids": ["x" * 17]}, "exclude_item_ids[0]", "at most 16 characters"),
    ],
)
def test_rank_request_rejections_name_field_range_and_value(fields, field, fragment):
    with pytest.raises(InvalidArgument) as raised:
        rank(**fields)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert fragment in str(raised.value)


def test_record_events_builds_a_typed_batch():
    batch = record([pb.UserEvents(user_id="u1", events=[event("sku-1", "pv", timestamp=5), event("sku-2", "buy")]),
                    pb.UserEvents(user_id="u2", events=[event("sku-3", "")])], key="key-1")
    assert batch == EventBatch(
        users=(UserEvents("u1", (Event("sku-1", "pv", 5), Event("sku-2", "buy", None))),
               UserEvents("u2", (Event("sku-3", "", None),))),
        idempotency_key="key-1",
    )
    assert batch.num_events == 3


def test_the_timestamp_bounds_themselves_are_accepted():
    """0 and the server clock plus max_future_s are valid; one second past the latter is not (rejections above)."""
    batch = record([pb.UserEvents(user_id="u1", events=[event(timestamp=0), event(timestamp=LATEST_S)])])
    assert [e.timestamp_s for e in batch.users[0].events] == [0, LATEST_S]
    assert [e.timestamp_s for e in rank(recent_events=[event(timestamp=LATEST_S)]).inline_events] == [LATEST_S]
    strict = Limits(max_future_s=0)
    with pytest.raises(InvalidArgument, match=r"users\[0\]\.events\[0\]\.timestamp"):
        validate_record_events_request(pb.RecordEventsRequest(users=[pb.UserEvents(
            user_id="u1", events=[event(timestamp=NOW_S + 1)])]), strict, ITEM_INDEX_OF, BEHAVIORS, now_s=NOW_S)


def test_event_ids_are_carried_to_the_batch():
    batch = record([pb.UserEvents(user_id="u1", events=[event(event_id="e-1"), event()])])
    assert [e.event_id for e in batch.users[0].events] == ["e-1", ""]


def test_empty_idempotency_key_means_none():
    assert record([pb.UserEvents(user_id="u1", events=[event()])]).idempotency_key is None


@pytest.mark.parametrize(
    "users, key, field, fragment",
    [
        ([], "", "users", "between 1 and 2 entries, got 0"),
        ([pb.UserEvents(user_id=f"u{i}", events=[event()]) for i in range(3)], "", "users",
         "between 1 and 2 entries, got 3"),
        ([pb.UserEvents(user_id="u1", events=[event()] * 4), pb.UserEvents(user_id="u2", events=[event()] * 3)], "",
         "users", "at most 6 events in all, got 7"),
        ([pb.UserEvents(user_id="", events=[event()])], "", "users[0].user_id", "must be a non-empty string"),
        ([pb.UserEvents(user_id="u1", events=[event()]), pb.UserEvents(user_id="u2")], "", "users[1].events",
         "between 1 and 6 entries, got 0"),
        ([pb.UserEvents(user_id="u1", events=[event(), event("sku-404")])], "", "users[0].events[1].item_id",
         "unknown item id 'sku-404'"),
        ([pb.UserEvents(user_id="u1", events=[event(behavior="PV")])], "", "users[0].events[0].behavior",
         "got 'PV'"),
        ([pb.UserEvents(user_id="u1", events=[event(timestamp=LATEST_S + 1)])], "",
         "users[0].events[0].timestamp", f"must be Unix seconds in [0, {LATEST_S}]"),
        ([pb.UserEvents(user_id="u1", events=[event(), event(event_id="x" * 17)])], "",
         "users[0].events[1].event_id", "at most 16 characters"),
        ([pb.UserEvents(user_id="u1", events=[event()])], "k" * 17, "idempotency_key", "at most 16 characters"),
    ],
)
def test_record_events_rejections_name_field_range_and_value(users, key, field, fragment):
    with pytest.raises(InvalidArgument) as raised:
        record(users, key)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert fragment in str(raised.value)


def test_model_without_behaviour_types_accepts_only_unspecified():
    request = pb.RankRequest(user_id="u1", recent_events=[event(behavior="")])
    assert validate_rank_request(request, LIMITS, ITEM_INDEX_OF, ()).inline_events[0].behavior == ""
    with pytest.raises(InvalidArgument, match=r"recent_events\[0\].behavior: must be one of '', got 'pv'"):
        validate_rank_request(pb.RankRequest(user_id="u1", recent_events=[event()]), LIMITS, ITEM_INDEX_OF, ())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_k": 0}, "limits.max_k: must be >= 1, got 0"),
        ({"default_k": 101}, "limits.default_k: must be in [1, max_k=100], got 101"),
        ({"max_candidates": 50}, "limits.max_candidates: must be >= max_k=100, got 50"),
        ({"default_candidates": 2000}, "limits.default_candidates: must be in [1, max_candidates=1000], got 2000"),
        ({"default_diversity": math.nan}, "limits.default_diversity: must be in [0, 1], got nan"),
    ],
)
def test_inconsistent_limits_are_rejected_naming_the_field(fields, message):
    with pytest.raises(ValueError) as raised:
        Limits(**fields)
    assert str(raised.value) == message
