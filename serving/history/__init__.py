"""Users' behaviour histories and the live catalogue's state: `open_history_store` picks the backend from the URL.

The types and the protocol live in `events.py`, the backends in `sqlite_store.py` and `redis_store.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from seqrank.serving.history.events import (
    ENV_URL_PREFIX,
    REDIS_URL_PREFIXES,
    SQLITE_URL_PREFIX,
    AppendResult,
    CatalogueWrite,
    Durability,
    Event,
    HistoryConfig,
    HistoryStore,
    ItemChange,
    ItemState,
    StoredEvent,
    UserEvents,
)
from seqrank.serving.history.redis_store import RedisHistoryStore
from seqrank.serving.history.sqlite_store import SQLiteHistoryStore

__all__ = [
    "SQLITE_URL_PREFIX", "AppendResult", "CatalogueWrite", "Durability", "Event", "HistoryConfig", "HistoryStore",
    "ItemChange", "ItemState", "RedisHistoryStore", "SQLiteHistoryStore", "StoredEvent", "UserEvents",
    "open_history_store", "resolve_history_url",
]


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
            user_ttl_s=config.user_ttl_s,
        )
    if url.startswith(ENV_URL_PREFIX):
        raise ValueError(f"history.url: {url!r} is unresolved; call resolve_history_url(config, os.environ) first")
    if url.startswith(REDIS_URL_PREFIXES):
        return RedisHistoryStore(config)
    raise ValueError(f"history.url: must start with {SQLITE_URL_PREFIX!r}, 'redis://' or 'rediss://', got {url!r}")
