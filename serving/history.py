"""Users' behaviour histories: the `HistoryStore` protocol and its SQLite backend.

Events are stored with raw ids and behaviour names (not model indices) so histories outlive model versions.
Timestamps are integer Unix seconds, like the training logs. A user's history is ordered by
(timestamp, insertion sequence) - the order training sorts by - and bounded to the newest
`max_events_per_user` events. An acknowledged append is durable: WAL with synchronous=FULL fsyncs the log
on every commit (https://www.sqlite.org/pragma.html#pragma_synchronous). The Redis backend, for stores shared
across nodes, lives in `serving/history_redis.py`; `open_history_store` picks the backend from the URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

from serving.errors import FailedPrecondition, Unavailable

SQLITE_URL_PREFIX = "sqlite:///"
REDIS_URL_PREFIXES = ("redis://", "rediss://")
ENV_URL_PREFIX = "env:"  # url "env:NAME": the URL is the value of environment variable NAME (a Kubernetes Secret)
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


@dataclass(frozen=True)
class Event:
    """One behaviour event as sent by a caller; `timestamp_s` None = the store's clock at append."""

    raw_item_id: str
    behavior: str  # behaviour name; "" = unspecified
    timestamp_s: int | None = None


@dataclass(frozen=True)
class UserEvents:
    """Events of one user, oldest first."""

    user_id: str
    events: tuple[Event, ...]


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back: always timestamped, `seq` = insertion order across the store."""

    raw_item_id: str
    behavior: str
    timestamp_s: int
    seq: int


@dataclass(frozen=True)
class AppendResult:
    """accepted = stored + duplicates_ignored; `idempotent_replay` = the key was applied before."""

    accepted: int
    stored: int
    duplicates_ignored: int
    idempotent_replay: bool


@dataclass(frozen=True)
class HistoryConfig:
    """Serve-config section for the history store."""

    # sqlite:///relative/path, sqlite:////absolute/path, redis://[:password@]host:port/db (rediss:// = TLS), or
    # env:NAME to keep a password out of the config: the process edge calls resolve_history_url(config, os.environ).
    url: str = "sqlite:///seqrank-history.db"
    max_events_per_user: int = 200  # older events are trimmed; keep >= the encoder's max_len
    # SQLite: wait for another writer's lock; Redis: connect and reply timeout. Then UNAVAILABLE.
    busy_timeout_s: float = 5.0
    idempotency_ttl_s: int = 86_400  # a key is remembered this long
    # Redis only: an append is acknowledged once this many replicas have it (WAIT); 0 = the primary's reply.
    wait_replicas: int = 0
    wait_timeout_ms: int = 100  # Redis only: WAIT's limit; fewer replicas by then -> UNAVAILABLE

    def __post_init__(self) -> None:
        if self.max_events_per_user < 1:
            raise ValueError(f"history.max_events_per_user: must be >= 1, got {self.max_events_per_user}")
        if self.busy_timeout_s <= 0:
            raise ValueError(f"history.busy_timeout_s: must be > 0, got {self.busy_timeout_s}")
        if self.idempotency_ttl_s < 1:
            raise ValueError(f"history.idempotency_ttl_s: must be >= 1, got {self.idempotency_ttl_s}")
        if self.wait_replicas < 0:
            raise ValueError(f"history.wait_replicas: must be >= 0, got {self.wait_replicas}")
        if self.wait_replicas > 0 and not self.url.startswith((*REDIS_URL_PREFIXES, ENV_URL_PREFIX)):
            raise ValueError(f"history.wait_replicas: only applies to redis:// urls, got url {self.url!r}")
        if self.wait_timeout_ms < 1:  # WAIT with timeout 0 would block forever
            raise ValueError(f"history.wait_timeout_ms: must be >= 1, got {self.wait_timeout_ms}")


class HistoryStore(Protocol):
    """Per-user event histories; implementations are safe to call from several threads."""

    def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None = None) -> AppendResult:
        """Stores all events atomically (all or none); raises FailedPrecondition or Unavailable."""
        ...

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        """The user's newest `limit` events, oldest first; [] for an unknown user."""
        ...

    def close(self) -> None: ...


def _payload_sha256(user_events: Sequence[UserEvents]) -> str:
    """Fingerprint of an append's content, to tell a retry from a reused idempotency key."""
    payload = [[u.user_id, [[e.raw_item_id, e.behavior, e.timestamp_s] for e in u.events]] for u in user_events]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()


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
        payload_sha256 = _payload_sha256(user_events) if idempotency_key is not None else ""
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


def resolve_history_url(config: HistoryConfig, environ: Mapping[str, str]) -> HistoryConfig:
    """`config` with an `env:NAME` url replaced by environ[NAME] (and checked again); other urls unchanged."""
    if not config.url.startswith(ENV_URL_PREFIX):
        return config
    name = config.url[len(ENV_URL_PREFIX) :]
    if not environ.get(name):
        raise ValueError(f"history.url: {config.url!r} names environment variable {name}, which is not set or empty")
    return dataclasses.replace(config, url=environ[name])


def open_history_store(config: HistoryConfig) -> HistoryStore:
    """The backend named by `config.url`: sqlite:///relative, sqlite:////absolute or redis://host:port/db."""
    url = config.url
    if url.startswith(SQLITE_URL_PREFIX):
        path = url[len(SQLITE_URL_PREFIX) :]
        if path in ("", ":memory:"):
            raise ValueError(f"history.url: needs a database file (shared by replicas), got {url!r}")
        return SQLiteHistoryStore(
            path,
            config.max_events_per_user,
            busy_timeout_s=config.busy_timeout_s,
            idempotency_ttl_s=config.idempotency_ttl_s,
        )
    if url.startswith(ENV_URL_PREFIX):
        raise ValueError(f"history.url: {url!r} is unresolved; call resolve_history_url(config, os.environ) first")
    if url.startswith(REDIS_URL_PREFIXES):
        from serving.history_redis import RedisHistoryStore  # here, not at the top: it imports this module's types

        return RedisHistoryStore(config)
    raise ValueError(f"history.url: must start with {SQLITE_URL_PREFIX!r}, 'redis://' or 'rediss://', got {url!r}")
