"""Request protos -> typed, validated queries. Every input check of the service lives here.

Each failure raises `InvalidArgument(field, reason)` where `field` is the request path
(`recent_events[3].item_id`) and `reason` states the allowed range and the value received, so a caller can
fix the request from the message alone. Pure functions: the model's vocabulary comes in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from seqrank.serving.errors import InvalidArgument, shown
from seqrank.serving.history.events import Event, UserEvents
from seqrank.training.vocab import UNSPECIFIED_BEHAVIOR
from seqrank.v1 import ranking_pb2

# Unix seconds up to 2100-01-01; a millisecond timestamp (13 digits) lands above and is rejected, not misread.
MAX_TIMESTAMP_S = 4_102_444_800


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

    def __post_init__(self) -> None:
        for name in ("max_k", "max_candidates", "max_inline_events", "max_exclude_ids", "max_events_per_call",
                     "max_users_per_call", "max_id_length"):
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


@dataclass(frozen=True)
class EventBatch:
    """A validated RecordEventsRequest."""

    users: tuple[UserEvents, ...]
    idempotency_key: str | None

    @property
    def num_events(self) -> int:
        return sum(len(user.events) for user in self.users)


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


def _check_event(
    field: str,
    event: ranking_pb2.Event,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
) -> Event:
    _check_id(f"{field}.item_id", event.item_id, limits)
    if event.item_id not in item_index_of:
        raise InvalidArgument(f"{field}.item_id", f"unknown item id {shown(event.item_id)} (not in the serving model)")
    if event.behavior != UNSPECIFIED_BEHAVIOR and event.behavior not in behavior_names:
        allowed = ", ".join(repr(name) for name in (UNSPECIFIED_BEHAVIOR, *behavior_names))
        raise InvalidArgument(f"{field}.behavior", f"must be one of {allowed}, got {shown(event.behavior)}")
    timestamp_s = None
    if event.HasField("timestamp"):
        timestamp_s = event.timestamp
        if not 0 <= timestamp_s <= MAX_TIMESTAMP_S:
            raise InvalidArgument(
                f"{field}.timestamp", f"must be Unix seconds in [0, {MAX_TIMESTAMP_S}], got {timestamp_s}"
            )
    return Event(raw_item_id=event.item_id, behavior=event.behavior, timestamp_s=timestamp_s)


def _check_events(
    field: str,
    events: Sequence[ranking_pb2.Event],
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
) -> tuple[Event, ...]:
    return tuple(
        _check_event(f"{field}[{i}]", event, limits, item_index_of, behavior_names) for i, event in enumerate(events)
    )


def validate_rank_request(
    request: ranking_pb2.RankRequest,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
) -> RankQuery:
    """Checks every RankRequest field against `limits` and the model's vocabulary; applies defaults."""
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
    inline_events = _check_events("recent_events", request.recent_events, limits, item_index_of, behavior_names)

    _check_count("exclude_item_ids", len(request.exclude_item_ids), limits.max_exclude_ids)
    for i, raw_item_id in enumerate(request.exclude_item_ids):
        _check_id(f"exclude_item_ids[{i}]", raw_item_id, limits)
    # Unknown ids are skipped on purpose: the model cannot return them, so excluding them is already true.
    exclude_item_indices = frozenset(
        item_index_of[raw_item_id] for raw_item_id in request.exclude_item_ids if raw_item_id in item_index_of
    )
    return RankQuery(
        user_id=request.user_id,
        inline_events=inline_events,
        k=k,
        num_candidates=num_candidates,
        diversity=diversity,
        exclude_item_indices=exclude_item_indices,
        exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
        request_id=request.request_id,
    )


def validate_record_events_request(
    request: ranking_pb2.RecordEventsRequest,
    limits: Limits,
    item_index_of: Mapping[str, int],
    behavior_names: Sequence[str],
) -> EventBatch:
    """Checks users, their events and the idempotency key; the whole request is rejected on the first error."""
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
        events = _check_events(f"users[{i}].events", user.events, limits, item_index_of, behavior_names)
        users.append(UserEvents(user_id=user.user_id, events=events))
    return EventBatch(users=tuple(users), idempotency_key=request.idempotency_key or None)
