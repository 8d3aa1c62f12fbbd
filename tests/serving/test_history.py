"""History store, both backends: durability across clients and processes, order, bounds, duplicates, idempotency.

Tests taking `open_store` or `history_url` run against SQLite and a real redis-server (see conftest.py); the
Redis params skip when redis-server is not installed. Backend-specific tests are named for their backend.
"""

import multiprocessing
import sqlite3
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history import (
    AppendResult,
    Event,
    HistoryConfig,
    SQLiteHistoryStore,
    UserEvents,
    open_history_store,
    resolve_history_url,
)
from seqrank.serving.history.redis_store import KEY_PREFIX, RedisHistoryStore
from seqrank.serving.history.sqlite_store import SCHEMA_VERSION
from tests.serving.conftest import FakeClock


def open_backend(url, max_events_per_user=5, *, clock=time.time, idempotency_ttl_s=86_400, busy_timeout_s=5.0,
                 user_ttl_s=0):
    """A new client of the store at `url`, with an injectable clock (open_history_store always uses time.time)."""
    config = HistoryConfig(url=url, max_events_per_user=max_events_per_user, busy_timeout_s=busy_timeout_s,
                           idempotency_ttl_s=idempotency_ttl_s, user_ttl_s=user_ttl_s)
    if url.startswith("redis://"):
        return RedisHistoryStore(config, clock=clock)
    return SQLiteHistoryStore(url[len("sqlite:///"):], max_events_per_user, busy_timeout_s=busy_timeout_s,
                              idempotency_ttl_s=idempotency_ttl_s, user_ttl_s=user_ttl_s, clock=clock)


@pytest.fixture
def open_store(history_url):
    """Opens separate clients of one store (separate connections); closes them all after the test."""
    opened = []

    def open_store(max_events_per_user=5, **options):
        opened.append(open_backend(history_url, max_events_per_user, **options))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store(max_events_per_user=5)


def events(user_id, *items, start=100):
    return UserEvents(user_id, tuple(Event(item, "pv", start + i) for i, item in enumerate(items)))


def items_of(stored):
    return [event.raw_item_id for event in stored]


def test_acknowledged_events_are_visible_to_a_second_client_and_after_reopening(open_store):
    writer = open_store(max_events_per_user=10)
    reader = open_store(max_events_per_user=10)
    writer.append([events("u1", "a", "b")])
    assert items_of(reader.recent("u1", 10)) == ["a", "b"]  # read-your-writes across two clients
    reader.append([events("u1", "c", start=200)])
    assert items_of(writer.recent("u1", 10)) == ["a", "b", "c"]
    writer.close()
    reader.close()
    reopened = open_store(max_events_per_user=10)
    assert items_of(reopened.recent("u1", 10)) == ["a", "b", "c"]


def test_sqlite_store_runs_in_wal_mode_with_full_sync(db_path):
    store = SQLiteHistoryStore(db_path, max_events_per_user=5)
    store.append([events("u1", "a")])
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_recent_returns_the_newest_events_oldest_first_with_all_fields(store):
    store.append([UserEvents("u1", (Event("a", "pv", 10), Event("b", "cart", 30), Event("c", "", 20)))])
    recent = store.recent("u1", 2)
    assert [(e.raw_item_id, e.behavior, e.timestamp_s) for e in recent] == [("c", "", 20), ("b", "cart", 30)]
    assert store.recent("unknown-user", 5) == []


def test_equal_timestamps_keep_insertion_order(store):
    store.append([UserEvents("u1", (Event("x", "pv", 50), Event("y", "pv", 50)))])
    store.append([UserEvents("u1", (Event("z", "pv", 50),))])
    recent = store.recent("u1", 5)
    assert items_of(recent) == ["x", "y", "z"]
    assert recent[0].seq < recent[1].seq < recent[2].seq


def test_unset_timestamp_takes_the_store_clock_in_milliseconds(open_store):
    store = open_store(clock=FakeClock(1_234.567))
    store.append([UserEvents("u1", (Event("a", "pv"), Event("b", "pv", 1_000)))])
    stored = store.recent("u1", 2)
    assert [(e.timestamp_ms, e.timestamp_s) for e in stored] == [(1_000_000, 1_000), (1_234_567, 1_234)]


def test_history_is_bounded_per_user_keeping_the_newest(store):
    store.append([events("u1", *"abcdefg"), events("u2", "p", "q")])
    store.append([events("u1", "h", start=1_000)])
    assert items_of(store.recent("u1", 100)) == ["d", "e", "f", "g", "h"]
    assert items_of(store.recent("u2", 100)) == ["p", "q"]


def test_identical_anonymous_events_in_one_call_are_all_kept(open_store):
    # A real re-view within the same (server-clock) second: two identical events, neither may be lost.
    store = open_store(clock=FakeClock(5_000.0))
    result = store.append([UserEvents("u1", (Event("a", "pv"), Event("a", "pv")))])
    assert result == AppendResult(accepted=2, stored=2, duplicates_ignored=0, idempotent_replay=False)
    assert items_of(store.recent("u1", 10)) == ["a", "a"]


def test_an_event_id_is_stored_once_per_user_and_counted(store):
    first = store.append([UserEvents("u1", (Event("a", "pv", 1, "e1"), Event("b", "pv", 2, "e2")))])
    again = store.append([UserEvents("u1", (Event("a", "pv", 1, "e1"), Event("b", "pv", 2, "e2"),
                                            Event("c", "pv", 3, "e3"))),
                          UserEvents("u2", (Event("a", "pv", 1, "e1"),))])  # ids are per user
    assert first == AppendResult(accepted=2, stored=2, duplicates_ignored=0, idempotent_replay=False)
    assert again == AppendResult(accepted=4, stored=2, duplicates_ignored=2, idempotent_replay=False)
    assert items_of(store.recent("u1", 10)) == ["a", "b", "c"]
    assert [e.event_id for e in store.recent("u1", 10)] == ["e1", "e2", "e3"]
    assert items_of(store.recent("u2", 10)) == ["a"]


def test_repeated_idempotency_key_is_acknowledged_without_storing_twice(open_store):
    batch = [UserEvents("u1", (Event("a", "pv"), Event("b", "pv")))]  # server-timestamped: a retry differs in time
    store = open_store(clock=FakeClock(1_700_000_000))
    first = store.append(batch, idempotency_key="k1")
    other_client = open_store(clock=FakeClock(1_700_000_030))
    retry = other_client.append(batch, idempotency_key="k1")
    assert first == AppendResult(accepted=2, stored=2, duplicates_ignored=0, idempotent_replay=False)
    assert retry == AppendResult(accepted=2, stored=0, duplicates_ignored=2, idempotent_replay=True)
    assert items_of(store.recent("u1", 10)) == ["a", "b"]


def test_idempotency_key_reused_with_another_payload_is_refused_and_stores_nothing(store):
    store.append([events("u1", "a")], idempotency_key="k1")
    with pytest.raises(FailedPrecondition) as raised:
        store.append([events("u1", "b", start=500)], idempotency_key="k1")
    assert str(raised.value).startswith("idempotency_key: 'k1'")
    assert items_of(store.recent("u1", 10)) == ["a"]


def test_idempotency_keys_expire_after_their_ttl(open_store):
    clock = FakeClock(1_000_000.0)
    store = open_store(idempotency_ttl_s=60, clock=clock)
    store.append([UserEvents("u1", (Event("a", "pv"),))], idempotency_key="k1")
    clock.now += 61
    later = store.append([UserEvents("u1", (Event("a", "pv"),))], idempotency_key="k1")
    assert later == AppendResult(accepted=1, stored=1, duplicates_ignored=0, idempotent_replay=False)
    assert [e.timestamp_s for e in store.recent("u1", 5)] == [1_000_000, 1_000_061]


def test_concurrent_appends_from_threads_are_all_stored(open_store):
    store = open_store(max_events_per_user=1_000)
    num_threads, appends_per_thread = 8, 20
    failures = []

    def worker(thread):
        try:
            for i in range(appends_per_thread):
                store.append([events(f"u{thread % 2}", f"t{thread}-{i}", start=thread * 1_000 + i)])
                store.recent(f"u{thread % 2}", 3)
        except Exception as error:  # surfaced below: a thread's exception would otherwise vanish
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    total = len(store.recent("u0", 1_000)) + len(store.recent("u1", 1_000))
    assert total == num_threads * appends_per_thread


def _append_from_process(url, worker, count):
    store = open_history_store(HistoryConfig(url=url, max_events_per_user=1_000))
    for i in range(count):
        store.append([events("shared", f"p{worker}-{i}", start=worker * 1_000 + i)])
    store.close()


def test_concurrent_appends_from_processes_on_one_store(history_url, open_store):
    open_store().close()  # create the SQLite schema once
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_from_process, args=(history_url, w, 25)) for w in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert len(open_store(max_events_per_user=1_000).recent("shared", 1_000)) == 50


def test_sqlite_locked_database_is_unavailable_not_internal(db_path):
    store = SQLiteHistoryStore(db_path, max_events_per_user=5, busy_timeout_s=0.05)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Unavailable, match="history_store: SQLite .*locked"):
            store.append([events("u1", "a")])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.append([events("u1", "a")]).stored == 1  # the failed call left no transaction open
    store.close()


def test_closed_store_is_unavailable(store):
    store.close()
    with pytest.raises(Unavailable, match="is closed"):
        store.recent("u1", 1)


def test_open_history_store_opens_sqlite_urls(tmp_path, monkeypatch):
    absolute = open_history_store(HistoryConfig(url=f"sqlite:///{tmp_path}/abs.db", max_events_per_user=7))
    assert absolute.path == tmp_path / "abs.db" and absolute.max_events_per_user == 7
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_history_store(HistoryConfig(url="sqlite:///rel.db"))
    relative.append([events("u1", "a")])
    relative.close()
    assert (tmp_path / "rel.db").exists()


def test_open_history_store_opens_redis_urls(redis_server):
    store = open_history_store(HistoryConfig(url=redis_server.url(db=3), max_events_per_user=7))
    assert isinstance(store, RedisHistoryStore)
    assert store.location == f"127.0.0.1:{redis_server.port}/3" and store.max_events_per_user == 7
    store.append([events("u-db3", "a")])
    with redis_server.client() as client:
        client.select(3)  # the events went to the database the URL names
        assert client.zcard(f"{KEY_PREFIX}events:u-db3") == 1
        client.flushdb()
    store.close()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("postgres://db/x", "must start with 'sqlite:///', 'redis://' or 'rediss://'"),
        ("sqlite:///:memory:", "needs a database file"),
        ("sqlite:///", "needs a database file"),
        ("redis://", "without a host"),
        ("redis://:secret@/0", "without a host"),
        ("redis://localhost:6379/users", "the database after the port must be a number, got 'users'"),
    ],
)
def test_open_history_store_refuses_other_urls_naming_the_field(url, fragment):
    with pytest.raises(ValueError) as raised:
        open_history_store(HistoryConfig(url=url))
    assert str(raised.value).startswith("history.url: ")
    assert fragment in str(raised.value)


def test_history_config_rejects_a_zero_bound():
    with pytest.raises(ValueError, match=r"history.max_events_per_user: must be >= 1, got 0"):
        HistoryConfig(max_events_per_user=0)


def test_an_env_url_is_resolved_from_the_environment_and_checked_again(redis_server):
    config = HistoryConfig(url="env:SEQRANK_HISTORY_URL", wait_replicas=1)
    with pytest.raises(ValueError, match=r"history.url: 'env:SEQRANK_HISTORY_URL' is unresolved"):
        open_history_store(config)
    with pytest.raises(ValueError, match=r"names environment variable SEQRANK_HISTORY_URL, which is not set"):
        resolve_history_url(config, {"SEQRANK_HISTORY_URL": ""})
    with pytest.raises(ValueError, match=r"history.wait_replicas: only applies to redis:// urls"):
        resolve_history_url(config, {"SEQRANK_HISTORY_URL": "sqlite:///x.db"})
    resolved = resolve_history_url(config, {"SEQRANK_HISTORY_URL": redis_server.url(db=2)})
    assert resolved.url == redis_server.url(db=2) and resolved.wait_replicas == 1
    plain = HistoryConfig(url="sqlite:///x.db")
    assert resolve_history_url(plain, {}) is plain


def test_history_config_refuses_wait_replicas_outside_redis():
    with pytest.raises(ValueError, match=r"history.wait_replicas: only applies to redis:// urls"):
        HistoryConfig(url="sqlite:///x.db", wait_replicas=1)
    with pytest.raises(ValueError, match=r"history.wait_timeout_ms: must be >= 1, got 0"):
        HistoryConfig(url="redis://localhost:6379/0", wait_replicas=1, wait_timeout_ms=0)


def with_ids(user_events):
    """The same events, each with an event id derived from its item (so a repeated item is a repeated id)."""
    return UserEvents(user_events.user_id, tuple(Event(e.raw_item_id, e.behavior, e.timestamp_s, f"id-{e.raw_item_id}")
                                                 for e in user_events.events))


def test_one_call_with_a_user_twice_and_a_repeated_event_id_counts_it_once(store):
    result = store.append([with_ids(events("u1", "a", "b")), with_ids(events("u2", "p")),
                           with_ids(events("u1", "b", "c", start=101))])
    assert result == AppendResult(accepted=5, stored=4, duplicates_ignored=1, idempotent_replay=False)
    assert items_of(store.recent("u1", 10)) == ["a", "b", "c"]


def test_an_event_id_trimmed_away_is_no_longer_a_duplicate(store):
    store.append([with_ids(events("u1", *"abcdef"))])  # bound 5: "a" is trimmed
    again = store.append([with_ids(events("u1", "a"))])
    assert again.stored == 1  # stored, then trimmed again as the oldest: like SQLite's INSERT then DELETE
    assert items_of(store.recent("u1", 10)) == ["b", "c", "d", "e", "f"]


def test_sqlite_forgets_a_user_idle_past_the_ttl(db_path):
    clock = FakeClock(1_000_000.0)
    store = SQLiteHistoryStore(db_path, 5, user_ttl_s=3_600, clock=clock)
    store.append([events("idle", "a"), events("active", "b")])
    clock.now += 3_000
    store.append([events("active", "c", start=200)])
    clock.now += 601  # "idle" last wrote 3,601 s ago, "active" 601 s ago
    assert store.recent("idle", 5) == []  # expired at once for readers, before any purge
    assert items_of(store.recent("active", 5)) == ["b", "c"]
    store.append([events("someone", "d")])  # an append purges the expired rows
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM events WHERE user_id = 'idle'").fetchone()[0] == 0
        assert raw.execute("SELECT COUNT(*) FROM users WHERE user_id = 'idle'").fetchone()[0] == 0
    store.append([events("idle", "e", start=300)])  # a returning user starts afresh
    assert items_of(store.recent("idle", 5)) == ["e"]
    store.close()


def test_redis_forgets_a_user_idle_past_the_ttl(redis_server):
    with redis_server.client() as client:
        client.flushall()
        store = RedisHistoryStore(HistoryConfig(url=redis_server.url(), user_ttl_s=1))
        store.append([with_ids(events("idle", "a"))])
        assert 0 < client.pttl(f"{KEY_PREFIX}events:idle") <= 1_000
        assert 0 < client.pttl(f"{KEY_PREFIX}seen:idle") <= 1_000
        time.sleep(1.2)
        assert store.recent("idle", 5) == []
        assert store.append([with_ids(events("idle", "a"))]).stored == 1  # its event ids were forgotten too
    store.close()


def test_sqlite_version_1_files_are_migrated_without_losing_events(db_path):
    with sqlite3.connect(db_path) as old:  # the version-1 schema and one user's events, as written then
        old.executescript("""
            CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
                                 behavior TEXT NOT NULL, timestamp_s INTEGER NOT NULL);
            CREATE UNIQUE INDEX events_exact_duplicate ON events (user_id, item_id, behavior, timestamp_s);
            CREATE INDEX events_by_user_time ON events (user_id, timestamp_s, seq);
            CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, payload_sha256 TEXT NOT NULL, created_s INTEGER);
            INSERT INTO events (user_id, item_id, behavior, timestamp_s) VALUES ('u1', 'a', 'pv', 100), ('u1', 'b', '', 200);
            PRAGMA user_version = 1;
        """)
    store = SQLiteHistoryStore(db_path, 5, user_ttl_s=3_600, clock=FakeClock(1_000.0))
    assert [(e.raw_item_id, e.behavior, e.timestamp_ms) for e in store.recent("u1", 5)] == [
        ("a", "pv", 100_000), ("b", "", 200_000)]  # kept, and counted as active from the migration on
    assert store.append([UserEvents("u1", (Event("b", "", 200),))]).stored == 1  # no exact-duplicate rule now
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()
    assert len(SQLiteHistoryStore(db_path, 5).recent("u1", 5)) == 3  # reopening a version-2 file changes nothing


def test_redis_reads_members_written_before_millisecond_timestamps(redis_server):
    with redis_server.client() as client:
        client.flushall()
        client.zadd(f"{KEY_PREFIX}events:old", {f"{1:016x}" + '["a","pv",100]': 100})
    store = RedisHistoryStore(HistoryConfig(url=redis_server.url()))
    assert [(e.raw_item_id, e.timestamp_ms, e.event_id) for e in store.recent("old", 5)] == [("a", 100_000, "")]
    store.close()


def test_redis_a_retried_append_script_writes_nothing_twice(redis_server, monkeypatch):
    # redis-py re-sends the script after a lost connection; if the first run had applied, the retry must not
    # store the events again. Same applied-marker id = the same call.
    import uuid

    with redis_server.client() as client:
        client.flushall()
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    store = RedisHistoryStore(HistoryConfig(url=redis_server.url()))
    batch = [UserEvents("u1", (Event("a", "pv", 1), Event("a", "pv", 1)))]
    assert store.append(batch).stored == 2
    assert store.append(batch).stored == 2  # the retry reports the first run's outcome
    assert items_of(store.recent("u1", 10)) == ["a", "a"]
    store.close()


def test_durability_is_reported_from_the_server_settings(db_path, new_redis_server):
    assert SQLiteHistoryStore(db_path, 5).durability().durable is True
    durable = new_redis_server("durable")  # appendonly yes, appendfsync always (conftest)
    assert RedisHistoryStore(HistoryConfig(url=durable.url())).durability().durable is True
    lax = new_redis_server("lax", "--appendfsync", "everysec")
    report = RedisHistoryStore(HistoryConfig(url=lax.url())).durability()
    assert report.durable is False and "appendfsync everysec" in report.reason
    locked = new_redis_server("locked", "--rename-command", "CONFIG", "")
    report = RedisHistoryStore(HistoryConfig(url=locked.url())).durability()
    assert report.durable is None and "cannot read its persistence settings" in report.reason


# Random append sequences: both backends must answer every call and every read identically.
_event = st.builds(Event, st.sampled_from("abcd"), st.sampled_from(["pv", ""]),
                   st.one_of(st.none(), st.integers(0, 3)), st.sampled_from(["", "", "e1", "e2"]))
_user_events = st.builds(UserEvents, st.sampled_from(["u1", "u2"]), st.lists(_event, max_size=4).map(tuple))
_call = st.tuples(st.lists(_user_events, min_size=1, max_size=3), st.one_of(st.none(), st.sampled_from(["k1", "k2"])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(_call, min_size=1, max_size=6))
def test_both_backends_agree_on_random_append_sequences(tmp_path_factory, redis_server, calls):
    with redis_server.client() as client:
        client.flushall()
    url_sqlite = f"sqlite:///{tmp_path_factory.mktemp('agree')}/history.db"
    stores = [open_backend(url, 3, clock=FakeClock(2)) for url in (url_sqlite, redis_server.url())]
    try:
        for user_events, idempotency_key in calls:
            outcomes = []
            for store in stores:
                try:
                    outcomes.append(store.append(user_events, idempotency_key=idempotency_key))
                except FailedPrecondition as error:
                    outcomes.append(str(error))
                outcomes[-1] = (outcomes[-1], [[(e.raw_item_id, e.behavior, e.timestamp_ms, e.event_id) for e in
                                                store.recent(user, 10)] for user in ("u1", "u2")])
            assert outcomes[0] == outcomes[1]
    finally:
        for store in stores:
            store.close()


def test_redis_acknowledged_appends_survive_kill_9_and_a_restart(new_redis_server):
    server = new_redis_server()
    config = HistoryConfig(url=server.url(), max_events_per_user=10)
    store = RedisHistoryStore(config)
    store.append([events("u1", "a", "b")], idempotency_key="k1")
    store.append([events("u1", "c", start=200)])
    last_seq = store.recent("u1", 1)[0].seq
    store.close()
    server.kill()  # no shutdown save, and RDB snapshots are off: only the AOF brings the data back
    server.start()
    reopened = RedisHistoryStore(config)
    assert items_of(reopened.recent("u1", 10)) == ["a", "b", "c"]
    assert reopened.append([events("u1", "a", "b")], idempotency_key="k1").idempotent_replay
    reopened.append([events("u1", "d", start=300)])
    assert reopened.recent("u1", 1)[0].seq > last_seq  # the sequence counter survived too
    reopened.close()


def test_redis_unreachable_is_unavailable_naming_the_server_not_the_password():
    from tests.support import free_port

    port = free_port()  # nothing listens there
    store = RedisHistoryStore(HistoryConfig(url=f"redis://:hunter2@127.0.0.1:{port}/0", busy_timeout_s=0.5))
    with pytest.raises(Unavailable) as raised:
        store.append([events("u1", "a")])
    assert str(raised.value).startswith(f"history_store: Redis 127.0.0.1:{port}/0: ")
    assert "hunter2" not in str(raised.value)
    with pytest.raises(Unavailable):
        store.recent("u1", 1)
    store.close()


def test_redis_out_of_memory_is_unavailable_and_stores_nothing(new_redis_server):
    server = new_redis_server()
    store = RedisHistoryStore(HistoryConfig(url=server.url()))
    with server.client() as client:
        client.config_set("maxmemory", 1)  # every write is refused (policy noeviction)
        with pytest.raises(Unavailable, match="history_store: Redis .*maxmemory"):
            store.append([events("u1", "a", "b"), events("u2", "c")], idempotency_key="k1")
        client.config_set("maxmemory", 0)
        assert client.dbsize() == 0  # the script wrote nothing, not even the sequence counter
    assert store.append([events("u1", "a")], idempotency_key="k1").stored == 1
    store.close()


def test_redis_wait_replicas_acknowledges_only_what_a_replica_holds(new_redis_server):
    primary = new_redis_server("primary", "--repl-diskless-sync-delay", "0")  # default: wait 5 s for more replicas
    replica = new_redis_server("replica", "--replicaof", "127.0.0.1", str(primary.port))
    with replica.client() as client:
        deadline = time.monotonic() + 15
        while client.info("replication")["master_link_status"] != "up" and time.monotonic() < deadline:
            time.sleep(0.05)
    config = HistoryConfig(url=primary.url(), wait_replicas=1, wait_timeout_ms=2_000)
    store = RedisHistoryStore(config)
    store.append([events("u1", "a", "b")])
    from_replica = RedisHistoryStore(HistoryConfig(url=replica.url()))
    assert items_of(from_replica.recent("u1", 10)) == ["a", "b"]  # no sleep: WAIT returned after the replica had it
    from_replica.close()
    replica.kill()
    impatient = RedisHistoryStore(HistoryConfig(url=primary.url(), wait_replicas=1, wait_timeout_ms=50))
    with pytest.raises(Unavailable, match=r"0 of wait_replicas=1 replicas acknowledged within 50 ms"):
        impatient.append([events("u1", "c", start=200)], idempotency_key="k1")
    store.close()
    impatient.close()
