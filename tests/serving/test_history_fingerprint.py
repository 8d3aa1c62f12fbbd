"""Idempotency keys tell a retry from a reused key by the whole payload, event timestamps included, in both stores.

ranking.proto (RecordEventsRequest.idempotency_key): "A key seen before ... with the same payload is acknowledged
without storing anything again; the same key with a different payload is FAILED_PRECONDITION". An event's
timestamp is part of its payload: were it left out of the fingerprint, a second append that differs only in when
its events happened would be acknowledged as a replay and its events silently dropped.

Both backends run: SQLite and a real redis-server (tests/serving/conftest.py; the Redis case skips when
redis-server is not installed). Stores are opened through `open_history_store`, as the ingress opens them.
"""

import pytest

from seqrank.serving.errors import FailedPrecondition
from seqrank.serving.history import Event, HistoryConfig, UserEvents, open_history_store


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'history.db'}"
    else:
        server = request.getfixturevalue("redis_server")
        with server.client() as client:
            client.flushall()
        url = server.url()
    store = open_history_store(HistoryConfig(url=url, max_events_per_user=50))
    yield store
    store.close()


def append_of(*timestamps, user_id="u1"):
    """One user's append of items a, b, ... in that order, with the given explicit timestamps (Unix seconds)."""
    items = "abcdefgh"[: len(timestamps)]
    return [UserEvents(user_id, tuple(Event(item, "pv", timestamp) for item, timestamp in zip(items, timestamps)))]


def stored(store, user_id="u1"):
    return [(event.raw_item_id, event.timestamp_s) for event in store.recent(user_id, 50)]


def test_a_retry_with_the_same_timestamps_is_acknowledged_without_storing_again(store):
    """The baseline the test below needs: the same key and the very same payload is a replay, not a conflict
    (so a store that refused every reused key would not pass both)."""
    first = store.append(append_of(1_700_000_100, 1_700_000_200), idempotency_key="k1")
    retry = store.append(append_of(1_700_000_100, 1_700_000_200), idempotency_key="k1")
    assert (first.stored, first.idempotent_replay) == (2, False)
    assert (retry.stored, retry.duplicates_ignored, retry.idempotent_replay) == (0, 2, True)
    assert stored(store) == [("a", 1_700_000_100), ("b", 1_700_000_200)]


@pytest.mark.parametrize("timestamps", [
    (1_700_000_101, 1_700_000_200),  # the first event one second later
    (1_700_000_100, 1_700_000_199),  # the last event one second earlier
    (1_700_000_200, 1_700_000_100),  # the same two timestamps, swapped between the events
    (1_700_000_100_000, 1_700_000_200),  # a millisecond timestamp where seconds were sent
], ids=["first-later", "last-earlier", "swapped", "milliseconds"])
def test_the_same_key_with_other_timestamps_is_a_key_reuse_and_stores_nothing(store, timestamps):
    """Same key, same users, items and behaviours, only a timestamp differs: FAILED_PRECONDITION naming the key,
    and the second payload's events are not stored."""
    store.append(append_of(1_700_000_100, 1_700_000_200), idempotency_key="k1")
    with pytest.raises(FailedPrecondition) as raised:
        store.append(append_of(*timestamps), idempotency_key="k1")
    assert raised.value.subject == "idempotency_key"
    assert stored(store) == [("a", 1_700_000_100), ("b", 1_700_000_200)]


def test_an_explicit_timestamp_where_the_first_append_left_it_unset_is_a_key_reuse(store):
    """Unset means "the server's clock": a second payload that names a time is another payload."""
    store.append([UserEvents("u1", (Event("a", "pv"),))], idempotency_key="k1")
    with pytest.raises(FailedPrecondition):
        store.append([UserEvents("u1", (Event("a", "pv", 1_700_000_100),))], idempotency_key="k1")
    assert len(store.recent("u1", 50)) == 1
