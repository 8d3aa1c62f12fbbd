"""Request protos -> typed, validated queries. Every input check of the service lives here.

Each failure raises `InvalidArgument(field, reason)` where `field` is the request path
(`recent_events[3].item_id`) and `reason` states the allowed range and the value received, so a caller can
fix the request from the message alone. Pure functions: the model's vocabulary comes in as arguments.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass
from typing import Mapping, Sequence

from seqrank.serving.errors import InvalidArgument, shown
from seqrank.serving.history.events import Event, UserEvents
from seqrank.training.vocab import UNSPECIFIED_BEHAVIOR
from seqrank.v1 import ranking_pb2


@dataclass(frozen=True)
class Limits:
    """Serve-config section: request bounds and defaults for unset request fields."""

    max_k: int = 100
    max_candidates: int = 1000  # candidate_pool_size upper bound (retrieval fetch before re-ranking)
    max_inline_events: int = 200  # RankRequest.recent_events; the encoder reads only its newest max_len
    max_exclude_ids: int = 1000
    max_events_per_call: int = 1000  # RecordEvents, all users together
    max_users_per_call: int = 100
    max_id_length: int = 128  # user, item, request ids and idempotency keys, in characters
    default_k: int = 10
    default_candidates: int = 200  # raised to k when k is larger
    default_diversity: float = 0.3  # MMR lambda when the request leaves `diversity` unset
    # Event.timestamp may lie at most this far past the server clock (clock skew). A later one would stay the
    # user's newest event forever and drive the transition prior; a millisecond timestamp lands far above too.
    max_future_s: int = 300
    max_request_candidates: int = 2000  # RankRequest.candidate_item_ids: a search page's matching items
    max_filter_values: int = 100  # AttributeFilter.include_any / exclude_any, each
    max_batch_requests: int = 100  # RankBatchRequest.requests
    max_items_per_call: int = 1000  # UpsertItems items, SetItemAvailability item ids
    max_attributes_per_item: int = 32  # ItemUpsert.attributes

    def __post_init__(self) -> None:
        for name in ("max_k", "max_candidates", "max_inline_events", "max_exclude_ids", "max_events_per_call",
                     "max_users_per_call", "max_id_length", "max_request_candidates", "max_filter_values",
                     "max_batch_requests", "max_items_per_call", "max_attributes_per_item"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"limits.default_k: must be in [1, max_k={self.max_k}], got {self.default_k}")
        if self.max_candidates < self.max_k:
            raise ValueError(f"limits.max_candidates: must be >= max_k={self.max_k}, got {self.max_candidates}")
        if not 1 <= self.default_candidates <= self.max_candidates:
            raise ValueError(f"limits.default_candidates: must be in [1, max_candidates={self.max_candidates}], "
                             f"got {self.default_candidates}")
        if not 0.0 <= self.default_diversity <= 1.0:  # also false for NaN
            raise ValueError(f"limits.default_diversity: must be in [0, 1], got {self.default_diversity}")
        if self.max_future_s < 0:
            raise ValueError(f"limits.max_future_s: must be >= 0, got {self.max_future_s}")


@dataclass(frozen=True)
class RankQuery:
    """A validated RankRequest with defaults applied."""

    user_id: str
    inline_events: tuple[Event, ...]  # oldest first; empty = use the history store
    k: int
    num_candidates: int  # >= k
    diversity: float  # MMR lambda in [0, 1]
    exclude_item_indices: frozenset[int]  # internal indices of the known exclude_item_ids
    exclude_seen: bool
    request_id: str  # "" = the server assigns one
    candidate_item_ids: tuple[str, ...] = ()  # known caller candidates, in request order; () = retrieve
    unknown_candidate_ids: tuple[str, ...] = ()  # caller candidates the catalogue does not know
    include_any: tuple[str, ...] = ()  # attribute values; () = no restriction
    exclude_any: tuple[str, ...] = ()
    min_catalogue_version: int = 0  # the live catalogue version the answer must include

    @property
    def filtered(self) -> bool:
        return bool(self.include_any or self.exclude_any)


@dataclass(frozen=True)
class ListEvent:
    """A validated event that names the Rank list it follows (`Event.list_request_id`; serving/attribution.py)."""

    list_request_id: str
    raw_item_id: str
    behavior: str  # behaviour name; "" = unspecified


@dataclass(frozen=True)
class EventBatch:
    """A validated RecordEventsRequest."""

    users: tuple[UserEvents, ...]
    idempotency_key: str | None
    list_events: tuple[ListEvent, ...] = ()  # the events with a list_request_id, in request order

    @property
    def num_events(self) -> int:
        return sum(len(user.events) for user in self.users)


UNKNOWN_ITEM_REASON = "unknown item id"  # how a message about an item the catalogue does not hold begins


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # false for NaN too
        raise InvalidArgument(field, f"must be in [{low}, {high}], got {value}")


def _check_count(field: str, count: int, maximum: int, minimum: int = 0) -> None:
    if not minimum <= count <= maximum:
        raise InvalidArgument(field, f"must hold between {minimum} and {maximum} entries, got {count}")


def _check_id(field: str, value: str, limits: Limits, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(field, "must be a non-empty string")
    if len(value) > limits.max_id_length:
        raise InvalidArgument(field, f"must be at most {limits.max_id_length} characters, got {len(value)}")


def _check_list_request_id(field: str, value: str, limits: Limits) -> None:
    """Optional; at most max_id_length characters, printable: no Unicode category C (control, format, surrogate,
    private use, unassigned) and no separator Z other than the ASCII space (log lines and label-free ids)."""
    _check_id(field, value, limits, required=False)
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category[0] == "C" or (category[0] == "Z" and char != " "):
            raise InvalidArgument(field, f"must be printable (no control, format or separator characters besides "
                                         f"the space), got {char!r} (U+{ord(char):04X}) at character {position}")


def _check_event(
    field: str,
    event: ranking_pb2.Event,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
    now_s: float,
) -> Event:
    _check_id(f"{field}.item_id", event.item_id, limits)
    if event.item_id not in item_index_of:
        raise InvalidArgument(f"{field}.item_id", f"{UNKNOWN_ITEM_REASON} {shown(event.item_id)} (not in the catalogue)")
    if event.behavior != UNSPECIFIED_BEHAVIOR and event.behavior not in behavior_names:
        allowed = ", ".join(repr(name) for name in (UNSPECIFIED_BEHAVIOR, *behavior_names))
        raise InvalidArgument(f"{field}.behavior", f"must be one of {allowed}, got {shown(event.behavior)}")
    timestamp_s = None
    if event.HasField("timestamp"):
        timestamp_s = event.timestamp
        latest = int(now_s) + limits.max_future_s
        if not 0 <= timestamp_s <= latest:
            raise InvalidArgument(
                f"{field}.timestamp", f"must be Unix seconds in [0, {latest}] (the server clock plus "
                                      f"{limits.max_future_s} s), got {timestamp_s}"
            )
    _check_id(f"{field}.event_id", event.event_id, limits, required=False)
    _check_list_request_id(f"{field}.list_request_id", event.list_request_id, limits)
    return Event(raw_item_id=event.item_id, behavior=event.behavior, timestamp_s=timestamp_s, event_id=event.event_id)


def _check_events(
    field: str,
    events: Sequence[ranking_pb2.Event],
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
    now_s: float,
) -> tuple[Event, ...]:
    return tuple(_check_event(f"{field}[{i}]", event, limits, item_index_of, behavior_names, now_s)
                 for i, event in enumerate(events))


def validate_rank_request(
    request: ranking_pb2.RankRequest,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
    now_s: float | None = None,
) -> RankQuery:
    """Checks every RankRequest field against `limits` and the model's vocabulary; applies defaults. `now_s`:
    the server clock timestamps are bounded by (None = time.time())."""
    now_s = time.time() if now_s is None else now_s
    _check_id("user_id", request.user_id, limits)
    _check_id("request_id", request.request_id, limits, required=False)

    k = request.k if request.HasField("k") else limits.default_k
    _check_range("k", k, 1, limits.max_k)
    if request.HasField("candidate_pool_size"):
        num_candidates = request.candidate_pool_size
        _check_range("candidate_pool_size", num_candidates, k, limits.max_candidates)
    else:
        num_candidates = max(limits.default_candidates, k)
    diversity = request.diversity if request.HasField("diversity") else limits.default_diversity
    _check_range("diversity", diversity, 0.0, 1.0)

    _check_count("recent_events", len(request.recent_events), limits.max_inline_events)
    inline_events = _check_events("recent_events", request.recent_events, limits, item_index_of, behavior_names,
                                  now_s)

    _check_count("exclude_item_ids", len(request.exclude_item_ids), limits.max_exclude_ids)
    for i, raw_item_id in enumerate(request.exclude_item_ids):
        _check_id(f"exclude_item_ids[{i}]", raw_item_id, limits)
    # Unknown ids are skipped on purpose: the model cannot return them, so excluding them is already true.
    exclude_item_indices = frozenset(
        item_index_of[raw_item_id] for raw_item_id in request.exclude_item_ids if raw_item_id in item_index_of
    )
    _check_unique_ids("candidate_item_ids", request.candidate_item_ids, limits.max_request_candidates, limits,
                      minimum=0)
    known = tuple(raw for raw in request.candidate_item_ids if raw in item_index_of)
    unknown = tuple(raw for raw in request.candidate_item_ids if raw not in item_index_of)
    include_any = _check_values("filter.include_any", request.filter.include_any, limits)
    exclude_any = _check_values("filter.exclude_any", request.filter.exclude_any, limits)
    return RankQuery(
        user_id=request.user_id,
        inline_events=inline_events,
        k=k,
        num_candidates=num_candidates,
        diversity=diversity,
        exclude_item_indices=exclude_item_indices,
        exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
        request_id=request.request_id,
        candidate_item_ids=known,
        unknown_candidate_ids=unknown,
        include_any=include_any,
        exclude_any=exclude_any,
        min_catalogue_version=_check_version("min_catalogue_version", request.min_catalogue_version),
    )


def _check_version(field: str, version: int) -> int:
    if version < 0:
        raise InvalidArgument(field, f"must be >= 0, got {version}")
    return version


def _check_values(field: str, values: Sequence[str], limits: Limits) -> tuple[str, ...]:
    _check_count(field, len(values), limits.max_filter_values)
    for i, value in enumerate(values):
        _check_id(f"{field}[{i}]", value, limits)
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class ItemUpserts:
    """A validated UpsertItemsRequest: (raw id, attribute values) per item, in request order."""

    items: tuple[tuple[str, tuple[str, ...]], ...]
    idempotency_key: str | None


@dataclass(frozen=True)
class AvailabilityChange:
    """A validated SetItemAvailabilityRequest."""

    item_ids: tuple[str, ...]
    available: bool
    idempotency_key: str | None


def _check_unique_ids(field: str, raw_item_ids: Sequence[str], maximum: int, limits: Limits, minimum: int = 1) -> None:
    """Between minimum and maximum ids, each a valid id, none repeated (the message names the repeat)."""
    _check_count(field, len(raw_item_ids), maximum, minimum)
    seen: set[str] = set()
    for i, raw_item_id in enumerate(raw_item_ids):
        _check_id(f"{field}[{i}]", raw_item_id, limits)
        if raw_item_id in seen:
            raise InvalidArgument(f"{field}[{i}]", f"repeats {shown(raw_item_id)}; each item once per call")
        seen.add(raw_item_id)


def validate_upsert_items_request(request: ranking_pb2.UpsertItemsRequest, limits: Limits) -> ItemUpserts:
    """Ids and attribute values within their limits, each item once; any new or known id is fine."""
    _check_unique_ids("items", [item.item_id for item in request.items], limits.max_items_per_call, limits)
    _check_id("idempotency_key", request.idempotency_key, limits, required=False)
    items = []
    for i, item in enumerate(request.items):
        _check_count(f"items[{i}].attributes", len(item.attributes), limits.max_attributes_per_item)
        for j, value in enumerate(item.attributes):
            _check_id(f"items[{i}].attributes[{j}]", value, limits)
        items.append((item.item_id, tuple(dict.fromkeys(item.attributes))))
    return ItemUpserts(tuple(items), request.idempotency_key or None)


def validate_set_item_availability_request(
    request: ranking_pb2.SetItemAvailabilityRequest, limits: Limits, item_index_of: Mapping[str, int]
) -> AvailabilityChange:
    """Known items only (trained or upserted): hiding an id the catalogue never held is a caller's mistake."""
    _check_unique_ids("item_ids", request.item_ids, limits.max_items_per_call, limits)
    _check_id("idempotency_key", request.idempotency_key, limits, required=False)
    for i, raw_item_id in enumerate(request.item_ids):
        if raw_item_id not in item_index_of:
            raise InvalidArgument(f"item_ids[{i}]", f"{UNKNOWN_ITEM_REASON} {shown(raw_item_id)} (not in the "
                                                    "catalogue; add it with UpsertItems first)")
    return AvailabilityChange(tuple(request.item_ids), request.available, request.idempotency_key or None)


def validate_rank_batch_request(request: ranking_pb2.RankBatchRequest, limits: Limits) -> None:
    """The batch's own bound; each request is then validated on its own."""
    _check_count("requests", len(request.requests), limits.max_batch_requests, minimum=1)


def validate_record_events_request(
    request: ranking_pb2.RecordEventsRequest,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
    now_s: float | None = None,
) -> EventBatch:
    """Checks users, their events and the idempotency key; the whole request is rejected on the first error.
    `now_s`: the server clock timestamps are bounded by (None = time.time())."""
    now_s = time.time() if now_s is None else now_s
    _check_count("users", len(request.users), limits.max_users_per_call, minimum=1)
    num_events = sum(len(user.events) for user in request.users)
    if num_events > limits.max_events_per_call:
        raise InvalidArgument(
            "users", f"must hold at most {limits.max_events_per_call} events in all, got {num_events}"
        )
    _check_id("idempotency_key", request.idempotency_key, limits, required=False)
    users = []
    for i, user in enumerate(request.users):
        _check_id(f"users[{i}].user_id", user.user_id, limits)
        _check_count(f"users[{i}].events", len(user.events), limits.max_events_per_call, minimum=1)
        events = _check_events(f"users[{i}].events", user.events, limits, item_index_of, behavior_names, now_s)
        users.append(UserEvents(user_id=user.user_id, events=events))
    list_events = tuple(ListEvent(sent.list_request_id, sent.item_id, sent.behavior)
                        for user in request.users for sent in user.events if sent.list_request_id)
    return EventBatch(users=tuple(users), idempotency_key=request.idempotency_key or None, list_events=list_events)
