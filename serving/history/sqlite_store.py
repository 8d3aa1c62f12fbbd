"""The SQLite history store: one database file shared by the replicas of one node.

An acknowledged append is durable: WAL with synchronous=FULL fsyncs the log on every commit
(https://www.sqlite.org/pragma.html#pragma_synchronous).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history.events import (
    AppendResult,
    StoredEvent,
    UserEvents,
    append_fingerprint,
)

SCHEMA_VERSION = 1
# Executed one statement at a time inside a transaction (executescript would commit first).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        behavior TEXT NOT NULL,
        timestamp_s INTEGER NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS events_exact_duplicate ON events (user_id, item_id, behavior, timestamp_s)",
    "CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user_id, timestamp_s, seq)",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        payload_sha256 TEXT NOT NULL,
        created_s INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_s)",
)


class SQLiteHistoryStore:
    """HistoryStore on one SQLite file, shared safely by threads (one connection each) and processes (WAL).

    Each call is one short transaction; writes take the write lock up front (BEGIN IMMEDIATE) so two writers
    wait on each other instead of failing on a lock upgrade.
    """

    def __init__(
        self,
        path: str | Path,
        max_events_per_user: int,
        *,
        busy_timeout_s: float = 5.0,
        idempotency_ttl_s: int = 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_events_per_user < 1:
            raise ValueError(f"max_events_per_user: must be >= 1, got {max_events_per_user}")
        self.path = Path(path)
        self.max_events_per_user = max_events_per_user
        self._busy_timeout_s = busy_timeout_s
        self._idempotency_ttl_s = idempotency_ttl_s
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        with self._transaction() as connection:
            for statement in _SCHEMA:
                connection.execute(statement)
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
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as error:  # "database is locked" after busy_timeout_s, disk errors
            raise Unavailable("history_store", f"SQLite {self.path}: {error}") from error

    def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None = None) -> AppendResult:
        accepted = sum(len(u.events) for u in user_events)
        now_s = int(self._clock())
        payload_sha256 = append_fingerprint(user_events) if idempotency_key is not None else ""
        rows = [
            (u.user_id, e.raw_item_id, e.behavior, now_s if e.timestamp_s is None else e.timestamp_s)
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
            # Exact duplicates (same user, item, behaviour, timestamp) are dropped, as training preprocessing does.
            cursor = connection.executemany(
                "INSERT OR IGNORE INTO events (user_id, item_id, behavior, timestamp_s) VALUES (?, ?, ?, ?)", rows
            )
            stored = max(cursor.rowcount, 0)
            for user_id in sorted({u.user_id for u in user_events}):
                connection.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE user_id = ? "
                    "ORDER BY timestamp_s DESC, seq DESC LIMIT -1 OFFSET ?)",
                    (user_id, self.max_events_per_user),
                )
        return AppendResult(accepted, stored=stored, duplicates_ignored=accepted - stored, idempotent_replay=False)

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        with self._transaction(immediate=False) as connection:
            rows = connection.execute(
                "SELECT item_id, behavior, timestamp_s, seq FROM events WHERE user_id = ? "
                "ORDER BY timestamp_s DESC, seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [StoredEvent(*row) for row in reversed(rows)]

    def close(self) -> None:
        """Closes every thread's connection; later calls raise Unavailable."""
        with self._connections_lock:
            self._closed = True
            for connection in self._connections:
                connection.close()
            self._connections.clear()
