"""`seqrank events export` against real SQLite and a real redis-server: events recorded through the store API come
back, through the training loader, as exactly the events recorded (oracle: the list each test recorded).

Timestamps: the store keeps milliseconds, the training log integer seconds; events appended without a timestamp
take the store clock's milliseconds, here deliberately not a whole second.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from seqrank.serving.cli import main
from seqrank.serving.history import Event, HistoryConfig, RedisHistoryStore, SQLiteHistoryStore, UserEvents
from seqrank.serving.history.export import export_events, read_cursor
from seqrank.training.data import build_sequences, load_interactions

BASE_S = 1_700_000_000
CLOCK_S = 1_700_000_500.789  # the store's clock: events without a timestamp get 1_700_000_500_789 ms


def open_store(url: str, max_events_per_user: int = 1000):
    clock = lambda: CLOCK_S  # noqa: E731
    if url.startswith("redis://"):
        return RedisHistoryStore(HistoryConfig(url=url, max_events_per_user=max_events_per_user, user_ttl_s=0),
                                 clock=clock)
    return SQLiteHistoryStore(url[len("sqlite:///"):], max_events_per_user, user_ttl_s=0, clock=clock)


def record(store, events: dict[str, list[tuple]]) -> list[tuple[str, str, int, str]]:
    """Appends (item, behaviour, timestamp_s or None) per user, one call; returns the oracle rows the training
    loader must read back: (user, item, seconds, behaviour with "" read as pv)."""
    store.append([UserEvents(user, tuple(Event(item, behavior, ts) for item, behavior, ts in rows))
                  for user, rows in events.items()])
    return [(user, item, int(CLOCK_S) if ts is None else ts, behavior or "pv")
            for user, rows in events.items() for item, behavior, ts in rows]


def read_back(path: Path) -> Counter:
    loaded = load_interactions(path)
    assert loaded.behaviors is not None
    return Counter(zip(loaded.user_ids, loaded.item_ids, loaded.timestamps.tolist(), loaded.behaviors))


FIRST = {
    "alice": [("i1", "pv", BASE_S + 10), ("i2", "cart", BASE_S + 20), ("i2", "buy", BASE_S + 20)],
    "bob, jr": [("i3", "", BASE_S + 5), ("i1", "fav", None)],  # a comma in the id; "" and a store-clock stamp
    "carol": [("i\"4", "pv", BASE_S + 1), ("i5", "pv", BASE_S + 1), ("i5", "pv", BASE_S + 1)],  # a real repeat
}
SECOND = {
    "alice": [("i9", "buy", BASE_S + 900)],
    "dave": [("i1", "pv", BASE_S + 3)],  # arrives late, with a timestamp older than everything exported so far
    "carol": [("i6", "pv", None)],
}


@pytest.mark.parametrize("page_size", [1, 2, 1000])
def test_export_round_trips_through_the_training_loader(history_url, tmp_path, page_size):
    store = open_store(history_url)
    recorded = record(store, FIRST)
    out = tmp_path / "events.csv"
    result = export_events(store, out, page_size=page_size)
    assert result.rows == len(recorded)
    assert read_back(out) == Counter(recorded)


@pytest.mark.parametrize("page_size", [1, 3, 1000])
def test_resume_from_the_cursor_appends_only_newer_events(history_url, tmp_path, page_size):
    store = open_store(history_url)
    out, cursor = tmp_path / "events.csv", tmp_path / "cursor.json"
    recorded = record(store, FIRST)
    assert export_events(store, out, cursor, page_size=page_size).rows == len(recorded)
    assert export_events(store, out, cursor, page_size=page_size).rows == 0  # nothing new: nothing appended
    recorded += record(store, SECOND)
    assert export_events(store, out, cursor, page_size=page_size).rows == sum(map(len, SECOND.values()))
    assert read_back(out) == Counter(recorded)  # every event once: no duplicate, no gap


def test_rows_past_the_cursor_from_a_crashed_run_are_not_kept(history_url, tmp_path):
    store = open_store(history_url)
    out, cursor = tmp_path / "events.csv", tmp_path / "cursor.json"
    recorded = record(store, FIRST)
    export_events(store, out, cursor)
    with open(out, "a") as handle:  # a run that wrote rows and died before its cursor
        handle.write("alice,i2,1700000020,cart\n" * 50 + "bob, jr,i3")
    recorded += record(store, SECOND)
    export_events(store, out, cursor)
    assert read_back(out) == Counter(recorded)


def test_since_leaves_out_older_events(history_url, tmp_path):
    store = open_store(history_url)
    recorded = record(store, FIRST) + record(store, SECOND)
    since = BASE_S + 10
    out = tmp_path / "events.csv"
    result = export_events(store, out, since_s=since)
    expected = [row for row in recorded if row[2] >= since]
    assert result.rows == len(expected) and result.skipped_before_since == len(recorded) - len(expected)
    assert read_back(out) == Counter(expected)


def test_a_cursor_only_continues_its_own_store_and_file(history_url, tmp_path):
    store = open_store(history_url)
    record(store, FIRST)
    out, cursor = tmp_path / "events.csv", tmp_path / "cursor.json"
    export_events(store, out, cursor)
    out.write_text("user_id,item_id,timestamp,event_type\n")  # replaced by a shorter file
    with pytest.raises(ValueError, match="not the file that cursor continues"):
        export_events(store, out, cursor)
    other = SQLiteHistoryStore(tmp_path / "other.db", 10)
    with pytest.raises(ValueError, match="belongs to"):
        export_events(other, out, cursor)


def sequences_by_user(data) -> dict[str, list[str]]:
    return {user: data.item_ids[data.items[data.offsets[u]:data.offsets[u + 1]]].tolist()
            for u, user in enumerate(data.user_ids)}


def test_cli_export_then_a_tiny_training_run(tmp_path, capsys):
    """`seqrank events export` on a store filled with a synthetic log, then `seqrank train` on the file."""
    from seqrank.training.synthetic import generate_log

    log = generate_log(60, 30, 0)
    db = tmp_path / "history.db"
    store = SQLiteHistoryStore(db, 1000, user_ttl_s=0)
    users: dict[str, list[Event]] = {}
    for user, item, ts in zip(log.user_ids, log.item_ids, log.timestamps):
        users.setdefault(user, []).append(Event(item, "", int(ts)))
    store.append([UserEvents(user, tuple(events)) for user, events in users.items()])
    store.close()
    out, cursor = tmp_path / "events.csv", tmp_path / "cursor.json"
    assert main(["events", "export", "--store", f"sqlite:///{db}", "--out", str(out), "--cursor", str(cursor),
                 "--page-size", "97", "--unspecified-behavior", "click"]) == 0
    assert f"{len(log)} events appended" in capsys.readouterr().out
    assert read_cursor(cursor).after_seq == len(log)
    expected = Counter(zip(log.user_ids, log.item_ids, log.timestamps.tolist(), ["click"] * len(log)))
    assert read_back(out) == expected
    # the loader's own preprocessing sees the same sequences as the generated log
    exported, original = build_sequences(load_interactions(out)), build_sequences(log)
    assert sequences_by_user(exported) == sequences_by_user(original)
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--out", str(run), "--quiet", "--set", "optim.max_epochs=1",
                 "--set", "model.hidden_size=16", "--set", "model.intermediate_size=32",
                 "--set", "optim.num_threads=1"]) == 0
    assert (run / "test_metrics.json").exists()


def test_cli_refuses_a_missing_sqlite_file_and_a_bad_since(tmp_path, capsys):
    missing = tmp_path / "absent.db"
    assert main(["events", "export", "--store", f"sqlite:///{missing}", "--out", str(tmp_path / "o.csv")]) == 2
    assert not missing.exists()
    db = tmp_path / "history.db"
    SQLiteHistoryStore(db, 10).close()
    assert main(["events", "export", "--store", f"sqlite:///{db}", "--out", str(tmp_path / "o.csv"),
                 "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err


def test_since_accepts_iso_dates(tmp_path):
    db = tmp_path / "history.db"
    store = open_store(f"sqlite:///{db}")
    recorded = record(store, FIRST)
    store.close()
    out = tmp_path / "events.csv"
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(BASE_S + 10))
    assert main(["events", "export", "--store", f"sqlite:///{db}", "--out", str(out), "--since", since]) == 0
    assert read_back(out) == Counter(row for row in recorded if row[2] >= BASE_S + 10)
