"""Hostile and valid requests against the pure validation, each decision judged by a reference predicate.

The predicate below restates the documented rules (the comments of protos/seqrank/v1/ranking.proto and the
limits table of docs/api.md, with the default limits) without calling the validator. For every request it lists
the fields that break a rule (`wrong`) and the fields whose verdict this file leaves open (`undecided`); the
validator must then
  - reject a request with a wrong field, naming one of its wrong (or undecided) fields;
  - accept a request with neither, returning exactly what was asked for, defaults applied;
  - accept a request with undecided fields only, or reject it naming one of them.
Undecided: an Event.timestamp of 0 or later than a day ago. How far past the server clock a timestamp may lie
(limits.max_future_s) is pinned down by tests/serving/test_validation.py against a fixed clock; here every
timestamp of a valid request lies in [1, now - 1 day], valid whatever that bound is.

Hostile requests come from tests/hostile.py; half of them get their undecided timestamps moved into that settled
range so that their decisions count too. Valid requests come from strategies here, boundaries included.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from seqrank.serving.errors import MAX_DETAILS_CHARS, InvalidArgument, status_details
from seqrank.serving.validation import Limits, validate_rank_request, validate_record_events_request
from seqrank.v1 import ranking_pb2 as pb
from tests.hostile import NASTY_STRINGS, any_text, fuzz_settings, optional, rank_requests, record_events_requests

KNOWN = [f"sku-{i}" for i in range(1, 40)]
ITEM_INDEX_OF = {raw: index for index, raw in enumerate(KNOWN, start=1)}
BEHAVIORS = ["pv", "cart", "fav", "buy"]
LIMITS = Limits()
PATH_PART = re.compile(r"^([a-z_]+)(?:\[(\d+)\])?$")

# The documented limits (docs/api.md "Limits") and defaults of unset fields (ranking.proto, serve_config.yaml).
MAX_K, MAX_CANDIDATES = 100, 1000
MAX_INLINE_EVENTS, MAX_EXCLUDE_IDS = 200, 1000
MAX_EVENTS_PER_CALL, MAX_USERS_PER_CALL = 1000, 100
MAX_ID_LENGTH = 128  # characters, for every id and the idempotency key
DEFAULT_K, DEFAULT_CANDIDATES, DEFAULT_DIVERSITY = 10, 200, 0.3
SETTLED_TIMESTAMPS = (1, int(time.time()) - 86_400)  # valid under any bound on future timestamps
HAS_EVENT_ID = "event_id" in pb.Event.DESCRIPTOR.fields_by_name  # "at most limits.max_id_length characters"
HAS_LIST_REQUEST_ID = "list_request_id" in pb.Event.DESCRIPTOR.fields_by_name


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


# ------------------------------------------------------------------------------------- the reference predicate


@dataclass
class Verdict:
    wrong: set[str] = field(default_factory=set)  # paths of fields that break a documented rule
    undecided: set[str] = field(default_factory=set)  # paths whose verdict this file leaves open


def check_id(verdict: Verdict, path: str, value: str, required: bool) -> None:
    """Ids: at most MAX_ID_LENGTH characters; required ones non-empty."""
    if (required and not value) or len(value) > MAX_ID_LENGTH:
        verdict.wrong.add(path)


def check_event(verdict: Verdict, path: str, sent: pb.Event) -> None:
    """An item the model knows; a behaviour name or ""; Unix seconds, never negative; an optional event id."""
    check_id(verdict, f"{path}.item_id", sent.item_id, required=True)
    if sent.item_id not in ITEM_INDEX_OF:
        verdict.wrong.add(f"{path}.item_id")
    if sent.behavior not in ("", *BEHAVIORS):
        verdict.wrong.add(f"{path}.behavior")
    if sent.HasField("timestamp"):
        if sent.timestamp < 0:
            verdict.wrong.add(f"{path}.timestamp")
        elif not SETTLED_TIMESTAMPS[0] <= sent.timestamp <= SETTLED_TIMESTAMPS[1]:
            verdict.undecided.add(f"{path}.timestamp")
    if HAS_EVENT_ID:
        check_id(verdict, f"{path}.event_id", sent.event_id, required=False)
    if HAS_LIST_REQUEST_ID:  # "at most limits.max_id_length characters, printable only: no character of Unicode
        # category C ... and no separator (Z) other than the ASCII space"
        check_id(verdict, f"{path}.list_request_id", sent.list_request_id, required=False)
        if any(unicodedata.category(char)[0] == "C" or (unicodedata.category(char)[0] == "Z" and char != " ")
               for char in sent.list_request_id):
            verdict.wrong.add(f"{path}.list_request_id")


def rank_verdict(request: pb.RankRequest) -> Verdict:
    verdict = Verdict()
    check_id(verdict, "user_id", request.user_id, required=True)
    check_id(verdict, "request_id", request.request_id, required=False)
    k = request.k if request.HasField("k") else DEFAULT_K
    if not 1 <= k <= MAX_K:
        verdict.wrong.add("k")
    if request.HasField("candidate_pool_size") and not k <= request.candidate_pool_size <= MAX_CANDIDATES:
        verdict.wrong.add("candidate_pool_size")  # "must be at least k"
    if request.HasField("diversity") and not 0.0 <= request.diversity <= 1.0:  # NaN too
        verdict.wrong.add("diversity")
    if len(request.recent_events) > MAX_INLINE_EVENTS:
        verdict.wrong.add("recent_events")
    for i, sent in enumerate(request.recent_events):
        check_event(verdict, f"recent_events[{i}]", sent)
    if len(request.exclude_item_ids) > MAX_EXCLUDE_IDS:
        verdict.wrong.add("exclude_item_ids")
    for i, raw_item_id in enumerate(request.exclude_item_ids):  # unknown ids are fine: "ignored"
        check_id(verdict, f"exclude_item_ids[{i}]", raw_item_id, required=True)
    return verdict


def record_events_verdict(request: pb.RecordEventsRequest) -> Verdict:
    verdict = Verdict()
    if not 1 <= len(request.users) <= MAX_USERS_PER_CALL:
        verdict.wrong.add("users")
    if sum(len(user.events) for user in request.users) > MAX_EVENTS_PER_CALL:  # "events in all"
        verdict.wrong.add("users")
    check_id(verdict, "idempotency_key", request.idempotency_key, required=False)
    for i, user in enumerate(request.users):
        check_id(verdict, f"users[{i}].user_id", user.user_id, required=True)
        if not user.events:  # a user entry appends events; an empty one is a malformed request
            verdict.wrong.add(f"users[{i}].events")
        for j, sent in enumerate(user.events):
            check_event(verdict, f"users[{i}].events[{j}]", sent)
    return verdict


def decide(validate, request, verdict: Verdict):
    """The validator's answer, checked against the verdict; None when it rejected the request."""
    try:
        result = validate(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
    except InvalidArgument as error:
        assert_names_a_real_field(error, request)
        assert verdict.wrong or verdict.undecided, f"a valid request was rejected: {status_details(error)}"
        assert error.field in verdict.wrong | verdict.undecided, \
            f"rejected naming {error.field!r}, but the broken fields are {sorted(verdict.wrong)[:5]}"
        return None
    assert not verdict.wrong, f"accepted although {sorted(verdict.wrong)[:5]} break a documented rule"
    event("accepted")
    return result


def assert_events_are_the_sent_ones(events, sent_events) -> None:
    assert [(e.raw_item_id, e.behavior) for e in events] == [(s.item_id, s.behavior) for s in sent_events]
    for stored, sent in zip(events, sent_events):
        if sent.HasField("timestamp"):
            assert stored.timestamp_s == sent.timestamp


def assert_query_is_the_request(query, request: pb.RankRequest) -> None:
    """An accepted RankRequest means exactly what it said, the documented defaults filling what it left unset."""
    k = request.k if request.HasField("k") else DEFAULT_K
    assert (query.user_id, query.request_id, query.k) == (request.user_id, request.request_id, k)
    expected_pool = request.candidate_pool_size if request.HasField("candidate_pool_size") else max(DEFAULT_CANDIDATES, k)
    assert query.num_candidates == expected_pool
    assert query.diversity == (request.diversity if request.HasField("diversity") else DEFAULT_DIVERSITY)
    assert query.exclude_seen == (request.exclude_seen if request.HasField("exclude_seen") else True)
    # every known excluded id, wherever it stands in the list; unknown ones dropped
    assert query.exclude_item_indices == {ITEM_INDEX_OF[raw] for raw in request.exclude_item_ids if raw in ITEM_INDEX_OF}
    assert_events_are_the_sent_ones(query.inline_events, request.recent_events)


def assert_batch_is_the_request(batch, request: pb.RecordEventsRequest) -> None:
    assert [user.user_id for user in batch.users] == [user.user_id for user in request.users]
    if HAS_LIST_REQUEST_ID:  # the events that name a list, in request order, each with its item and behaviour
        assert [(e.list_request_id, e.raw_item_id, e.behavior) for e in batch.list_events] == [
            (sent.list_request_id, sent.item_id, sent.behavior) for user in request.users for sent in user.events
            if sent.list_request_id]
    for user, sent in zip(batch.users, request.users):
        assert_events_are_the_sent_ones(user.events, sent.events)
    assert batch.idempotency_key == (request.idempotency_key or None)


def test_the_default_limits_are_the_documented_ones():
    """The predicate's numbers are the documented defaults; the validator runs under Limits() defaults."""
    assert (LIMITS.max_k, LIMITS.max_candidates, LIMITS.max_inline_events, LIMITS.max_exclude_ids) == \
        (MAX_K, MAX_CANDIDATES, MAX_INLINE_EVENTS, MAX_EXCLUDE_IDS)
    assert (LIMITS.max_events_per_call, LIMITS.max_users_per_call, LIMITS.max_id_length) == \
        (MAX_EVENTS_PER_CALL, MAX_USERS_PER_CALL, MAX_ID_LENGTH)
    assert (LIMITS.default_k, LIMITS.default_candidates, LIMITS.default_diversity) == \
        (DEFAULT_K, DEFAULT_CANDIDATES, DEFAULT_DIVERSITY)


def test_the_reference_predicate_on_hand_picked_requests():
    """The oracle itself, on requests whose verdict is obvious, so that a lax predicate cannot hide a lax
    validator."""
    assert rank_verdict(pb.RankRequest(user_id="u")) == Verdict()
    assert rank_verdict(pb.RankRequest(user_id="", k=0)).wrong == {"user_id", "k"}
    assert rank_verdict(pb.RankRequest(user_id="u", k=20, candidate_pool_size=19)).wrong == {"candidate_pool_size"}
    assert rank_verdict(pb.RankRequest(user_id="u", candidate_pool_size=9)).wrong == {"candidate_pool_size"}
    assert rank_verdict(pb.RankRequest(user_id="u", diversity=math.nan)).wrong == {"diversity"}
    assert rank_verdict(pb.RankRequest(user_id="u", exclude_item_ids=["sku-1", "gone", ""])).wrong == \
        {"exclude_item_ids[2]"}
    events = [pb.Event(item_id="sku-1", timestamp=0), pb.Event(item_id="nope", behavior="x", timestamp=-1)]
    verdict = rank_verdict(pb.RankRequest(user_id="u", recent_events=events))
    assert verdict.undecided == {"recent_events[0].timestamp"}
    assert verdict.wrong == {"recent_events[1].item_id", "recent_events[1].behavior", "recent_events[1].timestamp"}
    assert record_events_verdict(pb.RecordEventsRequest()).wrong == {"users"}
    named = [pb.Event(item_id="sku-1", list_request_id="ok id"), pb.Event(item_id="sku-1", list_request_id="a\tb"),
             pb.Event(item_id="sku-1", list_request_id="x" * 129), pb.Event(item_id="sku-1", list_request_id="é🙂")]
    assert record_events_verdict(pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u", events=named)])).wrong == \
        {"users[0].events[1].list_request_id", "users[0].events[2].list_request_id"}
    empty_user = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u")], idempotency_key="k" * 129)
    assert record_events_verdict(empty_user).wrong == {"users[0].events", "idempotency_key"}
    too_many = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u", events=[pb.Event(item_id="sku-1")] * 1001)])
    assert record_events_verdict(too_many).wrong == {"users"}


# ------------------------------------------------------------------------------------------- hostile requests


def all_events(request) -> list[pb.Event]:
    if isinstance(request, pb.RankRequest):
        return list(request.recent_events)
    return [sent for user in request.users for sent in user.events]


@st.composite
def settled_sometimes(draw, requests):
    """A hostile request; half of them with every undecided timestamp moved into the settled range (a decided
    request), and some with one event id of any length, if the proto has event ids."""
    request = draw(requests)
    if draw(st.booleans()):
        for sent in all_events(request):
            if sent.HasField("timestamp") and (sent.timestamp == 0 or sent.timestamp > SETTLED_TIMESTAMPS[1]):
                sent.timestamp = SETTLED_TIMESTAMPS[1]
    events = all_events(request)
    if HAS_EVENT_ID and events and draw(st.booleans()):
        events[draw(st.integers(0, len(events) - 1))].event_id = draw(any_text())
    if HAS_LIST_REQUEST_ID and events and draw(st.booleans()):
        events[draw(st.integers(0, len(events) - 1))].list_request_id = draw(any_text())
    return request


@fuzz_settings(scale=3)
@given(settled_sometimes(rank_requests(KNOWN, BEHAVIORS, LIMITS)))
def test_rank_requests_are_accepted_or_rejected_as_the_documented_rules_say(request):
    verdict = rank_verdict(request)
    event("decided" if not verdict.undecided else "undecided")
    query = decide(validate_rank_request, request, verdict)
    if query is not None:
        assert_query_is_the_request(query, request)


@fuzz_settings(scale=3)
@given(settled_sometimes(record_events_requests(KNOWN, BEHAVIORS, LIMITS)))
def test_record_events_requests_are_accepted_or_rejected_as_the_documented_rules_say(request):
    verdict = record_events_verdict(request)
    event("decided" if not verdict.undecided else "undecided")
    batch = decide(validate_record_events_request, request, verdict)
    if batch is not None:
        assert_batch_is_the_request(batch, request)


# --------------------------------------------------------------------------------------------- valid requests


def ids() -> st.SearchStrategy[str]:
    """Non-empty ids up to exactly MAX_ID_LENGTH characters (also 4-byte ones), hostile-looking but legal."""
    return st.one_of(st.text(min_size=1, max_size=24), st.text(min_size=MAX_ID_LENGTH - 8, max_size=MAX_ID_LENGTH),
                     st.builds(lambda char: char * MAX_ID_LENGTH, st.characters(codec="utf-8")),
                     st.sampled_from([text for text in NASTY_STRINGS if 0 < len(text) <= MAX_ID_LENGTH]))


def valid_events() -> st.SearchStrategy[pb.Event]:
    timestamps = optional(st.one_of(st.integers(*SETTLED_TIMESTAMPS), st.sampled_from(SETTLED_TIMESTAMPS)))
    event_ids = st.one_of(st.just(""), ids()) if HAS_EVENT_ID else st.just("")
    list_ids = st.one_of(st.just(""), printable_ids()) if HAS_LIST_REQUEST_ID else st.just("")

    def build(item_id, behavior, timestamp, event_id, list_request_id):
        sent = pb.Event(item_id=item_id, behavior=behavior, timestamp=timestamp)
        if event_id:
            sent.event_id = event_id
        if list_request_id:
            sent.list_request_id = list_request_id
        return sent

    return st.builds(build, st.sampled_from(KNOWN), st.sampled_from(["", *BEHAVIORS]), timestamps, event_ids,
                     list_ids)


def printable_ids() -> st.SearchStrategy[str]:
    """List request ids as the proto allows them: printable (no category C, no separator but the space), up to
    exactly MAX_ID_LENGTH characters; a server-assigned hex id among them."""
    printable = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")
    return st.one_of(st.text(printable, min_size=1, max_size=24), st.text(printable, min_size=MAX_ID_LENGTH,
                                                                          max_size=MAX_ID_LENGTH),
                     st.just("0123456789abcdef" * 2))


@st.composite
def valid_rank_requests(draw) -> pb.RankRequest:
    """Every field inside its documented range, the ends of each range included."""
    k = draw(optional(st.one_of(st.integers(1, MAX_K), st.sampled_from([1, MAX_K]))))
    smallest_pool = k if k is not None else DEFAULT_K
    pool = draw(optional(st.one_of(st.integers(smallest_pool, MAX_CANDIDATES),
                                   st.sampled_from([smallest_pool, MAX_CANDIDATES]))))
    events = draw(st.one_of(st.lists(valid_events(), max_size=20),
                            st.builds(lambda sent: [sent] * MAX_INLINE_EVENTS, valid_events())))
    excluded = draw(st.one_of(st.lists(st.one_of(st.sampled_from(KNOWN), ids()), max_size=10),
                              st.builds(lambda raw: [raw] * MAX_EXCLUDE_IDS, st.one_of(st.sampled_from(KNOWN), ids())),
                              st.permutations(KNOWN)))
    request = pb.RankRequest(user_id=draw(ids()), recent_events=events, exclude_item_ids=excluded,
                             request_id=draw(st.one_of(st.just(""), ids())))
    for name, value in (("k", k), ("candidate_pool_size", pool), ("diversity", draw(optional(st.floats(0.0, 1.0)))),
                        ("exclude_seen", draw(optional(st.booleans())))):
        if value is not None:
            setattr(request, name, value)
    return request


@st.composite
def valid_record_events_requests(draw) -> pb.RecordEventsRequest:
    """1..MAX_USERS_PER_CALL users, each with 1+ events, up to MAX_EVENTS_PER_CALL events in all."""

    def users(num_events: st.SearchStrategy[int]):
        return st.builds(lambda user_id, sent, n: pb.UserEvents(user_id=user_id, events=sent[:n]),
                         ids(), st.lists(valid_events(), min_size=10, max_size=10), num_events)

    per_call = MAX_EVENTS_PER_CALL // MAX_USERS_PER_CALL
    listed = draw(st.one_of(
        st.lists(users(st.integers(1, 5)), min_size=1, max_size=4),
        st.builds(lambda user: [user] * MAX_USERS_PER_CALL, users(st.just(per_call))),  # both limits at once
        st.builds(lambda user_id, sent: [pb.UserEvents(user_id=user_id, events=[sent] * MAX_EVENTS_PER_CALL)],
                  ids(), valid_events()),
    ))
    return pb.RecordEventsRequest(users=listed, idempotency_key=draw(st.one_of(st.just(""), ids())))


@fuzz_settings(scale=2)
@given(valid_rank_requests())
def test_valid_rank_requests_are_accepted_as_sent(request):
    """A validator that refuses what the contract allows (or narrows a limit) fails here."""
    verdict = rank_verdict(request)
    assert verdict == Verdict(), "the strategy drew an invalid request"
    assert_query_is_the_request(decide(validate_rank_request, request, verdict), request)


@fuzz_settings(scale=2)
@given(valid_record_events_requests())
def test_valid_record_events_requests_are_accepted_as_sent(request):
    """A validator that refuses every RecordEvents (or narrows a limit) fails here."""
    verdict = record_events_verdict(request)
    assert verdict == Verdict(), "the strategy drew an invalid request"
    assert_batch_is_the_request(decide(validate_record_events_request, request, verdict), request)


# ------------------------------------------------------------------------------ valid requests with one defect

TOO_LONG_IDS = ("x" * (MAX_ID_LENGTH + 1), "\U0001f642" * (MAX_ID_LENGTH + 1))
EVENT_DEFECTS = {
    "item_id": st.sampled_from(["", *TOO_LONG_IDS, "sku-999", "SKU-1", " sku-1"]),
    "behavior": st.sampled_from(["PV", "click", " pv", "pv\x00"]),
    "timestamp": st.sampled_from([-1, -(2**63)]),
    **({"event_id": st.sampled_from(TOO_LONG_IDS)} if HAS_EVENT_ID else {}),
    **({"list_request_id": st.sampled_from([*TOO_LONG_IDS, "a\x00b", "tab\t", "new\nline", "\u202eevil", "nb\u00a0sp",
                                            "\u2028", "\ue000"])} if HAS_LIST_REQUEST_ID else {}),
}


def break_an_event(rule: str):
    """A defect: one rule of one event broken (a valid event added first when there is none)."""

    def defect(draw, events, path: str) -> str:
        if not events:
            events.append(draw(valid_events()))
        i = draw(st.integers(0, len(events) - 1))
        setattr(events[i], rule, draw(EVENT_DEFECTS[rule]))
        return f"{path}[{i}].{rule}"

    return defect


def break_rank_k(draw, request) -> str:
    request.k = draw(st.sampled_from([0, -1, MAX_K + 1, -(2**31)]))
    request.ClearField("candidate_pool_size")  # else a pool below the new k would break a second rule
    return "k"


def break_rank_pool(draw, request) -> str:
    k = request.k if request.HasField("k") else DEFAULT_K
    request.candidate_pool_size = draw(st.sampled_from([k - 1, 0, -5, MAX_CANDIDATES + 1]))
    return "candidate_pool_size"


def break_an_excluded_id(draw, request) -> str:
    if not request.exclude_item_ids:
        request.exclude_item_ids.append("sku-1")
    i = draw(st.integers(0, len(request.exclude_item_ids) - 1))
    request.exclude_item_ids[i] = draw(st.sampled_from(["", *TOO_LONG_IDS]))
    return f"exclude_item_ids[{i}]"


def break_an_inline_event(rule: str):
    def defect(draw, request) -> str:
        return break_an_event(rule)(draw, request.recent_events, "recent_events")

    return defect


def setting(name: str, values: st.SearchStrategy):
    def defect(draw, message) -> str:
        setattr(message, name, draw(values))
        return name

    return defect


def extended(name: str, limit: int, entry):
    """A defect: the repeated field `name` one entry past `limit`."""

    def defect(draw, message) -> str:
        values = getattr(message, name)
        values.extend([entry(draw)] * (limit + 1 - len(values)))
        return name

    return defect


# defect name -> function(draw, valid request) that breaks exactly one rule and returns the field's path
RANK_DEFECTS = {
    "user_id": setting("user_id", st.sampled_from(["", *TOO_LONG_IDS])),
    "request_id": setting("request_id", st.sampled_from(TOO_LONG_IDS)),
    "k": break_rank_k,
    "candidate_pool_size": break_rank_pool,
    "diversity": setting("diversity", st.sampled_from([-0.01, 1.01, math.nan, math.inf, -math.inf])),
    "recent_events": extended("recent_events", MAX_INLINE_EVENTS, lambda draw: draw(valid_events())),
    "exclude_item_ids": extended("exclude_item_ids", MAX_EXCLUDE_IDS, lambda draw: "sku-1"),
    "exclude_item_ids[]": break_an_excluded_id,
    **{f"recent_events[].{rule}": break_an_inline_event(rule) for rule in EVENT_DEFECTS},
}


def break_users_count(draw, request) -> str:
    if draw(st.booleans()):
        request.ClearField("users")
    else:
        request.users.extend([request.users[0]] * (MAX_USERS_PER_CALL + 1 - len(request.users)))
    return "users"


def break_events_total(draw, request) -> str:
    total = sum(len(user.events) for user in request.users)
    user = request.users[draw(st.integers(0, len(request.users) - 1))]
    user.events.extend([draw(valid_events())] * (MAX_EVENTS_PER_CALL + 1 - total))
    return "users"


def break_a_user(rule: str):
    def defect(draw, request) -> str:
        i = draw(st.integers(0, len(request.users) - 1))
        if rule == "user_id":
            request.users[i].user_id = draw(st.sampled_from(["", *TOO_LONG_IDS]))
            return f"users[{i}].user_id"
        if rule == "events":
            request.users[i].ClearField("events")
            return f"users[{i}].events"
        return break_an_event(rule)(draw, request.users[i].events, f"users[{i}].events")

    return defect


RECORD_EVENTS_DEFECTS = {
    "users": break_users_count,
    "events in all": break_events_total,
    "idempotency_key": setting("idempotency_key", st.sampled_from(TOO_LONG_IDS)),
    "users[].user_id": break_a_user("user_id"),
    "users[].events": break_a_user("events"),
    **{f"users[].events[].{rule}": break_a_user(rule) for rule in EVENT_DEFECTS},
}


@st.composite
def with_one_defect(draw, requests, defect):
    """(a valid request with exactly one documented rule broken, the path of the field that breaks it)."""
    request = draw(requests)
    return request, defect(draw, request)


@pytest.mark.parametrize("defect", sorted(RANK_DEFECTS))
def test_a_rank_request_breaking_one_rule_is_rejected_naming_that_field(defect):
    """Each rule on its own: a validator that lets one of them through (or blames another field) fails here."""

    @fuzz_settings(scale=0.3)
    @given(with_one_defect(valid_rank_requests(), RANK_DEFECTS[defect]))
    def check(case):
        request, broken = case
        assert rank_verdict(request).wrong == {broken}
        with pytest.raises(InvalidArgument) as error:
            validate_rank_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
        assert error.value.field == broken

    check()


@pytest.mark.parametrize("defect", sorted(RECORD_EVENTS_DEFECTS))
def test_a_record_events_request_breaking_one_rule_is_rejected_naming_that_field(defect):
    @fuzz_settings(scale=0.3)
    @given(with_one_defect(valid_record_events_requests(), RECORD_EVENTS_DEFECTS[defect]))
    def check(case):
        request, broken = case
        assert record_events_verdict(request).wrong == {broken}
        with pytest.raises(InvalidArgument) as error:
            validate_record_events_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
        assert error.value.field == broken

    check()


def test_a_huge_unknown_behaviour_is_echoed_cut_short():
    request = pb.RankRequest(user_id="u1", recent_events=[pb.Event(item_id="sku-1", behavior="x" * 100_000)])
    with pytest.raises(InvalidArgument) as error:
        validate_rank_request(request, LIMITS, ITEM_INDEX_OF, BEHAVIORS)
    assert error.value.field == "recent_events[0].behavior"
    assert "(100000 characters)" in error.value.reason and len(status_details(error.value)) < 300


def test_field_paths_resolve_and_bad_ones_do_not():
    request = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u", events=[pb.Event(item_id="a")])])
    assert field_value(request, "users[0].events[0].item_id") == "a"
    with pytest.raises(KeyError):
        field_value(request, "users[0].item")
    with pytest.raises(IndexError):
        field_value(request, "users[1]")
