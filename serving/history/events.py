"""Users' behaviour histories: the event types, the store settings and the `HistoryStore` protocol.

Events are stored with raw ids and behaviour names (not model indices) so histories outlive model versions.
Timestamps are integer Unix seconds, like the training logs. A user's history is ordered by
(timestamp, insertion sequence) - the order training sorts by - and bounded to the newest
`max_events_per_user` events. The backends: `sqlite_store.py` (one node) and `redis_store.py` (shared across
nodes); the package's `open_history_store` picks one from the URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, Sequence

SQLITE_URL_PREFIX = "sqlite:///"
REDIS_URL_PREFIXES = ("redis://", "rediss://")
ENV_URL_PREFIX = "env:"  # url "env:NAME": the URL is the value of environment variable NAME (a Kubernetes Secret)


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


def append_fingerprint(user_events: Sequence[UserEvents]) -> str:
    """Fingerprint of an append's content, to tell a retry from a reused idempotency key."""
    payload = [[u.user_id, [[e.raw_item_id, e.behavior, e.timestamp_s] for e in u.events]] for u in user_events]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()
