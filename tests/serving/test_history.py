"""SQLite history store: durability across clients and processes, order, bounds, duplicates, idempotency."""

import multiprocessing
import sqlite3
import threading

import pytest

from serving.errors import FailedPrecondition, Unavailable
from serving.history import (
    AppendResult,
    Event,
    HistoryConfig,
    SQLiteHistoryStore,
    UserEvents,
    open_history_store,
)


class FakeClock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "history.db"


@pytest.fixture
def store(db_path):
    store = SQLiteHistoryStore(db_path, max_events_per_user=5)
    yield store
    store.close()


def events(user_id, *items, start=100):
    return UserEvents(user_id, tuple(Event(item, "pv", start + i) for i, item in enumerate(items)))


def items_of(stored):
    return [event.raw_item_id for event in stored]


def test_acknowledged_events_are_visible_to_a_second_client_and_after_reopening(db_path):
    writer = SQLiteHistoryStore(db_path, max_events_per_user=10)
    reader = SQLiteHistoryStore(db_path, max_events_per_user=10)
    writer.append([events("u1", "a", "b")])
    assert items_of(reader.recent("u1", 10)) == ["a", "b"]  # read-your-writes across two clients
    reader.append([events("u1", "c", start=200)])
    assert items_of(writer.recent("u1", 10)) == ["a", "b", "c"]
    writer.close()
    reader.close()
    reopened = SQLiteHistoryStore(db_path, max_events_per_user=10)
    assert items_of(reopened.recent("u1", 10)) == ["a", "b", "c"]
    reopened.close()


def test_store_runs_in_wal_mode_with_full_sync(store, db_path):
    store.append([events("u1", "a")])
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


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


def test_unset_timestamp_takes_the_store_clock(db_path):
    store = SQLiteHistoryStore(db_path, max_events_per_user=5, clock=FakeClock(1_234.9))
    store.append([UserEvents("u1", (Event("a", "pv"),))])
    assert store.recent("u1", 1)[0].timestamp_s == 1_234
    store.close()


def test_history_is_bounded_per_user_keeping_the_newest(store):
    store.append([events("u1", *"abcdefg"), events("u2", "p", "q")])
    store.append([events("u1", "h", start=1_000)])
    assert items_of(store.recent("u1", 100)) == ["d", "e", "f", "g", "h"]
    assert items_of(store.recent("u2", 100)) == ["p", "q"]


def test_exact_duplicates_are_ignored_and_counted(store):
    first = store.append([events("u1", "a", "b")])
    again = store.append([events("u1", "a", "b", "c")])
    assert first == AppendResult(accepted=2, stored=2, duplicates_ignored=0, idempotent_replay=False)
    assert again == AppendResult(accepted=3, stored=1, duplicates_ignored=2, idempotent_replay=False)
    assert items_of(store.recent("u1", 10)) == ["a", "b", "c"]


def test_repeated_idempotency_key_is_acknowledged_without_storing_twice(db_path):
    batch = [UserEvents("u1", (Event("a", "pv"), Event("b", "pv")))]  # server-timestamped: a retry differs in time
    store = SQLiteHistoryStore(db_path, max_events_per_user=5, clock=FakeClock(1_700_000_000))
    first = store.append(batch, idempotency_key="k1")
    other_client = SQLiteHistoryStore(db_path, max_events_per_user=5, clock=FakeClock(1_700_000_030))
    retry = other_client.append(batch, idempotency_key="k1")
    other_client.close()
    assert first == AppendResult(accepted=2, stored=2, duplicates_ignored=0, idempotent_replay=False)
    assert retry == AppendResult(accepted=2, stored=0, duplicates_ignored=2, idempotent_replay=True)
    assert items_of(store.recent("u1", 10)) == ["a", "b"]
    store.close()


def test_idempotency_key_reused_with_another_payload_is_refused_and_stores_nothing(store):
    store.append([events("u1", "a")], idempotency_key="k1")
    with pytest.raises(FailedPrecondition) as raised:
        store.append([events("u1", "b", start=500)], idempotency_key="k1")
    assert str(raised.value).startswith("idempotency_key: 'k1'")
    assert items_of(store.recent("u1", 10)) == ["a"]


def test_idempotency_keys_expire_after_their_ttl(db_path):
    clock = FakeClock(1_000_000.0)
    store = SQLiteHistoryStore(db_path, max_events_per_user=5, idempotency_ttl_s=60, clock=clock)
    store.append([UserEvents("u1", (Event("a", "pv"),))], idempotency_key="k1")
    clock.now += 61
    later = store.append([UserEvents("u1", (Event("a", "pv"),))], idempotency_key="k1")
    assert later == AppendResult(accepted=1, stored=1, duplicates_ignored=0, idempotent_replay=False)
    assert [e.timestamp_s for e in store.recent("u1", 5)] == [1_000_000, 1_000_061]
    store.close()


def test_concurrent_appends_from_threads_are_all_stored(db_path):
    store = SQLiteHistoryStore(db_path, max_events_per_user=1_000)
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
    store.close()


def _append_from_process(path, worker, count):
    store = SQLiteHistoryStore(path, max_events_per_user=1_000)
    for i in range(count):
        store.append([events("shared", f"p{worker}-{i}", start=worker * 1_000 + i)])
    store.close()


def test_concurrent_appends_from_processes_on_one_file(db_path):
    SQLiteHistoryStore(db_path, max_events_per_user=1_000).close()  # create the schema once
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_from_process, args=(db_path, w, 25)) for w in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    store = SQLiteHistoryStore(db_path, max_events_per_user=1_000)
    assert len(store.recent("shared", 1_000)) == 50
    store.close()


def test_a_locked_database_is_unavailable_not_internal(db_path):
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


def test_open_history_store_parses_sqlite_urls(tmp_path, monkeypatch):
    absolute = open_history_store(HistoryConfig(url=f"sqlite:///{tmp_path}/abs.db", max_events_per_user=7))
    assert absolute.path == tmp_path / "abs.db" and absolute.max_events_per_user == 7
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_history_store(HistoryConfig(url="sqlite:///rel.db"))
    relative.append([events("u1", "a")])
    relative.close()
    assert (tmp_path / "rel.db").exists()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("redis://localhost:6379/0", "the Redis backend is not configured yet"),
        ("postgres://db/x", "must start with 'sqlite:///'"),
        ("sqlite:///:memory:", "needs a database file"),
        ("sqlite:///", "needs a database file"),
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
