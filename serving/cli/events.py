"""`seqrank events export`: the served events of a history store as the CSV `seqrank train --data` reads."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path


def add_events_commands(sub) -> None:
    events = sub.add_parser("events", help="served events: export a history store for training")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    export = events_sub.add_parser(
        "export", help="stream a history store (sqlite:///... or redis://...) into an events CSV, resumable")
    export.add_argument("--store", required=True, help="history store URL, as in the Serve config's history.url "
                                                      "(env:NAME reads it from environment variable NAME)")
    export.add_argument("--out", required=True, help="CSV file: user_id,item_id,timestamp,event_type")
    export.add_argument("--cursor", default=None,
                        help="JSON file recording how far the export got: with it, a re-run appends only the events "
                             "stored since (created on the first run); without it, --out is rewritten from the start")
    export.add_argument("--since", default=None,
                        help="leave out events older than this (Unix seconds or an ISO 8601 date/time, UTC if naive)")
    export.add_argument("--page-size", type=int, default=None, help="rows per page (default 10000)")
    export.add_argument("--unspecified-behavior", default=None,
                        help="event_type written for events recorded without a behaviour (default: pv)")
    export.set_defaults(func=cmd_events_export)


def parse_since(text: str) -> int:
    """Unix seconds, or ISO 8601 (naive = UTC) → Unix seconds."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected Unix seconds or an ISO 8601 date/time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def cmd_events_export(args) -> int:
    from seqrank.serving.history import HistoryConfig, open_history_store, resolve_history_url
    from seqrank.serving.history.events import SQLITE_URL_PREFIX
    from seqrank.serving.history.export import DEFAULT_PAGE_SIZE, DEFAULT_UNSPECIFIED_BEHAVIOR, export_events

    config = resolve_history_url(HistoryConfig(url=args.store), os.environ)
    if config.url.startswith(SQLITE_URL_PREFIX) and not Path(config.url[len(SQLITE_URL_PREFIX):]).is_file():
        raise FileNotFoundError(f"--store: no SQLite history at {config.url[len(SQLITE_URL_PREFIX):]}")
    since_s = None if args.since is None else parse_since(args.since)
    store = open_history_store(config)
    try:
        result = export_events(
            store, Path(args.out), None if args.cursor is None else Path(args.cursor), since_s=since_s,
            page_size=args.page_size or DEFAULT_PAGE_SIZE,
            unspecified_behavior=args.unspecified_behavior or DEFAULT_UNSPECIFIED_BEHAVIOR)
    finally:
        store.close()
    skipped = f", {result.skipped_before_since} older than --since left out" if since_s is not None else ""
    print(f"{result.rows} events appended to {args.out}{skipped}; exported up to seq {result.cursor.after_seq}")
    return 0
