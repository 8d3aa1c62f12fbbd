"""The Redis backend of `HistoryStore`: one store shared by every replica on every node of a cluster.

Same contract as the SQLite backend in `serving/history/sqlite_store.py`: per-user histories ordered by
(timestamp, insertion sequence) and bounded to the newest `max_events_per_user`, exact duplicates dropped,
idempotency keys remembered with their payload's hash for `idempotency_ttl_s`, each call all-or-nothing.

Layout (standalone Redis or a primary with replicas; not Redis Cluster, since one append touches many users):
- `seqrank:history:events:<user_id>`  sorted set; score = timestamp_s, member = 16 hex digits of the store-wide
  sequence number + JSON [raw_item_id, behavior, timestamp_s]. Redis orders equal scores by member bytes, so
  the fixed-width sequence prefix breaks timestamp ties in insertion order; `recent` is one ZREVRANGE,
  O(log n + limit).
- `seqrank:history:seen:<user_id>`    set of the JSON part of every stored event: the exact-duplicate check.
- `seqrank:history:seq`               the sequence counter (INCRBY).
- `seqrank:history:idempotency:<key>` "<payload sha256>:<created_s>", expiring after the TTL.

Durability: an append is acknowledged when its script has run on the primary; it survives a crash of the primary
only if the server runs with `appendonly yes` and `appendfsync always` (the AOF is fsynced before the reply;
https://redis.io/docs/latest/operate/oss_and_stack/management/persistence/). With `wait_replicas` > 0 the
append also waits (WAIT) until that many replicas have it, or answers UNAVAILABLE.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history.events import (
    REDIS_URL_PREFIXES,
    AppendResult,
    HistoryConfig,
    StoredEvent,
    UserEvents,
    append_fingerprint,
)

KEY_PREFIX = "seqrank:history:"
SEQ_HEX_DIGITS = 16  # the sequence number's width at the start of each sorted-set member
# A lost connection is retried this often. Safe: a retried script carries the same timestamps, so its events
# are exact duplicates of an earlier run's (and its idempotency key, if any, is already recorded).
CONNECTION_RETRIES = 2
APPLIED, IDEMPOTENT_REPLAY, KEY_CONFLICT = 0, 1, 2  # the append script's status codes
# Errors that mean "this Redis cannot take the call now": failover, loading, out of memory, persistence failing.
UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (LOADING)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after failover
    redis.exceptions.OutOfMemoryError,  # maxmemory reached with noeviction
)
UNAVAILABLE_REPLY_PREFIXES = ("MISCONF", "MASTERDOWN", "NOREPLICAS")

# KEYS: [seq, events_1, seen_1, ..., events_n, seen_n, (idempotency key when ARGV[4] ~= "")]
# ARGV: [max_events_per_user, now_s, idempotency_ttl_s, payload_sha256 or "",
#        then per user: event count, then (timestamp_s, event_json) per event]
# Every check runs before the first write, so an error (OOM refuses the first write) leaves nothing half-done.
# Members start with string.format("%016x", seq): 16 = SEQ_HEX_DIGITS.
_APPEND_SCRIPT = """
local max_events, now_s, ttl_s, payload_sha = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local has_key = payload_sha ~= ""
local num_users = (#KEYS - 1 - (has_key and 1 or 0)) / 2
if has_key then
  local seen = redis.call("GET", KEYS[#KEYS])
  if seen then
    local seen_sha, created_s = string.match(seen, "^(%x+):(%-?%d+)$")
    if tonumber(created_s) >= now_s - ttl_s then
      if seen_sha == payload_sha then return {1, 0} end
      return {2, 0}
    end
  end
end
local new_events, pending, arg = {}, {}, 5
for user = 1, num_users do
  local events_key, seen_key = KEYS[2 * user], KEYS[2 * user + 1]
  local num_events = tonumber(ARGV[arg])
  arg = arg + 1
  pending[seen_key] = pending[seen_key] or {}
  for _ = 1, num_events do
    local timestamp_s, event_json = ARGV[arg], ARGV[arg + 1]
    if not pending[seen_key][event_json] and redis.call("SISMEMBER", seen_key, event_json) == 0 then
      pending[seen_key][event_json] = true
      new_events[#new_events + 1] = {events_key, seen_key, timestamp_s, event_json}
    end
    arg = arg + 2
  end
end
if #new_events > 0 then
  local seq = redis.call("INCRBY", KEYS[1], #new_events) - #new_events
  for _, event in ipairs(new_events) do
    seq = seq + 1
    redis.call("ZADD", event[1], event[3], string.format("%016x", seq) .. event[4])
    redis.call("SADD", event[2], event[4])
  end
end
for user = 1, num_users do
  local events_key, seen_key = KEYS[2 * user], KEYS[2 * user + 1]
  local excess = redis.call("ZCARD", events_key) - max_events
  if excess > 0 then
    for _, member in ipairs(redis.call("ZRANGE", events_key, 0, excess - 1)) do
      redis.call("SREM", seen_key, string.sub(member, 17))
    end
    redis.call("ZREMRANGEBYRANK", events_key, 0, excess - 1)
  end
end
if has_key then
  redis.call("SET", KEYS[#KEYS], payload_sha .. ":" .. ARGV[2], "EX", ttl_s)
end
return {0, #new_events}
"""


def _check_redis_url(url: str) -> None:
    """Refuses URLs that would silently connect somewhere else: no host, or a database that is not a number."""
    parts = urlsplit(url)
    if not url.startswith(REDIS_URL_PREFIXES) or not parts.hostname:
        raise ValueError("history.url: must be redis://[:password@]host:port/db, got a url without a host")
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise ValueError(f"history.url: the database after the port must be a number, got {parts.path[1:]!r}")


def _event_json(raw_item_id: str, behavior: str, timestamp_s: int) -> str:
    return json.dumps([raw_item_id, behavior, timestamp_s], separators=(",", ":"))


def _stored_event(member: str) -> StoredEvent:
    raw_item_id, behavior, timestamp_s = json.loads(member[SEQ_HEX_DIGITS:])
    return StoredEvent(raw_item_id, behavior, timestamp_s, seq=int(member[:SEQ_HEX_DIGITS], 16))


class RedisHistoryStore:
    """HistoryStore on one Redis primary; thread-safe (redis-py's connection pool) and shared across processes.

    The client connects lazily: constructing the store makes no network call; the first append or read does.
    """

    def __init__(self, config: HistoryConfig, *, clock: Callable[[], float] = time.time) -> None:
        _check_redis_url(config.url)
        self.max_events_per_user = config.max_events_per_user
        self._idempotency_ttl_s = config.idempotency_ttl_s
        self._wait_replicas = config.wait_replicas
        self._wait_timeout_ms = config.wait_timeout_ms
        self._clock = clock
        self._client = redis.Redis.from_url(
            config.url,
            socket_timeout=config.busy_timeout_s,
            socket_connect_timeout=config.busy_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), CONNECTION_RETRIES),
            decode_responses=True,
        )
        server = self._client.connection_pool.connection_kwargs
        self.location = f"{server.get('host')}:{server.get('port')}/{server.get('db', 0)}"  # no password
        self._append_script = self._client.register_script(_APPEND_SCRIPT)
        self._closed = False

    @contextmanager
    def _unavailable_on_redis_errors(self) -> Iterator[None]:
        if self._closed:
            raise Unavailable("history_store", f"Redis {self.location} is closed")
        try:
            yield
        except UNAVAILABLE_ERRORS as error:
            raise Unavailable("history_store", f"Redis {self.location}: {error}") from error
        except redis.exceptions.ResponseError as error:
            if str(error).startswith(UNAVAILABLE_REPLY_PREFIXES):
                raise Unavailable("history_store", f"Redis {self.location}: {error}") from error
            raise

    def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None = None) -> AppendResult:
        accepted = sum(len(u.events) for u in user_events)
        now_s = int(self._clock())
        keys = [KEY_PREFIX + "seq"]
        args: list[str | int] = [self.max_events_per_user, now_s, self._idempotency_ttl_s, ""]
        for user in user_events:
            keys += [f"{KEY_PREFIX}events:{user.user_id}", f"{KEY_PREFIX}seen:{user.user_id}"]
            args.append(len(user.events))
            for event in user.events:
                timestamp_s = now_s if event.timestamp_s is None else event.timestamp_s
                args += [timestamp_s, _event_json(event.raw_item_id, event.behavior, timestamp_s)]
        if idempotency_key is not None:
            keys.append(f"{KEY_PREFIX}idempotency:{idempotency_key}")
            args[3] = append_fingerprint(user_events)
        replicas_acknowledged = 0
        with self._unavailable_on_redis_errors():
            if self._wait_replicas > 0:  # WAIT must run on the connection that wrote: one pipeline
                pipeline = self._client.pipeline(transaction=False)
                self._append_script(keys=keys, args=args, client=pipeline)
                pipeline.wait(self._wait_replicas, self._wait_timeout_ms)
                (status, stored), replicas_acknowledged = pipeline.execute()
            else:
                status, stored = self._append_script(keys=keys, args=args)
        if status == KEY_CONFLICT:
            raise FailedPrecondition(
                "idempotency_key", f"{idempotency_key!r} was already used with a different payload"
            )
        if replicas_acknowledged < self._wait_replicas:
            raise Unavailable(
                "history_store",
                f"Redis {self.location}: {replicas_acknowledged} of wait_replicas={self._wait_replicas} replicas "
                f"acknowledged within {self._wait_timeout_ms} ms; retry with the same idempotency key",
            )
        if status == IDEMPOTENT_REPLAY:
            return AppendResult(accepted, stored=0, duplicates_ignored=accepted, idempotent_replay=True)
        return AppendResult(accepted, stored=stored, duplicates_ignored=accepted - stored, idempotent_replay=False)

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        with self._unavailable_on_redis_errors():
            members = self._client.zrevrange(f"{KEY_PREFIX}events:{user_id}", 0, limit - 1)
        return [_stored_event(member) for member in reversed(members)]

    def close(self) -> None:
        """Closes the connection pool; later calls raise Unavailable."""
        self._closed = True
        self._client.close()
        self._client.connection_pool.disconnect()
