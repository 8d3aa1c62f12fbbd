"""The Redis backend of `HistoryStore`: one store shared by every replica on every node of a cluster.

Same contract as the SQLite backend in `serving/history/sqlite_store.py`: per-user histories ordered by
(timestamp, insertion sequence) and bounded to the newest `max_events_per_user`, a caller's event id stored once
per user (anonymous events always stored), idempotency keys remembered with their payload's hash for
`idempotency_ttl_s`, a user forgotten `user_ttl_s` after their last append, each call all-or-nothing.

Layout (standalone Redis or a primary with replicas; not Redis Cluster, since one append touches many users):
- `seqrank:history:events:<user_id>`  sorted set; score = timestamp in ms, member = 16 hex digits of the
  store-wide sequence number + JSON [raw_item_id, behavior, timestamp_ms, event_id] (members written before
  millisecond timestamps hold [raw_item_id, behavior, timestamp_s] and still read). Redis orders equal scores by
  member bytes, so the fixed-width sequence prefix breaks timestamp ties in insertion order; `recent` is one
  ZREVRANGE, O(log n + limit). Expires user_ttl_s after the user's last append.
- `seqrank:history:seen:<user_id>`    set of the user's stored event ids (the duplicate check); same expiry.
- `seqrank:history:seq`               the sequence counter (INCRBY).
- `seqrank:history:idempotency:<key>` "<payload sha256>:<created_s>", expiring after the TTL.
- `seqrank:history:applied:<append>`  the stored count of one append call, for 10 minutes: a script retried
  after a lost connection finds it and writes nothing twice.

The live catalogue (write_items / items_since), never expiring (user_ttl_s is for histories):
- `seqrank:catalogue:items`             hash; field = raw item id, value = "1" (available) or "0" (hidden)
  followed by the item's attributes as a JSON list, or by nothing when it was never upserted: `1["red","xl"]`,
  `0`. (Not a JSON object: the script compares and copies the attribute JSON as text and never re-encodes it,
  since Lua's cjson writes an empty list as {}.)
- `seqrank:catalogue:versions`          sorted set; member = raw item id, score = the catalogue version of the
  write that last changed the item. `items_since(v)` = ZRANGEBYSCORE (v +inf, read in pages of
  ITEMS_PAGE_SIZE items by a script that also reads the counter, so each page is one consistent snapshot).
- `seqrank:catalogue:version`           the catalogue version counter (INCR once per write that changes anything).
- `seqrank:catalogue:idempotency:<key>` "<payload sha256>:<created_s>", expiring after the TTL (its own
  namespace: an events key and an items key never collide).
- `seqrank:catalogue:applied:<write>`   "<applied>:<version>" of one write_items call, for 10 minutes (the same
  retry safety as the append's marker).

Durability: an append is acknowledged when its script has run on the primary; it survives a crash of the primary
only if the server runs with `appendonly yes` and `appendfsync always` (the AOF is fsynced before the reply;
https://redis.io/docs/latest/operate/oss_and_stack/management/persistence/). `durability()` reads both (and
maxmemory-policy) with CONFIG GET. With `wait_replicas` > 0 the append also waits (WAIT) until that many
replicas have it, or answers UNAVAILABLE.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from seqrank.serving.errors import FailedPrecondition, Unavailable
from seqrank.serving.history.events import (
    MS_PER_S,
    REDIS_URL_PREFIXES,
    AppendResult,
    CatalogueWrite,
    Durability,
    HistoryConfig,
    ItemChange,
    ItemState,
    StoredEvent,
    UserEvents,
    append_fingerprint,
    attributes_json,
    items_fingerprint,
)

KEY_PREFIX = "seqrank:history:"
CATALOGUE_PREFIX = "seqrank:catalogue:"
# items_since reads at most about this many items per script call (a whole version more when a page ends inside
# one), so reading a large catalogue never blocks the server for long.
ITEMS_PAGE_SIZE = 1_000
SEQ_HEX_DIGITS = 16  # the sequence number's width at the start of each sorted-set member
# A lost connection is retried this often. Safe: a retried script carries the same applied-marker key, which
# the first run (if it ran) set with its result, so the retry writes nothing.
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

# KEYS: [seq, applied, events_1, seen_1, ..., events_n, seen_n, (idempotency key when ARGV[4] ~= "")]
# ARGV: [max_events_per_user, now_s, idempotency_ttl_s, payload_sha256 or "", user_ttl_s (0 = never),
#        then per user: event count, then (timestamp_ms, event_id or "", member_json) per event]
# Every check runs before the first write, so an error (OOM refuses the first write) leaves nothing half-done.
# Members start with string.format("%016x", seq): 16 = SEQ_HEX_DIGITS.
_APPEND_SCRIPT = """
local max_events, now_s, ttl_s, payload_sha = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local user_ttl_s = tonumber(ARGV[5])
local has_key = payload_sha ~= ""
local num_users = (#KEYS - 2 - (has_key and 1 or 0)) / 2
local applied = redis.call("GET", KEYS[2])
if applied then return {0, tonumber(applied)} end
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
local new_events, pending, arg = {}, {}, 6
for user = 1, num_users do
  local events_key, seen_key = KEYS[2 * user + 1], KEYS[2 * user + 2]
  local num_events = tonumber(ARGV[arg])
  arg = arg + 1
  pending[seen_key] = pending[seen_key] or {}
  for _ = 1, num_events do
    local timestamp_ms, event_id, member_json = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2]
    if event_id == "" then
      new_events[#new_events + 1] = {events_key, seen_key, timestamp_ms, member_json, event_id}
    elseif not pending[seen_key][event_id] and redis.call("SISMEMBER", seen_key, event_id) == 0 then
      pending[seen_key][event_id] = true
      new_events[#new_events + 1] = {events_key, seen_key, timestamp_ms, member_json, event_id}
    end
    arg = arg + 3
  end
end
if #new_events > 0 then
  local seq = redis.call("INCRBY", KEYS[1], #new_events) - #new_events
  for _, event in ipairs(new_events) do
    seq = seq + 1
    redis.call("ZADD", event[1], event[3], string.format("%016x", seq) .. event[4])
    if event[5] ~= "" then redis.call("SADD", event[2], event[5]) end
  end
end
for user = 1, num_users do
  local events_key, seen_key = KEYS[2 * user + 1], KEYS[2 * user + 2]
  local excess = redis.call("ZCARD", events_key) - max_events
  if excess > 0 then
    for _, member in ipairs(redis.call("ZRANGE", events_key, 0, excess - 1)) do
      local event_id = cjson.decode(string.sub(member, 17))[4]
      if event_id and event_id ~= "" then redis.call("SREM", seen_key, event_id) end
    end
    redis.call("ZREMRANGEBYRANK", events_key, 0, excess - 1)
  end
  if user_ttl_s > 0 then
    redis.call("EXPIRE", events_key, user_ttl_s)
    redis.call("EXPIRE", seen_key, user_ttl_s)
  end
end
if has_key then
  redis.call("SET", KEYS[#KEYS], payload_sha .. ":" .. ARGV[2], "EX", ttl_s)
end
redis.call("SET", KEYS[2], #new_events, "EX", 600)
return {0, #new_events}
"""

# KEYS: [version counter, items hash, versions sorted set, applied marker, (idempotency key when ARGV[3] ~= "")]
# ARGV: [now_s, idempotency_ttl_s, payload_sha256 or "",
#        then per change: raw item id, attributes JSON or "" (unchanged), "1" / "0" / "" (available; unchanged)]
# Changes apply in order, each against the state the earlier ones left; a change that sets what is stored counts
# for nothing. Every check and read runs before the first write (INCR), so an error leaves nothing half-done.
_WRITE_ITEMS_SCRIPT = """
local now_s, ttl_s, payload_sha = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local marker = redis.call("GET", KEYS[4])
if marker then
  local applied, version = string.match(marker, "^(%d+):(%d+)$")
  return {0, tonumber(applied), tonumber(version)}
end
local version = tonumber(redis.call("GET", KEYS[1]) or "0")
if payload_sha ~= "" then
  local seen = redis.call("GET", KEYS[5])
  if seen then
    local seen_sha, created_s = string.match(seen, "^(%x+):(%-?%d+)$")
    if tonumber(created_s) >= now_s - ttl_s then
      if seen_sha == payload_sha then return {1, 0, version} end
      return {2, 0, version}
    end
  end
end
local states, changed_items, applied = {}, {}, 0
for arg = 4, #ARGV, 3 do
  local item, attributes, available = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2]
  local state = states[item]
  if not state then
    local stored = redis.call("HGET", KEYS[2], item)
    if stored then
      state = {available = string.sub(stored, 1, 1), attributes = string.sub(stored, 2)}
    else
      state = {available = "1", attributes = ""}
    end
    states[item] = state
  end
  local changed = false
  if attributes ~= "" and attributes ~= state.attributes then
    state.attributes, changed = attributes, true
  end
  if available ~= "" and available ~= state.available then
    state.available, changed = available, true
  end
  if changed then
    applied = applied + 1
    if not state.changed then
      state.changed = true
      changed_items[#changed_items + 1] = item
    end
  end
end
if applied > 0 then
  version = redis.call("INCR", KEYS[1])
  for _, item in ipairs(changed_items) do
    redis.call("HSET", KEYS[2], item, states[item].available .. states[item].attributes)
    redis.call("ZADD", KEYS[3], version, item)
  end
end
if payload_sha ~= "" then
  redis.call("SET", KEYS[5], payload_sha .. ":" .. ARGV[1], "EX", ttl_s)
end
redis.call("SET", KEYS[4], string.format("%d:%d", applied, version), "EX", 600)
return {0, applied, version}
"""

# KEYS: [version counter, items hash, versions sorted set]; ARGV: [after version, page size]
# Returns [current version, 1 when this page reaches the end else 0, item ids, their versions, their stored values].
# A full page that ends inside one version is completed with the rest of that version, so the next page can start
# after it.
_ITEMS_PAGE_SCRIPT = """
local page_size = tonumber(ARGV[2])
local rows = redis.call("ZRANGEBYSCORE", KEYS[3], "(" .. ARGV[1], "+inf", "WITHSCORES", "LIMIT", 0, page_size)
local complete = #rows < 2 * page_size
if not complete then
  local last = rows[#rows]
  while #rows > 0 and rows[#rows] == last do
    rows[#rows] = nil
    rows[#rows] = nil
  end
  for _, value in ipairs(redis.call("ZRANGEBYSCORE", KEYS[3], last, last, "WITHSCORES")) do
    rows[#rows + 1] = value
  end
end
local items, versions, states = {}, {}, {}
for i = 1, #rows, 2 do
  items[#items + 1] = rows[i]
  versions[#versions + 1] = rows[i + 1]
  states[#states + 1] = redis.call("HGET", KEYS[2], rows[i]) or ""
end
return {redis.call("GET", KEYS[1]) or "0", complete and 1 or 0, items, versions, states}
"""


def _check_redis_url(url: str) -> None:
    """Refuses URLs that would silently connect somewhere else: no host, or a database that is not a number."""
    parts = urlsplit(url)
    if not url.startswith(REDIS_URL_PREFIXES) or not parts.hostname:
        raise ValueError("history.url: must be redis://[:password@]host:port/db, got a url without a host")
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise ValueError(f"history.url: the database after the port must be a number, got {parts.path[1:]!r}")


def _event_json(raw_item_id: str, behavior: str, timestamp_ms: int, event_id: str) -> str:
    return json.dumps([raw_item_id, behavior, timestamp_ms, event_id], separators=(",", ":"))


def _stored_event(member: str) -> StoredEvent:
    fields = json.loads(member[SEQ_HEX_DIGITS:])
    seq = int(member[:SEQ_HEX_DIGITS], 16)
    if len(fields) == 3:  # written before millisecond timestamps: [item, behavior, timestamp_s]
        raw_item_id, behavior, timestamp_s = fields
        return StoredEvent(raw_item_id, behavior, timestamp_s * MS_PER_S, seq)
    raw_item_id, behavior, timestamp_ms, event_id = fields
    return StoredEvent(raw_item_id, behavior, timestamp_ms, seq, event_id)


def _change_args(attributes: Sequence[str] | None, available: bool | None) -> tuple[str, str]:
    """A change's script arguments: (attributes JSON or "" = unchanged, "1" / "0" or "" = unchanged)."""
    return ("" if attributes is None else attributes_json(attributes),
            "" if available is None else ("1" if available else "0"))


def _item_state(raw_item_id: str, stored: str, version: int) -> ItemState:
    attributes = tuple(json.loads(stored[1:])) if len(stored) > 1 else None
    return ItemState(raw_item_id, attributes, stored[:1] != "0", version)


class RedisHistoryStore:
    """HistoryStore on one Redis primary; thread-safe (redis-py's connection pool) and shared across processes.

    The client connects lazily: constructing the store makes no network call; the first append or read does.
    """

    backend = "redis"  # the label of seqrank_history_store_durable

    def __init__(self, config: HistoryConfig, *, clock: Callable[[], float] = time.time) -> None:
        _check_redis_url(config.url)
        self.max_events_per_user = config.max_events_per_user
        self._idempotency_ttl_s = config.idempotency_ttl_s
        self._wait_replicas = config.wait_replicas
        self._wait_timeout_ms = config.wait_timeout_ms
        self._user_ttl_s = config.user_ttl_s
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
        self._write_items_script = self._client.register_script(_WRITE_ITEMS_SCRIPT)
        self._items_page_script = self._client.register_script(_ITEMS_PAGE_SCRIPT)
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
        now_ms = int(self._clock() * MS_PER_S)
        # The applied marker makes redis-py's retry after a lost connection safe: the same call, same id.
        keys = [KEY_PREFIX + "seq", f"{KEY_PREFIX}applied:{uuid.uuid4().hex}"]
        args: list[str | int] = [self.max_events_per_user, now_ms // MS_PER_S, self._idempotency_ttl_s, "",
                                 self._user_ttl_s]
        for user in user_events:
            keys += [f"{KEY_PREFIX}events:{user.user_id}", f"{KEY_PREFIX}seen:{user.user_id}"]
            args.append(len(user.events))
            for event in user.events:
                timestamp_ms = now_ms if event.timestamp_s is None else event.timestamp_s * MS_PER_S
                args += [timestamp_ms, event.event_id,
                         _event_json(event.raw_item_id, event.behavior, timestamp_ms, event.event_id)]
        if idempotency_key is not None:
            keys.append(f"{KEY_PREFIX}idempotency:{idempotency_key}")
            args[3] = append_fingerprint(user_events)
        (status, stored), replicas_acknowledged = self._run_write_script(self._append_script, keys, args)
        if status == KEY_CONFLICT:
            raise FailedPrecondition(
                "idempotency_key", f"{idempotency_key!r} was already used with a different payload"
            )
        self._check_replicas(replicas_acknowledged)
        if status == IDEMPOTENT_REPLAY:
            return AppendResult(accepted, stored=0, duplicates_ignored=accepted, idempotent_replay=True)
        return AppendResult(accepted, stored=stored, duplicates_ignored=accepted - stored, idempotent_replay=False)

    def _run_write_script(self, script, keys: list[str], args: list) -> tuple[list, int]:
        """The script's reply and, with wait_replicas > 0, how many replicas acknowledged it (WAIT)."""
        with self._unavailable_on_redis_errors():
            if self._wait_replicas > 0:  # WAIT must run on the connection that wrote: one pipeline
                pipeline = self._client.pipeline(transaction=False)
                script(keys=keys, args=args, client=pipeline)
                pipeline.wait(self._wait_replicas, self._wait_timeout_ms)
                reply, replicas_acknowledged = pipeline.execute()
                return reply, replicas_acknowledged
            return script(keys=keys, args=args), 0

    def _check_replicas(self, replicas_acknowledged: int) -> None:
        if replicas_acknowledged < self._wait_replicas:
            raise Unavailable(
                "history_store",
                f"Redis {self.location}: {replicas_acknowledged} of wait_replicas={self._wait_replicas} replicas "
                f"acknowledged within {self._wait_timeout_ms} ms; retry with the same idempotency key",
            )

    def write_items(self, changes: Sequence[ItemChange], idempotency_key: str | None = None) -> CatalogueWrite:
        now_s = int(self._clock() * MS_PER_S) // MS_PER_S
        # The applied marker makes redis-py's retry after a lost connection safe: the same call, same id.
        keys = [CATALOGUE_PREFIX + "version", CATALOGUE_PREFIX + "items", CATALOGUE_PREFIX + "versions",
                f"{CATALOGUE_PREFIX}applied:{uuid.uuid4().hex}"]
        args: list[str | int] = [now_s, self._idempotency_ttl_s, ""]
        for change in changes:
            args += [change.raw_item_id, *_change_args(change.attributes, change.available)]
        if idempotency_key is not None:
            keys.append(f"{CATALOGUE_PREFIX}idempotency:{idempotency_key}")
            args[2] = items_fingerprint(changes)
        (status, applied, version), replicas_acknowledged = self._run_write_script(
            self._write_items_script, keys, args)
        if status == KEY_CONFLICT:
            raise FailedPrecondition(
                "idempotency_key", f"{idempotency_key!r} was already used with a different payload"
            )
        self._check_replicas(replicas_acknowledged)
        if status == IDEMPOTENT_REPLAY:
            return CatalogueWrite(applied=0, version=version, idempotent_replay=True)
        return CatalogueWrite(applied=applied, version=version, idempotent_replay=False)

    def items_since(self, version: int) -> tuple[list[ItemState], int]:
        if version < 0:
            raise ValueError(f"version: must be >= 0, got {version}")
        keys = [CATALOGUE_PREFIX + "version", CATALOGUE_PREFIX + "items", CATALOGUE_PREFIX + "versions"]
        latest: dict[str, ItemState] = {}
        after = version
        while True:
            with self._unavailable_on_redis_errors():
                current, complete, items, versions, values = self._items_page_script(
                    keys=keys, args=[after, ITEMS_PAGE_SIZE])
            # An item changed between two pages moved to a version past every page read so far: a later page
            # holds it again, with its newer state, and that one wins. The last page's counter then covers
            # every row kept, so the result is the state at that version.
            for item, item_version, value in zip(items, versions, values):
                latest[item] = _item_state(item, value, int(item_version))
            if complete:
                break
            after = int(versions[-1])
        return sorted(latest.values(), key=lambda state: (state.version, state.raw_item_id)), int(current)

    def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        with self._unavailable_on_redis_errors():
            members = self._client.zrevrange(f"{KEY_PREFIX}events:{user_id}", 0, limit - 1)
        return [_stored_event(member) for member in reversed(members)]

    def last_sequence(self) -> int:
        """The store-wide sequence number of the newest stored event (0 before the first): every event with a
        smaller or equal number was written by then, since one script takes the numbers and writes the events."""
        with self._unavailable_on_redis_errors():
            return int(self._client.get(KEY_PREFIX + "seq") or 0)

    def scan_users(self, scan_cursor: int, count: int) -> tuple[int, list[str]]:
        """One SCAN step over the users holding events: (next cursor, 0 = done; their user ids).

        SCAN's contract (https://redis.io/docs/latest/commands/scan/): a user present for the whole iteration is
        returned at least once; one may be returned twice when Redis resizes its keyspace meanwhile."""
        with self._unavailable_on_redis_errors():
            next_cursor, keys = self._client.scan(scan_cursor, match=f"{KEY_PREFIX}events:*", count=count)
        start = len(f"{KEY_PREFIX}events:")
        return int(next_cursor), [key[start:] for key in keys]

    def history(self, user_id: str) -> list[StoredEvent]:
        """Every stored event of the user, oldest first (the store's (timestamp, seq) order)."""
        with self._unavailable_on_redis_errors():
            members = self._client.zrange(f"{KEY_PREFIX}events:{user_id}", 0, -1)
        return [_stored_event(member) for member in members]

    def durability(self) -> Durability:
        """appendonly yes + appendfsync always = durable; CONFIG refused (managed Redis) or no answer = unknown."""
        try:
            with self._unavailable_on_redis_errors():
                settings = {**self._client.config_get("appendonly"), **self._client.config_get("appendfsync"),
                            **self._client.config_get("maxmemory-policy")}
        except (Unavailable, redis.exceptions.ResponseError) as error:
            return Durability(None, f"Redis {self.location}: cannot read its persistence settings ({error}); "
                                    "make sure it runs with appendonly yes and appendfsync always")
        found = (f"appendonly {settings.get('appendonly')}, appendfsync {settings.get('appendfsync')}, "
                 f"maxmemory-policy {settings.get('maxmemory-policy')}")
        durable = settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always"
        advice = "" if durable else ": an acknowledged append can be lost in a crash (set appendonly yes, " \
                                    "appendfsync always)"
        return Durability(durable, f"Redis {self.location}: {found}{advice}")

    def close(self) -> None:
        """Closes the connection pool; later calls raise Unavailable."""
        self._closed = True
        self._client.close()
        self._client.connection_pool.disconnect()
