"""Users' behaviour histories: the event types, the store settings and the `HistoryStore` protocol.

Events are stored with raw ids and behaviour names (not model indices) so histories outlive model versions.
Timestamps are integer Unix seconds, like the training logs. A user's history is ordered by
(timestamp, insertion sequence) - the order training sorts by - and bounded to the newest
`max_events_per_user` events. The backends: `sqlite_store.py` (one node) and `redis_store.py` (shared across
nodes); the package's `open_history_store` picks one from the URL.

The same store also holds the live catalogue's durable state (UpsertItems, SetItemAvailability): one `ItemState`
per item changed since training, each stamped with the store-wide catalogue version of the write that last changed
it. Replicas converge by polling `items_since(the version they hold)`. Catalogue state never expires
(`user_ttl_s` applies to histories only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, Sequence

SQLITE_URL_PREFIX = "sqlite:///"
REDIS_URL_PREFIXES = ("redis://", "rediss://")
ENV_URL_PREFIX = "env:"  # url "env:NAME": the URL is the value of environment variable NAME (a Kubernetes Secret)


MS_PER_S = 1000
DAY_S = 86_400


@dataclass(frozen=True)
class Event:
    """One behaviour event as sent by a caller; `timestamp_s` None = the store's clock at append (in ms).

    `event_id` "" = anonymous: stored every time it is sent. A non-empty id is stored once per user."""

    raw_item_id: str
    behavior: str  # behaviour name; "" = unspecified
    timestamp_s: int | None = None
    event_id: str = ""


@dataclass(frozen=True)
class UserEvents:
    """Events of one user, oldest first."""

    user_id: str
    events: tuple[Event, ...]


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back: always timestamped (Unix milliseconds), `seq` = insertion order across the store."""

    raw_item_id: str
    behavior: str
    timestamp_ms: int
    seq: int
    event_id: str = ""

    @property
    def timestamp_s(self) -> int:
        """Unix seconds, as the training logs count time."""
        return self.timestamp_ms // MS_PER_S


@dataclass(frozen=True)
class Durability:
    """Whether the store's settings keep an acknowledged append through a crash; None = could not be checked."""

    durable: bool | None
    reason: str  # what was checked and found, for the start-up log line


@dataclass(frozen=True)
class AppendResult:
    """accepted = stored + duplicates_ignored; `idempotent_replay` = the key was applied before."""

    accepted: int
    stored: int
    duplicates_ignored: int
    idempotent_replay: bool


@dataclass(frozen=True)
class ItemChange:
    """One item's change in a `write_items` call; a field left None is not changed by it.

    `attributes` replaces the item's raw attribute values as a whole (() = no attributes); `available` False hides
    the item (sold out), True restores it. Attributes and availability change independently."""

    raw_item_id: str
    attributes: tuple[str, ...] | None = None
    available: bool | None = None


@dataclass(frozen=True)
class ItemState:
    """An item's current catalogue state as stored.

    `attributes` None = never upserted (a trained item: its attributes come from the artifact); an item is
    available unless hidden. `version` = the catalogue version of the write that last changed the item."""

    raw_item_id: str
    attributes: tuple[str, ...] | None
    available: bool
    version: int


@dataclass(frozen=True)
class CatalogueWrite:
    """`applied` = changes that changed the stored state (a change setting what is stored is not counted);
    `version` = the catalogue version the write is visible at (the current version when nothing changed or the
    call is an `idempotent_replay`: replicas that read up to it have the write)."""

    applied: int
    version: int
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
    # A user's history is forgotten this long after its last RecordEvents (0 = kept until trimmed by
    # max_events_per_user). Redis: the keys' TTL; SQLite: purged on a later append, never read past it.
    user_ttl_s: int = 180 * DAY_S
    # Each store call gets this long in all (retries included) on the ingress's store threads; past it Rank
    # degrades to HISTORY_SOURCE_STORE_UNAVAILABLE and RecordEvents answers UNAVAILABLE (safe to retry with the
    # same idempotency key). The store's own timeouts keep running on the thread: max_concurrent_calls bounds them.
    call_timeout_s: float = 1.0
    max_concurrent_calls: int = 8  # threads per ingress replica for store calls, apart from the encoder's
    # Refuse to start unless the store keeps acknowledged appends through a crash (Redis: appendonly yes and
    # appendfsync always). false: start anyway, say so in the log and in seqrank_history_store_durable.
    require_durable: bool = False
    # Every replica reads the live catalogue's changes (UpsertItems, SetItemAvailability) this often: the bound on
    # how long a change takes to reach a replica that did not make it (the one that did sees it at once).
    catalogue_sync_ms: int = 500

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
        if self.user_ttl_s < 0:
            raise ValueError(f"history.user_ttl_s: must be >= 0 (0 = never expire), got {self.user_ttl_s}")
        if not self.call_timeout_s > 0:
            raise ValueError(f"history.call_timeout_s: must be > 0, got {self.call_timeout_s}")
        if self.catalogue_sync_ms < 10:
            raise ValueError(f"history.catalogue_sync_ms: must be >= 10, got {self.catalogue_sync_ms}")
        if self.max_concurrent_calls < 1:
            raise ValueError(f"history.max_concurrent_calls: must be >= 1, got {self.max_concurrent_calls}")


class HistoryStore(Protocol):
    """Per-user event histories; implementations are safe to call from several threads."""

    backend: str  # "sqlite" or "redis"

    def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None = None) -> AppendResult:
        """Stores all events atomically (all or none); raises FailedPrecondition or Unavailable."""
        ...

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        """The user's newest `limit` events, oldest first; [] for an unknown or expired user."""
        ...

    def write_items(self, changes: Sequence[ItemChange], idempotency_key: str | None = None) -> CatalogueWrite:
        """Applies the catalogue changes atomically (all or none), in order; raises FailedPrecondition or Unavailable.

        A call that changes anything takes the next catalogue version (+1 per call), and every item it changed gets
        that version; a call that changes nothing leaves the version as it is. Same idempotency key + same changes
        = replay acknowledged without writing; same key + other changes = FailedPrecondition("idempotency_key").
        Items' keys are a namespace of their own: an events key and an items key never collide."""
        ...

    def items_since(self, version: int) -> tuple[list[ItemState], int]:
        """Every item whose version > `version`, in its latest state, ordered by (version, raw_item_id), and the
        current catalogue version (poll again from it); `items_since(0)` = the whole stored catalogue state."""
        ...

    def durability(self) -> Durability:
        """What the store's settings promise for acknowledged appends (may ask the server)."""
        ...

    def close(self) -> None: ...


def append_fingerprint(user_events: Sequence[UserEvents]) -> str:
    """Fingerprint of an append's content, to tell a retry from a reused idempotency key."""
    payload = [[u.user_id, [[e.raw_item_id, e.behavior, e.timestamp_s, e.event_id] for e in u.events]]
               for u in user_events]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()


def attributes_json(attributes: Sequence[str]) -> str:
    """The one stored form of an item's attribute values (compared as text to tell a change from a no-op)."""
    return json.dumps(list(attributes), separators=(",", ":"))


def items_fingerprint(changes: Sequence[ItemChange]) -> str:
    """Fingerprint of a write_items call's content, to tell a retry from a reused idempotency key."""
    payload = [[c.raw_item_id, None if c.attributes is None else list(c.attributes), c.available] for c in changes]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()
