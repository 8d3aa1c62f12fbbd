"""Hypothesis strategies for hostile RankRequest and RecordEventsRequest messages, and the settings profiles.

Every field gets valid values (known items, behaviour names, in-range knobs) mixed with hostile ones: empty,
huge, negative, NaN and infinite, boundary values, unicode (NUL, emoji, combining marks, RTL), SQL and path
fragments, duplicates, and lists around and far beyond their limits. Strings that repeat fill lists far beyond
their limits cheaply while keeping a message below the proxy's size limit; only single fields get the huge
strings. Used by the pure validation fuzz (tests/serving) and the end-to-end fuzz over real gRPC (tests/e2e).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from seqrank.v1 import ranking_pb2 as pb

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
NASTY_STRINGS = ("", " ", "\x00", "a\x00b", "\u202eevil", "e\u0301", "🙂", "🙂" * 40, "' OR 1=1 --", "../../etc/passwd",
                 "\ud7ff\ue000", "\n", "Bearer x", "%s%n", "seqrank:history:seq")
FUZZ_USER_PREFIX = "fuzz-"  # users written by the end-to-end fuzz, apart from other tests' users

settings.register_profile(
    "seqrank-fuzz",  # the default: a few hundred requests over real gRPC in well under a minute on 2 cores
    max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile("seqrank-fuzz-long", parent=settings.get_profile("seqrank-fuzz"), max_examples=2000)
FUZZ_PROFILE = os.environ.get("SEQRANK_FUZZ_PROFILE", "seqrank-fuzz")


def fuzz_settings(scale: float = 1.0) -> settings:
    """The active fuzz profile ($SEQRANK_FUZZ_PROFILE), its example count scaled (cheap pure tests run more)."""
    profile = settings.get_profile(FUZZ_PROFILE)
    return settings(profile, max_examples=max(1, int(profile.max_examples * scale)))


def bounded_text() -> st.SearchStrategy[str]:
    """Strings up to a little past the id limit (128): safe to repeat a thousand times in one message."""
    return st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=12), st.text(min_size=120, max_size=140))


def any_text() -> st.SearchStrategy[str]:
    """Also huge strings (up to 40k characters): for single fields only."""
    huge = st.builds(lambda char, n: char * n, st.characters(), st.integers(129, 40_000))
    return st.one_of(bounded_text(), huge)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


def int32_values(valid_low: int, valid_high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(valid_low, valid_high), st.integers(valid_low - 3, valid_high + 3),
                     st.sampled_from([0, -1, INT32[0], INT32[1]]), st.integers(*INT32))


def repeated(strategy: st.SearchStrategy, low: int, high: int) -> st.SearchStrategy[list]:
    """Long lists of one value: duplicates, and sizes around and beyond a limit, without generating each entry."""
    return st.builds(lambda value, n: [value] * n, strategy, st.integers(low, high))


def lists(strategy: st.SearchStrategy, limit: int) -> st.SearchStrategy[list]:
    """Short lists, or one value repeated up to a little past `limit` entries."""
    return st.one_of(st.lists(strategy, max_size=5), repeated(strategy, limit - 2, limit + 3))


def item_ids(known: Sequence[str], text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(list(known)), text)


def events(known: Sequence[str], behavior_names: Sequence[str], text: st.SearchStrategy[str]):
    timestamps = optional(st.one_of(st.integers(0, 4_102_444_800), st.integers(*INT64),
                                    st.sampled_from([-1, 4_102_444_801, 1_700_000_000_000])))
    return st.builds(
        lambda item_id, behavior, timestamp: pb.Event(item_id=item_id, behavior=behavior, timestamp=timestamp),
        item_ids(known, text), st.one_of(st.sampled_from(["", *behavior_names]), text), timestamps,
    )


def valid_events(known: Sequence[str], behavior_names: Sequence[str]):
    return st.builds(
        lambda item_id, behavior, timestamp: pb.Event(item_id=item_id, behavior=behavior, timestamp=timestamp),
        st.sampled_from(list(known)), st.sampled_from(["", *behavior_names]), optional(st.integers(0, 4_102_444_800)),
    )


def valid_id(prefix: str = "") -> st.SearchStrategy[str]:
    return st.builds(lambda text: prefix + text, st.text(min_size=1, max_size=24))


def corrupted(draw, fields: Sequence[str]) -> frozenset[str]:
    """Which fields of one request get hostile values: none, one or two, so that every check is reached
    (all-hostile requests would nearly all stop at the first field checked)."""
    return frozenset(draw(st.sets(st.sampled_from(list(fields)), max_size=2)))


RANK_FIELDS = ("user_id", "recent_events", "k", "candidate_pool_size", "diversity", "exclude_item_ids", "request_id")


def rank_requests(known: Sequence[str], behavior_names: Sequence[str], limits) -> st.SearchStrategy[pb.RankRequest]:
    """RankRequests across the whole field space; `limits` (serving.validation.Limits) places the boundaries."""
    hostile = {
        "user_id": st.one_of(st.sampled_from(["u1", "fuzz-user"]), any_text()),
        "recent_events": st.one_of(
            st.lists(events(known, behavior_names, any_text()), max_size=5),
            repeated(events(known, behavior_names, bounded_text()), limits.max_inline_events - 2,
                     limits.max_inline_events + 3)),
        "k": optional(int32_values(1, limits.max_k)),
        "candidate_pool_size": optional(int32_values(1, limits.max_candidates)),
        "diversity": optional(st.floats(allow_nan=True, allow_infinity=True)),
        "exclude_item_ids": st.one_of(
            st.lists(item_ids(known, any_text()), max_size=5),
            repeated(item_ids(known, bounded_text()), limits.max_exclude_ids - 2, limits.max_exclude_ids + 3)),
        "request_id": any_text(),
    }
    valid = {
        "user_id": valid_id(),
        "recent_events": st.lists(valid_events(known, behavior_names), max_size=30),
        "k": optional(st.integers(1, limits.max_k)),
        "diversity": optional(st.floats(0.0, 1.0)),
        "exclude_item_ids": st.one_of(
            st.lists(st.sampled_from(list(known)), max_size=10),
            st.lists(st.sampled_from(list(known)), max_size=min(len(known), limits.max_exclude_ids), unique=True),
            st.just(list(known)[:limits.max_exclude_ids])),  # the whole catalogue excluded
        "request_id": st.one_of(st.just(""), valid_id()),
    }

    @st.composite
    def build(draw) -> pb.RankRequest:
        bad = corrupted(draw, RANK_FIELDS)
        values = {name: draw(hostile[name] if name in bad else valid[name]) for name in valid}
        k = values["k"] if values["k"] is not None else limits.default_k
        valid_pool = optional(st.integers(min(max(k, 1), limits.max_candidates), limits.max_candidates))
        pool = draw(hostile["candidate_pool_size"] if "candidate_pool_size" in bad else valid_pool)
        request = pb.RankRequest(user_id=values["user_id"], recent_events=values["recent_events"],
                                 exclude_item_ids=values["exclude_item_ids"], request_id=values["request_id"])
        for name, value in (("k", values["k"]), ("candidate_pool_size", pool), ("diversity", values["diversity"]),
                            ("exclude_seen", draw(optional(st.booleans())))):
            if value is not None:
                setattr(request, name, value)
        return request

    return build()


RECORD_FIELDS = ("users", "user_id", "events", "idempotency_key")


def record_events_requests(known: Sequence[str], behavior_names: Sequence[str],
                           limits) -> st.SearchStrategy[pb.RecordEventsRequest]:
    """RecordEventsRequests across the whole field space; valid ones write only users named fuzz-*."""
    hostile_user_id = st.one_of(st.just(""), st.builds(lambda text: FUZZ_USER_PREFIX + text, bounded_text()),
                                st.builds(lambda char, n: char * n, st.characters(), st.integers(129, 40_000)))
    hostile_events = st.one_of(
        st.lists(events(known, behavior_names, any_text()), max_size=4),
        repeated(events(known, behavior_names, bounded_text()), limits.max_events_per_call - 2,
                 limits.max_events_per_call + 3))

    @st.composite
    def build(draw) -> pb.RecordEventsRequest:
        bad = corrupted(draw, RECORD_FIELDS)
        user_ids = hostile_user_id if "user_id" in bad else valid_id(FUZZ_USER_PREFIX)
        user_events = hostile_events if "events" in bad else st.lists(valid_events(known, behavior_names),
                                                                      min_size=1, max_size=5)
        user = st.builds(lambda user_id, evs: pb.UserEvents(user_id=user_id, events=evs), user_ids, user_events)
        if "users" in bad:
            users = draw(st.one_of(st.just([]), repeated(user, limits.max_users_per_call - 2,
                                                         limits.max_users_per_call + 3)))
        else:
            users = draw(st.lists(user, min_size=1, max_size=4))
        request = pb.RecordEventsRequest(users=users)
        # A valid key is derived from the payload: a repeated payload replays, another payload gets another key.
        payload_key = "fuzz-key-" + hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()[:32]
        request.idempotency_key = draw(any_text() if "idempotency_key" in bad else st.sampled_from(["", payload_key]))
        return request

    return build()
