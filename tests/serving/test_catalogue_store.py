"""The live catalogue's durable state in the history store, both backends: write_items and items_since.

Tests taking `open_store` or `history_url` run against SQLite and a real redis-server (see conftest.py); the
Redis params skip when redis-server is not installed. Backend-specific tests are named for their backend.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history import (
    CatalogueWrite,
    Event,
    HistoryConfig,
    ItemChange,
    ItemState,
    SQLiteHistoryStore,
    UserEvents,
    redis_store,
)
from seqrank.serving.history.deadline import DeadlineStore
from seqrank.serving.history.events import append_fingerprint
from seqrank.serving.history.redis_store import CATALOGUE_PREFIX, RedisHistoryStore
from seqrank.serving.history.sqlite_store import SCHEMA_VERSION
from tests.serving.conftest import FakeClock


def open_backend(url, *, clock=time.time, idempotency_ttl_s=86_400, user_ttl_s=0):
    """A new client of the store at `url`, with an injectable clock."""
    config = HistoryConfig(url=url, max_events_per_user=5, idempotency_ttl_s=idempotency_ttl_s, user_ttl_s=user_ttl_s)
    if url.startswith("redis://"):
        return RedisHistoryStore(config, clock=clock)
    return SQLiteHistoryStore(url[len("sqlite:///"):], 5, idempotency_ttl_s=idempotency_ttl_s, user_ttl_s=user_ttl_s,
                              clock=clock)


@pytest.fixture
def open_store(history_url):
    """Opens separate clients of one store (separate connections); closes them all after the test."""
    opened = []

    def open_store(**options):
        opened.append(open_backend(history_url, **options))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store()


def upsert(item, *attributes):
    return ItemChange(item, attributes=tuple(attributes))


def hide(item):
    return ItemChange(item, available=False)


def restore(item):
    return ItemChange(item, available=True)


def written(applied, version):
    return CatalogueWrite(applied=applied, version=version, idempotent_replay=False)


CATALOGUE = [upsert("a", "red", "xl"), upsert("b", "blue"), hide("c")]  # c: a trained item, hidden
CATALOGUE_STATE = [ItemState("a", ("red", "xl"), True, 1), ItemState("b", ("blue",), True, 1),
                   ItemState("c", None, False, 1)]


def test_a_write_is_visible_to_a_second_client_and_after_reopening(open_store):
    writer, reader = open_store(), open_store()
    assert reader.items_since(0) == ([], 0)
    assert writer.write_items(CATALOGUE) == written(3, 1)
    assert reader.items_since(0) == (CATALOGUE_STATE, 1)  # read-your-writes across two clients
    assert reader.write_items([restore("c")]) == written(1, 2)
    assert writer.items_since(1) == ([ItemState("c", None, True, 2)], 2)
    writer.close()
    reader.close()
    reopened = open_store()
    assert reopened.items_since(0) == (CATALOGUE_STATE[:2] + [ItemState("c", None, True, 2)], 2)
    assert reopened.write_items([hide("a")]).version == 3  # the version counter survived too


_SQLITE_WRITER = """
import os, signal, sys
from seqrank.serving.history import ItemChange, SQLiteHistoryStore
store = SQLiteHistoryStore(sys.argv[1], 5)
store.write_items([ItemChange("a", ("red", "xl")), ItemChange("b", ("blue",)), ItemChange("c", available=False)],
                  idempotency_key="k1")
os.kill(os.getpid(), signal.SIGKILL)  # acknowledged, then no close, no clean exit
"""


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_acknowledged_item_writes_survive_kill_9_and_a_restart(backend, db_path, request):
    if backend == "sqlite":  # the writing process dies; the file is all that is left
        killed = subprocess.run([sys.executable, "-c", _SQLITE_WRITER, str(db_path)], check=False, timeout=120)
        assert killed.returncode == -signal.SIGKILL
        url = f"sqlite:///{db_path}"
    else:  # the server dies: no shutdown save, and RDB snapshots are off: only the AOF brings the data back
        server = request.getfixturevalue("new_redis_server")()
        url = server.url()
        store = open_backend(url)
        store.write_items(CATALOGUE, idempotency_key="k1")
        store.close()
        server.kill()
        server.start()
    reopened = open_backend(url)
    assert reopened.items_since(0) == (CATALOGUE_STATE, 1)
    assert reopened.write_items(CATALOGUE, idempotency_key="k1") == CatalogueWrite(0, 1, idempotent_replay=True)
    assert reopened.write_items([hide("b")]) == written(1, 2)
    reopened.close()


def test_items_since_returns_exactly_the_items_changed_after_a_version_with_their_latest_state(store):
    assert store.write_items([upsert("a", "red"), upsert("b", "blue")]) == written(2, 1)
    assert store.write_items([hide("a")]) == written(1, 2)
    assert store.write_items([hide("c")]) == written(1, 3)  # never upserted: its attributes stay the artifact's
    assert store.write_items([restore("a")]) == written(1, 4)
    assert store.write_items([upsert("b", "green")]) == written(1, 5)
    assert store.write_items([upsert("c", "x", "y")]) == written(1, 6)  # new attributes keep it hidden
    assert store.write_items([hide("b")]) == written(1, 7)  # hiding keeps the attributes
    latest = [ItemState("a", ("red",), True, 4), ItemState("c", ("x", "y"), False, 6),
              ItemState("b", ("green",), False, 7)]
    assert store.items_since(0) == (latest, 7)
    assert store.items_since(3) == (latest, 7)
    assert store.items_since(4) == (latest[1:], 7)
    assert store.items_since(6) == (latest[2:], 7)
    assert store.items_since(7) == ([], 7)
    assert store.items_since(100) == ([], 7)
    with pytest.raises(ValueError, match="version: must be >= 0, got -1"):
        store.items_since(-1)


def test_one_write_takes_one_version_its_items_ordered_by_id_and_its_changes_apply_in_order(store):
    assert store.write_items([upsert("z", "1"), upsert("m", "2"), hide("q")]) == written(3, 1)
    assert store.items_since(0)[0] == [ItemState("m", ("2",), True, 1), ItemState("q", None, False, 1),
                                       ItemState("z", ("1",), True, 1)]
    # Later changes of one item see the earlier ones: upsert, hide, new attributes, restore = four changes.
    assert store.write_items([upsert("m", "3"), hide("m"), upsert("m", "4"), restore("m")]) == written(4, 2)
    assert store.items_since(1) == ([ItemState("m", ("4",), True, 2)], 2)
    assert store.write_items([ItemChange("z", ("5",), available=False)]) == written(1, 3)  # both fields at once
    assert store.items_since(2) == ([ItemState("z", ("5",), False, 3)], 3)


def test_a_change_that_sets_what_is_stored_is_not_counted_and_takes_no_version(store):
    assert store.write_items([upsert("a", "red"), hide("b"), upsert("e")]) == written(3, 1)  # e: () = no attributes
    unchanged = [upsert("a", "red"), restore("a"), hide("b"), upsert("e"), restore("never-changed"),
                 ItemChange("a")]
    assert store.write_items(unchanged) == written(0, 1)
    assert store.items_since(0) == ([ItemState("a", ("red",), True, 1), ItemState("b", None, False, 1),
                                     ItemState("e", (), True, 1)], 1)  # no row for "never-changed"
    assert store.write_items([upsert("a", "red"), upsert("e", "")]) == written(1, 2)  # ("",) is not ()
    assert store.items_since(1) == ([ItemState("e", ("",), True, 2)], 2)
    assert store.write_items([]) == written(0, 2)


def test_a_repeated_idempotency_key_is_acknowledged_without_writing_again(open_store):
    first_client = open_store(clock=FakeClock(1_700_000_000))
    assert first_client.write_items(CATALOGUE, idempotency_key="k1") == written(3, 1)
    other_client = open_store(clock=FakeClock(1_700_000_030))
    other_client.write_items([restore("c")])  # version 2: c is available again
    replay = other_client.write_items(CATALOGUE, idempotency_key="k1")
    assert replay == CatalogueWrite(applied=0, version=2, idempotent_replay=True)  # the current version
    assert other_client.items_since(0) == (CATALOGUE_STATE[:2] + [ItemState("c", None, True, 2)], 2)  # c not hidden


def test_an_idempotency_key_reused_with_another_payload_is_refused_and_writes_nothing(store):
    store.write_items([upsert("a", "red")], idempotency_key="k1")
    for other in ([upsert("a", "blue")], [upsert("a", "red"), hide("b")], [ItemChange("a", ("red",), True)], []):
        with pytest.raises(FailedPrecondition) as raised:
            store.write_items(other, idempotency_key="k1")
        assert str(raised.value).startswith("idempotency_key: 'k1'")
    assert store.items_since(0) == ([ItemState("a", ("red",), True, 1)], 1)


def test_events_keys_and_items_keys_never_collide(store):
    assert store.append([UserEvents("u1", (Event("a", "pv", 1),))], idempotency_key="k1").stored == 1
    assert store.write_items([hide("a")], idempotency_key="k1") == written(1, 1)  # not a replay, not a conflict
    assert store.write_items([hide("a")], idempotency_key="k1").idempotent_replay
    assert store.append([UserEvents("u1", (Event("a", "pv", 1),))], idempotency_key="k1").idempotent_replay
    assert store.write_items([hide("b")], idempotency_key="k2") == written(1, 2)
    assert store.append([UserEvents("u1", (Event("b", "pv", 2),))], idempotency_key="k2").stored == 1


def test_items_idempotency_keys_expire_after_their_ttl(open_store):
    clock = FakeClock(1_000_000.0)
    store = open_store(idempotency_ttl_s=60, clock=clock)
    store.write_items([hide("a")], idempotency_key="k1")
    clock.now += 61
    assert store.write_items([restore("a")], idempotency_key="k1") == written(1, 2)  # a new call, not a conflict


def test_catalogue_state_never_expires_with_the_histories(history_url):
    clock = FakeClock(1_000_000.0)
    store = open_backend(history_url, user_ttl_s=1, clock=clock)
    store.write_items(CATALOGUE)
    store.append([UserEvents("u1", (Event("a", "pv", 1),))])
    if history_url.startswith("redis://"):
        time.sleep(1.2)  # the user's keys expire on the server's clock
        with redis_store.redis.Redis.from_url(history_url) as client:
            for key in ("items", "versions", "version"):
                assert client.ttl(CATALOGUE_PREFIX + key) == -1  # exists, no expiry
    else:
        clock.now += 3_600
        store.append([UserEvents("u2", (Event("a", "pv", 1),))])  # purges the expired user
    assert store.recent("u1", 5) == []
    assert store.items_since(0) == (CATALOGUE_STATE, 1)
    store.close()


def test_redis_out_of_memory_is_unavailable_and_writes_nothing(new_redis_server):
    server = new_redis_server()
    store = open_backend(server.url())
    with server.client() as client:
        client.config_set("maxmemory", 1)  # every write is refused (policy noeviction)
        with pytest.raises(Unavailable, match="history_store: Redis .*maxmemory"):
            store.write_items(CATALOGUE, idempotency_key="k1")
        assert store.items_since(0) == ([], 0)  # reads still answer
        client.config_set("maxmemory", 0)
        assert client.dbsize() == 0  # the script wrote nothing, not even the version counter
    assert store.write_items(CATALOGUE[:1], idempotency_key="k1") == written(1, 1)  # the key was not recorded
    store.close()


def test_redis_wait_replicas_holds_item_writes_to_the_replicas_acknowledgement(new_redis_server):
    server = new_redis_server()  # no replica: WAIT times out, the write is not acknowledged
    store = RedisHistoryStore(HistoryConfig(url=server.url(), wait_replicas=1, wait_timeout_ms=50))
    with pytest.raises(Unavailable, match=r"0 of wait_replicas=1 replicas acknowledged within 50 ms"):
        store.write_items([hide("a")], idempotency_key="k1")
    store.close()


def test_sqlite_a_write_failing_midway_writes_nothing(db_path):
    store = SQLiteHistoryStore(db_path, 5)
    store.write_items([upsert("a", "red")])
    with sqlite3.connect(db_path) as raw:  # fails the third item's row, after the counter and two rows are written
        raw.execute("CREATE TRIGGER poison BEFORE INSERT ON catalogue_items WHEN NEW.item_id = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    with pytest.raises(sqlite3.DatabaseError, match="poisoned"):
        store.write_items([upsert("b", "blue"), hide("a"), hide("poison")], idempotency_key="k1")
    assert store.items_since(0) == ([ItemState("a", ("red",), True, 1)], 1)
    with sqlite3.connect(db_path) as raw:
        raw.execute("DROP TRIGGER poison")
    assert store.write_items([upsert("b", "blue")], idempotency_key="k1") == written(1, 2)  # the key was not kept
    store.close()


def test_redis_a_retried_write_script_writes_nothing_twice(redis_server, monkeypatch):
    # redis-py re-sends the script after a lost connection; if the first run had applied, the retry must not
    # write again (here it would undo a later write of another client). Same applied-marker id = the same call.
    with redis_server.client() as client:
        client.flushall()
    store = open_backend(redis_server.url())
    other_client = open_backend(redis_server.url())
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    assert store.write_items([upsert("a", "red")]) == written(1, 1)
    monkeypatch.undo()
    other_client.write_items([upsert("a", "blue")])
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    assert store.write_items([upsert("a", "red")]) == written(1, 1)  # the retry reports the first run's outcome
    assert store.items_since(0) == ([ItemState("a", ("blue",), True, 2)], 2)
    store.close()
    other_client.close()


def test_redis_items_since_reads_in_pages_and_a_change_between_pages_is_read_once_in_its_newest_state(
        redis_server, monkeypatch):
    with redis_server.client() as client:
        client.flushall()
    monkeypatch.setattr(redis_store, "ITEMS_PAGE_SIZE", 2)
    store = open_backend(redis_server.url())
    store.write_items([upsert("a", "1"), upsert("b", "1")])  # version 1
    store.write_items([upsert(f"x{i}", "2") for i in range(5)])  # version 2: more than a page, read whole
    store.write_items([hide("c")])  # version 3
    expected = ([ItemState("a", ("1",), True, 1), ItemState("b", ("1",), True, 1)]
                + [ItemState(f"x{i}", ("2",), True, 2) for i in range(5)] + [ItemState("c", None, False, 3)], 3)
    assert store.items_since(0) == expected
    pages = []
    read_page = store._items_page_script

    def read_page_then_change_an_item_already_read(*args, **kwargs):
        pages.append(read_page(*args, **kwargs))
        if len(pages) == 1:  # a and b were read; now a changes (version 4) before the next page
            other_client.write_items([hide("a")])
        return pages[-1]

    other_client = open_backend(redis_server.url())
    monkeypatch.setattr(store, "_items_page_script", read_page_then_change_an_item_already_read)
    items, version = store.items_since(0)
    assert len(pages) == 4  # [a b] [x0..x4] [c a] (full: read on) [] (the end)
    assert (items, version) == (expected[0][1:] + [ItemState("a", ("1",), False, 4)], 4)
    store.close()
    other_client.close()


def test_the_deadline_store_passes_catalogue_calls_through_and_bounds_them(db_path):
    async def calls(deadline_store):
        write = await deadline_store.write_items([hide("a")], "k1")
        return write, await deadline_store.items_since(0)

    deadline_store = DeadlineStore(SQLiteHistoryStore(db_path, 5), timeout_s=5.0, max_threads=2)
    assert asyncio.run(calls(deadline_store)) == (written(1, 1), ([ItemState("a", None, False, 1)], 1))
    deadline_store.close()
    blackhole = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    try:
        url = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        hanging = DeadlineStore(RedisHistoryStore(HistoryConfig(url=url, busy_timeout_s=2.0)), 0.2, 2)
        for call in (hanging.write_items([hide("a")], None), hanging.items_since(0)):
            started = time.monotonic()
            with pytest.raises(Unavailable, match="no answer within history.call_timeout_s=0.2 s"):
                asyncio.run(call)
            assert time.monotonic() - started < 1.5
        hanging.close()
    finally:
        blackhole.close()


_V2_SCHEMA = """
    CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
                         behavior TEXT NOT NULL, timestamp_ms INTEGER NOT NULL, event_id TEXT);
    CREATE UNIQUE INDEX events_by_event_id ON events (user_id, event_id) WHERE event_id IS NOT NULL;
    CREATE INDEX events_by_user_time ON events (user_id, timestamp_ms, seq);
    CREATE TABLE users (user_id TEXT PRIMARY KEY, last_append_ms INTEGER NOT NULL);
    CREATE INDEX users_by_last_append ON users (last_append_ms);
    CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, payload_sha256 TEXT NOT NULL, created_s INTEGER NOT NULL);
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_s);
"""


def test_sqlite_version_2_files_are_migrated_to_3_without_losing_events(db_path):
    batch = [UserEvents("u1", (Event("b", "", 200),))]
    with sqlite3.connect(db_path) as old:  # the version-2 schema with one user's events and a recorded key
        old.executescript(_V2_SCHEMA + """
            INSERT INTO events (user_id, item_id, behavior, timestamp_ms, event_id)
                VALUES ('u1', 'a', 'pv', 100000, 'e1'), ('u1', 'b', '', 200000, NULL);
            INSERT INTO users (user_id, last_append_ms) VALUES ('u1', 900000);
            PRAGMA user_version = 2;
        """)
        old.execute("INSERT INTO idempotency_keys VALUES ('k1', ?, 1000)", (append_fingerprint(batch),))
    store = SQLiteHistoryStore(db_path, 5, user_ttl_s=3_600, clock=FakeClock(1_000.0))
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert [(e.raw_item_id, e.behavior, e.timestamp_ms, e.event_id) for e in store.recent("u1", 5)] == [
        ("a", "pv", 100_000, "e1"), ("b", "", 200_000, "")]
    assert store.append(batch, idempotency_key="k1").idempotent_replay  # the events' keys were kept
    assert store.append([UserEvents("u1", (Event("a", "pv", 100, "e1"),))]).stored == 0  # and the event ids
    assert store.items_since(0) == ([], 0)
    assert store.write_items(CATALOGUE, idempotency_key="k1") == written(3, 1)
    store.close()
    reopened = SQLiteHistoryStore(db_path, 5)  # reopening a version-3 file changes nothing
    assert reopened.items_since(0) == (CATALOGUE_STATE, 1) and len(reopened.recent("u1", 5)) == 2
    reopened.close()


def test_sqlite_version_1_files_are_migrated_through_2_to_3(db_path):
    with sqlite3.connect(db_path) as old:  # the version-1 schema, as in test_history.py
        old.executescript("""
            CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
                                 behavior TEXT NOT NULL, timestamp_s INTEGER NOT NULL);
            CREATE UNIQUE INDEX events_exact_duplicate ON events (user_id, item_id, behavior, timestamp_s);
            CREATE INDEX events_by_user_time ON events (user_id, timestamp_s, seq);
            CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, payload_sha256 TEXT NOT NULL, created_s INTEGER);
            INSERT INTO events (user_id, item_id, behavior, timestamp_s) VALUES ('u1', 'a', 'pv', 100);
            PRAGMA user_version = 1;
        """)
    store = SQLiteHistoryStore(db_path, 5)
    assert [(e.raw_item_id, e.timestamp_ms) for e in store.recent("u1", 5)] == [("a", 100_000)]
    assert store.write_items([hide("a")]) == written(1, 1)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
    store.close()


class CatalogueModel:
    """What write_items and items_since must answer, written plainly: the reference both backends are held to."""

    def __init__(self):
        self.items: dict[str, ItemState] = {}
        self.version = 0
        self.keys: dict[str, tuple] = {}

    def write_items(self, changes, idempotency_key=None):
        if idempotency_key is not None:
            if idempotency_key in self.keys:
                if self.keys[idempotency_key] != tuple(changes):
                    return f"idempotency_key: {idempotency_key!r} was already used with a different payload"
                return CatalogueWrite(0, self.version, idempotent_replay=True)
            self.keys[idempotency_key] = tuple(changes)
        states = {item: (state.attributes, state.available) for item, state in self.items.items()}
        applied, changed = 0, []
        for change in changes:
            attributes, available = states.get(change.raw_item_id, (None, True))
            new = (attributes if change.attributes is None else change.attributes,
                   available if change.available is None else change.available)
            if new != (attributes, available):
                applied += 1
                states[change.raw_item_id] = new
                changed.append(change.raw_item_id)
        if applied:
            self.version += 1
            for item in changed:
                self.items[item] = ItemState(item, *states[item], self.version)
        return CatalogueWrite(applied, self.version, idempotent_replay=False)

    def items_since(self, version):
        newer = [state for state in self.items.values() if state.version > version]
        return sorted(newer, key=lambda state: (state.version, state.raw_item_id)), self.version


# Random write sequences: both backends must answer every call and every read as the model does.
_change = st.builds(ItemChange, st.sampled_from(["a", "b", "c"]),
                    st.sampled_from([None, (), ("x",), ("x", "y"), ("y",)]), st.sampled_from([None, True, False]))
_call = st.tuples(st.lists(_change, max_size=4), st.one_of(st.none(), st.sampled_from(["k1", "k2"])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(_call, min_size=1, max_size=8))
def test_both_backends_agree_with_the_model_on_random_write_sequences(tmp_path_factory, redis_server, calls):
    with redis_server.client() as client:
        client.flushall()
    url_sqlite = f"sqlite:///{tmp_path_factory.mktemp('agree')}/history.db"
    stores = [open_backend(url, clock=FakeClock(2)) for url in (url_sqlite, redis_server.url())]
    model = CatalogueModel()
    try:
        for changes, idempotency_key in calls:
            expected = model.write_items(changes, idempotency_key)
            for store in stores:
                try:
                    outcome = store.write_items(changes, idempotency_key=idempotency_key)
                except FailedPrecondition as error:
                    outcome = str(error)
                assert outcome == expected
        for store in stores:
            for version in range(model.version + 2):
                assert store.items_since(version) == model.items_since(version)
    finally:
        for store in stores:
            store.close()
