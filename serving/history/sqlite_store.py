"""The SQLite history store: one database file shared by the replicas of one node.

An acknowledged append is durable: WAL with synchronous=FULL fsyncs the log on every commit
(https://www.sqlite.org/pragma.html#pragma_synchronous).

Tables (schema version 3, in PRAGMA user_version): `events`, `users` and `idempotency_keys` hold the histories;
the live catalogue's state is in
- `catalogue_items`: one row per item ever changed through write_items: `attributes` (JSON list of the raw values,
  NULL = never upserted), `available` (0 = hidden), `version` (the catalogue version of the write that last changed
  the row; indexed, so `items_since` is a range scan);
- `catalogue_meta`: one row, the store-wide catalogue version (0 before the first write);
- `catalogue_idempotency_keys`: write_items' keys and payload hashes, apart from RecordEvents' `idempotency_keys`
  so an events key and an items key never collide. Catalogue rows never expire (user_ttl_s is for histories).
Version 1 files are migrated to 2 (millisecond timestamps, event ids) and then 3 (the catalogue tables) on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history.events import (
    MS_PER_S,
    AppendResult,
    CatalogueWrite,
    Durability,
    ItemChange,
    ItemState,
    StoredEvent,
    UserEvents,
    append_fingerprint,
    attributes_json,
    items_fingerprint,
)

SCHEMA_VERSION = 3
# Executed one statement at a time inside a transaction (executescript would commit first).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        behavior TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        event_id TEXT
    )""",
    # A caller's event id is stored once per user; anonymous events (NULL id) are all kept.
    "CREATE UNIQUE INDEX IF NOT EXISTS events_by_event_id ON events (user_id, event_id) WHERE event_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user_id, timestamp_ms, seq)",
    """CREATE TABLE IF NOT EXISTS users (
        user_id TEXT PRIMARY KEY,
        last_append_ms INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS users_by_last_append ON users (last_append_ms)",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        payload_sha256 TEXT NOT NULL,
        created_s INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_s)",
    # Version 3: the live catalogue. A version-2 file gains these tables (and the version-0 counter row) on open;
    # nothing existing changes.
    """CREATE TABLE IF NOT EXISTS catalogue_items (
        item_id TEXT PRIMARY KEY,
        attributes TEXT,
        available INTEGER NOT NULL DEFAULT 1,
        version INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS catalogue_items_by_version ON catalogue_items (version, item_id)",
    """CREATE TABLE IF NOT EXISTS catalogue_meta (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 0),
        version INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO catalogue_meta (singleton, version) VALUES (0, 0)",
    """CREATE TABLE IF NOT EXISTS catalogue_idempotency_keys (
        key TEXT PRIMARY KEY,
        payload_sha256 TEXT NOT NULL,
        created_s INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS catalogue_idempotency_keys_by_age ON catalogue_idempotency_keys (created_s)",
)
# Version 1 -> 2: second timestamps become milliseconds, exact-duplicate suppression gives way to event ids,
# and every existing user counts as active now (none expires the moment the retention window starts).
_MIGRATE_FROM_1 = (
    "DROP INDEX IF EXISTS events_exact_duplicate",
    "DROP INDEX IF EXISTS events_by_user_time",
    "ALTER TABLE events RENAME COLUMN timestamp_s TO timestamp_ms",
    "UPDATE events SET timestamp_ms = timestamp_ms * 1000",
    "ALTER TABLE events ADD COLUMN event_id TEXT",
)


class SQLiteHistoryStore:
    """HistoryStore on one SQLite file, shared safely by threads (one connection each) and processes (WAL).

    Each call is one short transaction; writes take the write lock up front (BEGIN IMMEDIATE) so two writers
    wait on each other instead of failing on a lock upgrade.
    """

    backend = "sqlite"  # the label of seqrank_history_store_durable

    def __init__(
        self,
        path: str | Path,
        max_events_per_user: int,
        *,
        busy_timeout_s: float = 5.0,
        idempotency_ttl_s: int = 86_400,
        user_ttl_s: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_events_per_user < 1:
            raise ValueError(f"max_events_per_user: must be >= 1, got {max_events_per_user}")
        self.path = Path(path)
        self.max_events_per_user = max_events_per_user
        self._busy_timeout_s = busy_timeout_s
        self._idempotency_ttl_s = idempotency_ttl_s
        self._user_ttl_ms = user_ttl_s * MS_PER_S
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._in_use: set[int] = set()  # ids of the connections inside a transaction right now
        self._closed = False
        with self._transaction() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition("history.url", f"{self.path} has schema version {version}, newer than "
                                                        f"this seqrank's {SCHEMA_VERSION}: upgrade seqrank")
            if version == 1:
                for statement in _MIGRATE_FROM_1:
                    connection.execute(statement)
            for statement in _SCHEMA:
                connection.execute(statement)
            if version == 1:
                connection.execute("INSERT OR IGNORE INTO users (user_id, last_append_ms) "
                                   "SELECT DISTINCT user_id, ? FROM events", (self._now_ms(),))
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise Unavailable("history_store", f"{self.path} is closed")
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        # check_same_thread=False only so close() may close it; otherwise only this thread uses it.
        connection = sqlite3.connect(
            self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode = WAL")  # persistent in the file; switching needs the lock
            connection.execute("PRAGMA synchronous = FULL")  # per connection: fsync the WAL on every commit
        except BaseException:
            connection.close()
            raise
        self._local.connection = connection
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection, rolled back on any error; lock errors -> Unavailable."""
        try:
            connection = self._acquire()
            try:
                connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield connection
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
            finally:
                self._release(connection)
        except sqlite3.OperationalError as error:  # "database is locked" after busy_timeout_s, disk errors
            raise Unavailable("history_store", f"SQLite {self.path}: {error}") from error

    def _acquire(self) -> sqlite3.Connection:
        connection = self._connection()
        with self._connections_lock:
            if self._closed:
                raise Unavailable("history_store", f"{self.path} is closed")
            self._in_use.add(id(connection))
        return connection

    def _release(self, connection: sqlite3.Connection) -> None:
        """Ends this thread's use; closes the connection when the store was closed meanwhile (close() leaves a
        connection inside a transaction to its thread: closing it under the thread crashes sqlite3)."""
        with self._connections_lock:
            self._in_use.discard(id(connection))
            if self._closed:
                connection.close()

    def _now_ms(self) -> int:
        return int(self._clock() * MS_PER_S)

    def _expired_before_ms(self, now_ms: int) -> int | None:
        """Users whose last append is older than this are expired; None when histories never expire."""
        return now_ms - self._user_ttl_ms if self._user_ttl_ms else None

    def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None = None) -> AppendResult:
        accepted = sum(len(u.events) for u in user_events)
        now_ms = self._now_ms()
        now_s = now_ms // MS_PER_S
        payload_sha256 = append_fingerprint(user_events) if idempotency_key is not None else ""
        rows = [
            (u.user_id, e.raw_item_id, e.behavior, now_ms if e.timestamp_s is None else e.timestamp_s * MS_PER_S,
             e.event_id or None)
            for u in user_events
            for e in u.events
        ]
        with self._transaction() as connection:
            if idempotency_key is not None:
                connection.execute(
                    "DELETE FROM idempotency_keys WHERE created_s < ?", (now_s - self._idempotency_ttl_s,)
                )
                seen = connection.execute(
                    "SELECT payload_sha256 FROM idempotency_keys WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if seen is not None:
                    if seen[0] != payload_sha256:
                        raise FailedPrecondition(
                            "idempotency_key", f"{idempotency_key!r} was already used with a different payload"
                        )
                    return AppendResult(accepted, stored=0, duplicates_ignored=accepted, idempotent_replay=True)
                connection.execute(
                    "INSERT INTO idempotency_keys (key, payload_sha256, created_s) VALUES (?, ?, ?)",
                    (idempotency_key, payload_sha256, now_s),
                )
            self._purge_expired(connection, now_ms)
            # Only an event id the user already holds is a duplicate (the partial unique index); anonymous events
            # are all kept, so a real re-view within the same second is never lost.
            cursor = connection.executemany(
                "INSERT OR IGNORE INTO events (user_id, item_id, behavior, timestamp_ms, event_id) "
                "VALUES (?, ?, ?, ?, ?)", rows
            )
            stored = max(cursor.rowcount, 0)
            for user_id in sorted({u.user_id for u in user_events}):
                connection.execute(
                    "INSERT INTO users (user_id, last_append_ms) VALUES (?, ?) "
                    "ON CONFLICT (user_id) DO UPDATE SET last_append_ms = excluded.last_append_ms",
                    (user_id, now_ms),
                )
                connection.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE user_id = ? "
                    "ORDER BY timestamp_ms DESC, seq DESC LIMIT -1 OFFSET ?)",
                    (user_id, self.max_events_per_user),
                )
        return AppendResult(accepted, stored=stored, duplicates_ignored=accepted - stored, idempotent_replay=False)

    def _purge_expired(self, connection: sqlite3.Connection, now_ms: int) -> None:
        """Deletes the histories of users idle past user_ttl_s (an indexed range scan: cheap when none are)."""
        cutoff = self._expired_before_ms(now_ms)
        if cutoff is None:
            return
        connection.execute("DELETE FROM events WHERE user_id IN (SELECT user_id FROM users WHERE last_append_ms < ?)",
                           (cutoff,))
        connection.execute("DELETE FROM users WHERE last_append_ms < ?", (cutoff,))

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        cutoff = self._expired_before_ms(self._now_ms())
        with self._transaction(immediate=False) as connection:
            if cutoff is not None:
                active = connection.execute("SELECT last_append_ms FROM users WHERE user_id = ?", (user_id,)).fetchone()
                if active is None or active[0] < cutoff:  # expired, not yet purged by an append
                    return []
            rows = connection.execute(
                "SELECT item_id, behavior, timestamp_ms, seq, COALESCE(event_id, '') FROM events WHERE user_id = ? "
                "ORDER BY timestamp_ms DESC, seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [StoredEvent(*row) for row in reversed(rows)]

    def events_after(self, seq: int, limit: int) -> list[tuple[str, StoredEvent]]:
        """Read-only export page: up to `limit` (user_id, event) rows with seq > `seq`, in seq (insertion) order.

        Keyset pagination on the primary key. Writers hold the lock from the insert to the commit, so the rows a
        reader sees always form a prefix of the seq order: a row committed later never has a smaller seq."""
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        with self._transaction(immediate=False) as connection:
            rows = connection.execute(
                "SELECT user_id, item_id, behavior, timestamp_ms, seq, COALESCE(event_id, '') FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [(row[0], StoredEvent(*row[1:])) for row in rows]

    def write_items(self, changes: Sequence[ItemChange], idempotency_key: str | None = None) -> CatalogueWrite:
        now_s = self._now_ms() // MS_PER_S
        payload_sha256 = items_fingerprint(changes) if idempotency_key is not None else ""
        wanted = [(c.raw_item_id, None if c.attributes is None else attributes_json(c.attributes), c.available)
                  for c in changes]
        with self._transaction() as connection:
            version = connection.execute("SELECT version FROM catalogue_meta").fetchone()[0]
            if idempotency_key is not None:
                connection.execute(
                    "DELETE FROM catalogue_idempotency_keys WHERE created_s < ?", (now_s - self._idempotency_ttl_s,)
                )
                seen = connection.execute(
                    "SELECT payload_sha256 FROM catalogue_idempotency_keys WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if seen is not None:
                    if seen[0] != payload_sha256:
                        raise FailedPrecondition(
                            "idempotency_key", f"{idempotency_key!r} was already used with a different payload"
                        )
                    return CatalogueWrite(applied=0, version=version, idempotent_replay=True)
                connection.execute(
                    "INSERT INTO catalogue_idempotency_keys (key, payload_sha256, created_s) VALUES (?, ?, ?)",
                    (idempotency_key, payload_sha256, now_s),
                )
            # Changes apply in order, each against the state the earlier ones left (the Redis script does the same).
            states: dict[str, list] = {}  # item -> [attributes JSON or None, available]
            changed_items: dict[str, None] = {}  # ordered set
            applied = 0
            for item_id, attributes, available in wanted:
                state = states.get(item_id)
                if state is None:
                    row = connection.execute(
                        "SELECT attributes, available FROM catalogue_items WHERE item_id = ?", (item_id,)
                    ).fetchone()
                    state = states[item_id] = [row[0], bool(row[1])] if row is not None else [None, True]
                changed = False
                if attributes is not None and attributes != state[0]:
                    state[0], changed = attributes, True
                if available is not None and available != state[1]:
                    state[1], changed = available, True
                if changed:
                    applied += 1
                    changed_items[item_id] = None
            if applied:
                version += 1
                connection.execute("UPDATE catalogue_meta SET version = ?", (version,))
                connection.executemany(
                    "INSERT INTO catalogue_items (item_id, attributes, available, version) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (item_id) DO UPDATE SET attributes = excluded.attributes, "
                    "available = excluded.available, version = excluded.version",
                    [(item_id, states[item_id][0], int(states[item_id][1]), version) for item_id in changed_items],
                )
        return CatalogueWrite(applied=applied, version=version, idempotent_replay=False)

    def items_since(self, version: int) -> tuple[list[ItemState], int]:
        if version < 0:
            raise ValueError(f"version: must be >= 0, got {version}")
        with self._transaction(immediate=False) as connection:  # one read snapshot: rows and counter agree
            current = connection.execute("SELECT version FROM catalogue_meta").fetchone()[0]
            rows = connection.execute(
                "SELECT item_id, attributes, available, version FROM catalogue_items WHERE version > ? "
                "ORDER BY version, item_id",
                (version,),
            ).fetchall()
        items = [ItemState(item_id, None if attributes is None else tuple(json.loads(attributes)), bool(available),
                           item_version)
                 for item_id, attributes, available, item_version in rows]
        return items, current

    def durability(self) -> Durability:
        return Durability(True, f"SQLite {self.path}: WAL journal, synchronous=FULL (fsync on every commit)")

    def close(self) -> None:
        """Closes every idle connection now and each busy one when its transaction ends; later calls raise
        Unavailable. Safe while other threads (a catalogue poll, a store call past its deadline) are mid-call."""
        with self._connections_lock:
            self._closed = True
            for connection in self._connections:
                if id(connection) not in self._in_use:
                    connection.close()
            self._connections.clear()
