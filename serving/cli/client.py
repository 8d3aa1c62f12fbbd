"""`seqrank rank`, `seqrank record` and `seqrank info`: one call to a running service, printed."""

from __future__ import annotations

import json
import sys

from seqrank.serving.cli.render import format_response
from seqrank.serving.client.ranking_client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
from seqrank.serving.client.retry import RetryPolicy

TOKEN_ENV = "SEQRANK_TOKEN"  # the client commands' bearer token when --token is not given


def client_arguments(parser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="gRPC host:port (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--token", default=None,
                        help=f"bearer token (default: ${TOKEN_ENV}); sent as 'authorization: Bearer <token>'")
    parser.add_argument("--tls", action="store_true", help="TLS to a gateway or mesh in front of the service")
    parser.add_argument("--ca-cert", default=None, help="PEM roots for --tls (default: the system's)")
    parser.add_argument("--client-cert", default=None, help="PEM client certificate for mTLS (with --client-key)")
    parser.add_argument("--client-key", default=None, help="PEM private key of --client-cert")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="deadline of each attempt in seconds (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=RetryPolicy().max_attempts - 1,
                        help="retries on UNAVAILABLE/RESOURCE_EXHAUSTED, with backoff (default: %(default)s)")


def add_client_commands(sub) -> None:
    rank = sub.add_parser("rank", help="top-k items for a user")
    rank.add_argument("user_id")
    rank.add_argument("-k", type=int, default=None, help="items to return (default: the server's)")
    rank.add_argument("--diversity", type=float, default=None, help="MMR lambda in [0, 1] (default: the server's)")
    rank.add_argument("--exclude", nargs="*", default=[], metavar="ITEM", help="item ids never to return")
    rank.add_argument("--events", nargs="*", default=[], metavar="ITEM[:BEHAVIOR]",
                      help="recent events, oldest first, used instead of the stored history (not stored)")
    rank.add_argument("--include-seen", action="store_true", help="allow items from the history")
    rank.add_argument("--candidates", nargs="*", default=[], metavar="ITEM",
                      help="rank these items (a search result) instead of retrieving from the catalogue")
    rank.add_argument("--include-attr", nargs="*", default=[], metavar="VALUE",
                      help="only items having one of these attribute values (e.g. a category)")
    rank.add_argument("--exclude-attr", nargs="*", default=[], metavar="VALUE",
                      help="never items having one of these attribute values (e.g. a brand)")
    client_arguments(rank)
    rank.set_defaults(func=cmd_rank)

    record = sub.add_parser("record", help="append events to a user's stored history")
    record.add_argument("user_id")
    record.add_argument("events", nargs="+", metavar="ITEM[:BEHAVIOR[:UNIX_SECONDS]]", help="oldest first")
    record.add_argument("--idempotency-key", default=None,
                        help="default: a generated key, the same on every retry ('' = none, then never retried)")
    client_arguments(record)
    record.set_defaults(func=cmd_record)

    info = sub.add_parser("info", help="the serving model: version, sizes, index, offline metrics")
    client_arguments(info)
    info.set_defaults(func=cmd_info)

    items = sub.add_parser("items", help="the live catalogue: add items, hide or restore them, show its state")
    commands = items.add_subparsers(dest="items_command", required=True)
    upsert = commands.add_parser("upsert", help="add an item (or replace its attribute values) without retraining")
    upsert.add_argument("item_id")
    upsert.add_argument("attributes", nargs="*", metavar="VALUE", help="attribute values, e.g. category and brand")
    upsert.add_argument("--idempotency-key", default=None, help="default: a generated key, the same on every retry")
    client_arguments(upsert)
    upsert.set_defaults(func=cmd_items_upsert)
    for name, available, summary in (("hide", False, "hide items from every list (sold out, delisted)"),
                                     ("restore", True, "show hidden items again")):
        change = commands.add_parser(name, help=summary)
        change.add_argument("item_ids", nargs="+", metavar="ITEM")
        change.add_argument("--idempotency-key", default=None, help="default: a generated key")
        client_arguments(change)
        change.set_defaults(func=cmd_items_availability, available=available)
    show = commands.add_parser("show", help="catalogue size, upserted and hidden items, catalogue version")
    client_arguments(show)
    show.set_defaults(func=cmd_items_show)


def parse_event(text: str):
    from seqrank.serving.history.events import Event

    item_id, behavior, timestamp = (text.split(":") + ["", ""])[:3]
    try:
        return Event(raw_item_id=item_id, behavior=behavior, timestamp_s=int(timestamp) if timestamp else None)
    except ValueError:
        raise ValueError(f"event {text!r}: the timestamp must be integer Unix seconds") from None


def client_of(args, environ=None):
    """The RankingClient the client flags describe; the token falls back to $SEQRANK_TOKEN (read here, the edge)."""
    import os

    from seqrank.serving.client.ranking_client import RankingClient, TlsConfig
    from seqrank.serving.client.retry import RetryPolicy

    if args.retries < 0:
        raise ValueError(f"--retries: must be >= 0, got {args.retries}")
    if not args.tls and (args.ca_cert or args.client_cert or args.client_key):
        raise ValueError("--ca-cert, --client-cert and --client-key need --tls")
    token = args.token if args.token is not None else (os.environ if environ is None else environ).get(TOKEN_ENV)
    tls = TlsConfig(args.ca_cert, args.client_cert, args.client_key) if args.tls else None
    return RankingClient(args.target, timeout_s=args.timeout, token=token or None, tls=tls,
                         retry=RetryPolicy(max_attempts=args.retries + 1))


def call_service(args, call) -> int:
    """Runs `call(client)` and prints its response (table or JSON); gRPC errors print code and details."""
    import grpc

    from seqrank.serving.client.ranking_client import as_dict

    with client_of(args) as client:
        try:
            response = call(client)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(as_dict(response), indent=2) if args.json else format_response(response))
    return 0


def cmd_rank(args) -> int:
    events = [parse_event(text) for text in args.events]
    return call_service(args, lambda client: client.rank(
        args.user_id, k=args.k, diversity=args.diversity, exclude_item_ids=args.exclude, recent_events=events,
        exclude_seen=False if args.include_seen else None, candidate_item_ids=args.candidates,
        include_any=args.include_attr, exclude_any=args.exclude_attr,
    ))


def cmd_record(args) -> int:
    events = [parse_event(text) for text in args.events]
    return call_service(args, lambda client: client.record({args.user_id: events}, args.idempotency_key))


def cmd_info(args) -> int:
    return call_service(args, lambda client: client.model_info())


def cmd_items_upsert(args) -> int:
    return call_service(args, lambda client: client.upsert_items({args.item_id: args.attributes},
                                                                 args.idempotency_key))


def cmd_items_availability(args) -> int:
    return call_service(args, lambda client: client.set_item_availability(args.item_ids, args.available,
                                                                          args.idempotency_key))


def cmd_items_show(args) -> int:
    return call_service(args, lambda client: client.model_info().catalogue)
