"""Served events back out: a history store → the events CSV that `seqrank train --data` reads, resumable.

Output: a header `user_id,item_id,timestamp,event_type`, then one row per stored event; `timestamp` in integer
Unix seconds (the store keeps milliseconds: floor(ms / 1000), as `StoredEvent.timestamp_s` and the training loader
count time), `event_type` the behaviour name, with the unspecified behaviour "" written as `unspecified_behavior`
(the loader refuses an empty field). Memory stays constant: the store is read a page at a time.

The cursor (a JSON file) makes a later run append only what was stored since, with no duplicates and no gaps:
- the position is the store-wide insertion sequence number `seq` (both backends number every stored event), not
  the timestamp: callers may send events with past timestamps, and a time cursor would skip those for good;
- `after_seq`: every event with seq <= after_seq has been written (or left out by `since`);
- `out_bytes`: the output's size when the cursor was written. A run that died between writing rows and writing
  the cursor left rows past it; the next run truncates them before appending, so no row is written twice.
SQLite: pages of `page_size` rows in seq order (keyset on the primary key); the cursor is written after each page.
Redis: users live in separate sorted sets, so a run first reads the sequence counter (`pass_high`), then walks the
users with SCAN and writes each one's events in (after_seq, pass_high]; the cursor carries the SCAN position and
is written after each SCAN step, and `after_seq` becomes pass_high when the walk ends. Limit: SCAN may return a
user twice when Redis resizes its keyspace during the walk; that user's rows are then written twice, and are exact
duplicates, which the training loader drops. Events trimmed by max_events_per_user or expired by user_ttl_s before
an export runs are not in the store any more: export more often than the retention horizon.
Row order: SQLite pages are sorted by (timestamp_ms, seq) before writing, Redis users are written in that order,
so the loader's stable sort by seconds keeps the store's order among events of the same second within a page.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from seqrank.serving.history.events import MS_PER_S, StoredEvent
from seqrank.serving.history.redis_store import RedisHistoryStore
from seqrank.serving.history.sqlite_store import SQLiteHistoryStore

CSV_HEADER = ("user_id", "item_id", "timestamp", "event_type")
DEFAULT_PAGE_SIZE = 10_000  # rows per page (Redis: SCAN asks for page_size / max_events_per_user users)
DEFAULT_UNSPECIFIED_BEHAVIOR = "pv"  # what the service reads "" as whenever the model knows pv (its first type)
CURSOR_VERSION = 1


@dataclass(frozen=True)
class ExportCursor:
    """How far an export got; see the module docstring. `store` names the store (no password) it belongs to."""

    store: str
    after_seq: int = 0
    out_bytes: int = 0
    pass_high: int = 0  # Redis, walk in progress: the sequence counter read when the walk began
    scan: int = 0  # Redis, walk in progress: the SCAN cursor to continue from; 0 = no walk in progress
    version: int = CURSOR_VERSION


@dataclass(frozen=True)
class ExportResult:
    rows: int  # rows appended by this run
    skipped_before_since: int  # events of this run's range left out by `since`
    cursor: ExportCursor


def read_cursor(path: Path) -> ExportCursor | None:
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        cursor = ExportCursor(**raw)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"--cursor {path}: not an export cursor ({error})") from None
    if cursor.version != CURSOR_VERSION:
        raise ValueError(f"--cursor {path}: version {cursor.version}, this seqrank writes {CURSOR_VERSION}")
    return cursor


def write_cursor(path: Path, cursor: ExportCursor) -> None:
    """Atomically (write a temporary file, fsync, rename): a crash leaves the old cursor or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(asdict(cursor), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def store_name(store) -> str:
    if isinstance(store, SQLiteHistoryStore):
        return f"sqlite:{Path(store.path).resolve()}"
    return f"redis:{store.location}"


def csv_row(user_id: str, event: StoredEvent, unspecified_behavior: str) -> tuple[str, str, int, str]:
    return user_id, event.raw_item_id, event.timestamp_ms // MS_PER_S, event.behavior or unspecified_behavior


def _sqlite_pages(store: SQLiteHistoryStore, cursor: ExportCursor, page_size: int
                  ) -> Iterator[tuple[list[tuple[str, StoredEvent]], ExportCursor]]:
    while True:
        page = store.events_after(cursor.after_seq, page_size)
        if not page:
            return
        cursor = replace(cursor, after_seq=page[-1][1].seq)
        yield sorted(page, key=lambda row: (row[1].timestamp_ms, row[1].seq)), cursor


def _redis_pages(store: RedisHistoryStore, cursor: ExportCursor, page_size: int
                 ) -> Iterator[tuple[list[tuple[str, StoredEvent]], ExportCursor]]:
    if cursor.scan == 0:  # start a walk over everything stored up to now
        high = store.last_sequence()
        if high <= cursor.after_seq:
            return
        cursor = replace(cursor, pass_high=high)
    low, high, scan = cursor.after_seq, cursor.pass_high, cursor.scan
    users_per_page = max(1, page_size // store.max_events_per_user)  # a page holds at most about page_size rows
    while True:
        scan, users = store.scan_users(scan, users_per_page)
        rows = [(user_id, event) for user_id in users for event in store.history(user_id)
                if low < event.seq <= high]
        done = scan == 0
        yield rows, replace(cursor, after_seq=high if done else low, pass_high=0 if done else high, scan=scan)
        if done:
            return


def export_events(store, out: Path, cursor_path: Path | None = None, *, since_s: int | None = None,
                  page_size: int = DEFAULT_PAGE_SIZE,
                  unspecified_behavior: str = DEFAULT_UNSPECIFIED_BEHAVIOR) -> ExportResult:
    """Append the events stored after the cursor to `out` (created with its header when there is no cursor).

    since_s: leave out events older than this Unix second (timestamp_ms < since_s * 1000). Without a cursor file
    the export starts from the first stored event and overwrites `out`."""
    if page_size < 1:
        raise ValueError(f"page_size: must be >= 1, got {page_size}")
    if not unspecified_behavior or "," in unspecified_behavior:
        raise ValueError(f"unspecified_behavior: must be a non-empty name without a comma, "
                         f"got {unspecified_behavior!r}")
    if not isinstance(store, (SQLiteHistoryStore, RedisHistoryStore)):
        raise ValueError(f"cannot export from a {type(store).__name__}")
    out = Path(out)
    name = store_name(store)
    cursor = read_cursor(cursor_path) if cursor_path is not None else None
    if cursor is None:
        cursor = ExportCursor(store=name)
        with open(out, "w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow(CSV_HEADER)
        cursor = replace(cursor, out_bytes=out.stat().st_size)
    else:
        if cursor.store != name:
            raise ValueError(f"--cursor {cursor_path}: belongs to {cursor.store}, not {name}")
        size = out.stat().st_size if out.exists() else -1
        if size < cursor.out_bytes:
            raise ValueError(f"--out {out}: {max(size, 0)} bytes, shorter than the {cursor.out_bytes} its cursor "
                             f"{cursor_path} recorded; it is not the file that cursor continues")
    since_ms = None if since_s is None else since_s * MS_PER_S
    pages = _sqlite_pages if isinstance(store, SQLiteHistoryStore) else _redis_pages
    rows = skipped = 0
    with open(out, "r+", newline="") as handle:
        handle.truncate(cursor.out_bytes)  # rows a crashed run wrote past its last cursor
        handle.seek(cursor.out_bytes)
        writer = csv.writer(handle, lineterminator="\n")
        for page, next_cursor in pages(store, cursor, page_size):
            kept = [row for row in page if since_ms is None or row[1].timestamp_ms >= since_ms]
            skipped += len(page) - len(kept)
            writer.writerows(csv_row(user_id, event, unspecified_behavior) for user_id, event in kept)
            rows += len(kept)
            handle.flush()
            os.fsync(handle.fileno())
            cursor = replace(next_cursor, out_bytes=handle.tell())
            if cursor_path is not None:
                write_cursor(cursor_path, cursor)
    if cursor_path is not None:
        write_cursor(cursor_path, cursor)
    return ExportResult(rows=rows, skipped_before_since=skipped, cursor=cursor)
