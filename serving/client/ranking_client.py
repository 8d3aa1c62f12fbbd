"""Typed client of the ranking service: RankingService RPCs and grpc.health.v1 Check over one channel.

Used by the `seqrank rank|record|info` commands, the load generator and the end-to-end tests. Methods return the
response messages; `as_dict` turns one into plain JSON-ready data. Errors arrive as `grpc.RpcError` with the
server's status code and a message naming the offending field.

Every call carries a deadline (`timeout_s`, per attempt) and, when given, `authorization: Bearer <token>`.
Retries (serving/client/retry.py): Rank, RankBatch, GetModelInfo and Check on UNAVAILABLE, RESOURCE_EXHAUSTED and
DEADLINE_EXCEEDED; RecordEvents, UpsertItems and SetItemAvailability on UNAVAILABLE and RESOURCE_EXHAUSTED only
when they carry an idempotency key: `record`, `upsert_items` and `set_item_availability` generate one when the
caller gives none, and every attempt sends the same request, key included. TLS (`TlsConfig`) is for
a gateway or mesh in front of Serve's plaintext proxy; a client certificate and key make it mTLS.

Load balancing (docs/api.md "Load balancing"): gRPC balances per connection, and one channel keeps its HTTP/2
connections for as long as they live, so a client of a ClusterIP Service stays on one Serve proxy pod. Given a name
that resolves to every proxy pod (`dns:///seqrank-serve-grpc-headless.<ns>.svc.cluster.local:9000`, the headless
Service in k8s/base), the client spreads calls with `round_robin` and, with `max_connection_age_s`, re-creates its
channel now and then so that the name is resolved again and proxy pods added since then get calls too.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from seqrank.serving.auth import AUTHORIZATION_METADATA_KEY, BEARER_SCHEME
from seqrank.serving.client.metrics import ClientMetrics, client_metrics
from seqrank.serving.client.retry import RetryPolicy, call_with_retry
from seqrank.serving.history.events import Event
from seqrank.v1 import ranking_pb2, ranking_pb2_grpc

DEFAULT_GRPC_PORT = 9000  # the Serve config's grpc_options.port, which is also Ray Serve's default
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
APPLICATION_METADATA_KEY = "application"  # routes to a Serve app; optional while exactly one is deployed
DEFAULT_TIMEOUT_S = 10.0
IDEMPOTENCY_KEY_PREFIX = "seqrank-client-"  # + 32 hex digits: a key the client generated
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
RETRYABLE_READS = RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}  # Rank and the other read-only calls
PICK_FIRST = "pick_first"  # gRPC's default policy: the first address that connects takes every call
ROUND_ROBIN = "round_robin"  # a connection to every resolved address, calls spread over the ready ones in turn
LOAD_BALANCING_POLICIES = (PICK_FIRST, ROUND_ROBIN)
DNS_SCHEME = "dns:"  # dns:///host:port (or dns://resolver/host:port): every A/AAAA record of the name is an address
MAX_CONNECTION_AGE_JITTER = 0.1  # each channel lives max_connection_age_s times a factor in [0.9, 1.0]
T = TypeVar("T")


def retryable_codes(codes: frozenset[grpc.StatusCode]) -> Callable[[BaseException], bool]:
    return lambda error: isinstance(error, grpc.RpcError) and error.code() in codes


def never(error: BaseException) -> bool:
    return False


def new_idempotency_key() -> str:
    return IDEMPOTENCY_KEY_PREFIX + uuid.uuid4().hex


@dataclass(frozen=True)
class TlsConfig:
    """PEM file paths. `ca_cert` None = the system's roots; `client_cert` with `client_key` = mTLS."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("tls: client_cert and client_key go together (mTLS needs both)")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_cert), private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))


def default_load_balancing(target: str) -> str | None:
    """`round_robin` for a `dns:` target (a name meant to list several servers, like a headless Service), else None
    (gRPC's own default, `pick_first`: today's behaviour for a plain host:port)."""
    return ROUND_ROBIN if target.startswith(DNS_SCHEME) else None


def channel_options(
    load_balancing: str | None = None,
    *,
    keepalive_time_s: float | None = None,
    keepalive_timeout_s: float | None = None,
    keepalive_permit_without_calls: bool = False,
) -> list[tuple[str, Any]]:
    """grpcio channel arguments (grpc/impl/codegen/grpc_types.h names) for these settings; [] = gRPC's defaults."""
    if load_balancing is not None and load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing: must be one of {', '.join(LOAD_BALANCING_POLICIES)} or None, "
                         f"got {load_balancing!r}")
    if keepalive_time_s is not None and not keepalive_time_s > 0:
        raise ValueError(f"keepalive_time_s: must be > 0 or None, got {keepalive_time_s}")
    if keepalive_timeout_s is not None and not keepalive_timeout_s > 0:
        raise ValueError(f"keepalive_timeout_s: must be > 0 or None, got {keepalive_timeout_s}")
    if keepalive_time_s is None and (keepalive_timeout_s is not None or keepalive_permit_without_calls):
        raise ValueError("keepalive_timeout_s and keepalive_permit_without_calls need keepalive_time_s")
    options: list[tuple[str, Any]] = []
    if load_balancing is not None:
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
    if keepalive_time_s is not None:
        options.append(("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)))
        if keepalive_timeout_s is not None:
            options.append(("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)))
        options.append(("grpc.keepalive_permit_without_calls", int(keepalive_permit_without_calls)))
        if keepalive_permit_without_calls:
            # By default a client sends at most 2 pings without data in between, so an idle connection would stop
            # being checked after two pings: 0 lifts the cap.
            options.append(("grpc.http2.max_pings_without_data", 0))
    return options


class _Channel:
    """One channel, its stubs, and the calls in flight on it (a retired channel is closed when that reaches 0)."""

    def __init__(self, channel: grpc.Channel, expires_at: float) -> None:
        self.channel = channel
        self.ranking = ranking_pb2_grpc.RankingServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.expires_at = expires_at
        self.in_flight = 0
        self.retired = False


def event_message(event: Event) -> ranking_pb2.Event:
    message = ranking_pb2.Event(item_id=event.raw_item_id, behavior=event.behavior, event_id=event.event_id)
    if event.timestamp_s is not None:
        message.timestamp = event.timestamp_s
    return message


def as_dict(message: Message) -> dict:
    """Proto field names, defaults included, int64 as numbers rather than JSON strings."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if isinstance(message, ranking_pb2.GetModelInfoResponse):
        data["num_items"] = int(data["num_items"])
    return data


def rank_request(
    user_id: str,
    *,
    k: int | None = None,
    diversity: float | None = None,
    candidate_pool_size: int | None = None,
    exclude_item_ids: Sequence[str] = (),
    exclude_seen: bool | None = None,
    recent_events: Sequence[Event] = (),
    request_id: str = "",
    candidate_item_ids: Sequence[str] = (),
    include_any: Sequence[str] = (),
    exclude_any: Sequence[str] = (),
    min_catalogue_version: int = 0,
) -> ranking_pb2.RankRequest:
    """A RankRequest; unset knobs (None) stay unset, so the server's defaults apply."""
    request = ranking_pb2.RankRequest(
        user_id=user_id, exclude_item_ids=list(exclude_item_ids), request_id=request_id,
        recent_events=[event_message(event) for event in recent_events],
        candidate_item_ids=list(candidate_item_ids), min_catalogue_version=min_catalogue_version,
    )
    if include_any or exclude_any:
        request.filter.include_any.extend(include_any)
        request.filter.exclude_any.extend(exclude_any)
    for name, value in (("k", k), ("diversity", diversity), ("candidate_pool_size", candidate_pool_size),
                        ("exclude_seen", exclude_seen)):
        if value is not None:
            setattr(request, name, value)
    return request


class RankingClient:
    """The ranking service over one gRPC channel (or, with `max_connection_age_s`, one channel at a time).

    `target`: host:port, or any gRPC name: `dns:///name:port` (every address the name resolves to, e.g. a headless
    Service), `ipv4:a:port,b:port` (a fixed list), `unix:/path`. `application`: Serve app (metadata); `timeout_s`:
    deadline of each attempt; `token`: bearer token; `tls`: see `TlsConfig`; `retry`: see module docstring.

    Balancing (all keyword-only; the defaults keep a plain host:port target exactly as before: one channel,
    `pick_first`, no keepalive, never re-created):

    - `load_balancing`: "round_robin" or "pick_first", sent as the channel's service config
      (`{"loadBalancingConfig": [{"round_robin": {}}]}` in channel option `grpc.service_config`). Why: gRPC
      multiplexes every call over long-lived HTTP/2 connections and balances per connection; `pick_first` (gRPC's
      default) sends every call to the first address that connects, so a name listing every Serve proxy pod
      still loads one. `round_robin` connects to each address and rotates calls over the ready ones. None = the
      target's default: `round_robin` for a `dns:` target, gRPC's `pick_first` otherwise.
    - `keepalive_time_s` (`grpc.keepalive_time_ms`): send an HTTP/2 PING after this long without activity, and
      `keepalive_timeout_s` (`grpc.keepalive_timeout_ms`, gRPC's default 20 s): give up on the connection when the
      PING is not answered within it. Why: a proxy pod that vanished without closing its connections (node lost,
      scale-down behind a NAT or conntrack timeout) otherwise holds calls until their deadlines, and `round_robin`
      keeps picking a dead subchannel; the PING detects it and the channel reconnects. None (default) = gRPC's
      default, no keepalive. Keep it at 30 s or more: servers answer too-frequent pings with GOAWAY
      `too_many_pings` (gRPC's server default accepts one per 5 min while no data flows).
    - `keepalive_permit_without_calls` (`grpc.keepalive_permit_without_calls`, and then
      `grpc.http2.max_pings_without_data` 0): ping idle connections too, so a dead connection is found before
      the next call rather than by it. Off by default: a server that does not permit pings without calls (the gRPC
      default, Ray Serve's proxy included) closes the connection after a few.
    - `max_connection_age_s`: re-create the channel after about this many seconds (times a jitter factor in
      [0.9, 1.0], so clients started together do not reconnect together). Why: gRPC Python has no client-side
      maximum connection age, and a channel resolves its name again only when a connection fails, so proxy pods
      added by autoscaling would never get calls from clients already connected. The check runs before each
      attempt, between calls: calls in flight finish on the old channel, which is closed once its last call
      returns. Each channel then has its own connections (`grpc.use_local_subchannel_pool`): a new channel opens
      new ones instead of sharing those of older channels to the same address, so even through a ClusterIP Service
      kube-proxy may pick another pod. None (default) = never.
    - `clock`: monotonic seconds, for the age (a seam for tests).

    `metrics`: a `prometheus_client.CollectorRegistry` (or a `ClientMetrics` built on one) to record each call's
    latency, outcome and retries in (serving/client/metrics.py, docs/metrics.md "Client library"); None (default)
    records nothing.
    """

    def __init__(self, target: str = DEFAULT_TARGET, application: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, *, token: str | None = None, tls: TlsConfig | None = None,
                 retry: RetryPolicy = RetryPolicy(), rng: random.Random | None = None,
                 load_balancing: str | None = None, keepalive_time_s: float | None = None,
                 keepalive_timeout_s: float | None = None, keepalive_permit_without_calls: bool = False,
                 max_connection_age_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: ClientMetrics | CollectorRegistry | None = None) -> None:
        if max_connection_age_s is not None and not max_connection_age_s > 0:
            raise ValueError(f"max_connection_age_s: must be > 0 or None, got {max_connection_age_s}")
        self.target = target
        self.load_balancing = default_load_balancing(target) if load_balancing is None else load_balancing
        self._options = channel_options(self.load_balancing, keepalive_time_s=keepalive_time_s,
                                        keepalive_timeout_s=keepalive_timeout_s,
                                        keepalive_permit_without_calls=keepalive_permit_without_calls)
        self._credentials = tls.credentials() if tls else None
        if max_connection_age_s is not None:
            # A private subchannel pool per channel: otherwise gRPC hands a new channel the connections other
            # channels of the process (this client's old one, other clients) hold to the same address, and the
            # re-created channel would keep the very connections it is meant to replace.
            self._options.append(("grpc.use_local_subchannel_pool", 1))
        self._max_age_s = max_connection_age_s
        self._clock = clock
        self._age_rng = random.Random()
        self._lock = threading.Lock()
        self._retired: list[_Channel] = []  # re-created channels with calls still in flight
        self._closed = False
        self.channels_opened = 0  # channels created so far (1 + reconnects by max_connection_age_s)
        self._current = self._open()
        metadata = [(APPLICATION_METADATA_KEY, application)] if application else []
        if token:
            metadata.append((AUTHORIZATION_METADATA_KEY, f"{BEARER_SCHEME} {token}"))
        self._metadata = tuple(metadata)
        self._timeout_s = timeout_s
        self._retry = retry
        self._rng = rng or random.Random()
        self.retries = 0  # retries made so far, all calls together
        self._metrics = client_metrics(metrics)

    def _open(self) -> _Channel:
        """A new channel (not yet used); its name is resolved afresh when it first connects."""
        options = list(self._options)
        if self._credentials is not None:
            channel = grpc.secure_channel(self.target, self._credentials, options=options or None)
        else:
            channel = grpc.insecure_channel(self.target, options=options or None)
        self.channels_opened += 1
        lifetime_s = (self._max_age_s * self._age_rng.uniform(1 - MAX_CONNECTION_AGE_JITTER, 1.0)
                      if self._max_age_s is not None else float("inf"))
        return _Channel(channel, self._clock() + lifetime_s)

    # The current channel's parts, for callers that used them before channels were re-created.
    @property
    def _channel(self) -> grpc.Channel:
        return self._current.channel

    @property
    def _ranking(self) -> ranking_pb2_grpc.RankingServiceStub:
        return self._current.ranking

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        return self._current.health

    def _acquire(self) -> _Channel:
        """The channel for the next attempt, re-created first when it has reached its age; counts the attempt."""
        with self._lock:
            current = self._current
            if not self._closed and self._clock() >= current.expires_at:
                current.retired = True
                self._current = self._open()
                if current.in_flight == 0:
                    current.channel.close()
                else:
                    self._retired.append(current)
                current = self._current
            current.in_flight += 1
            return current

    def _release(self, used: _Channel) -> None:
        with self._lock:
            used.in_flight -= 1
            if used.retired and used.in_flight == 0 and used in self._retired:
                self._retired.remove(used)
                used.channel.close()

    def _attempt(self, call: Callable[[_Channel], T]) -> T:
        used = self._acquire()
        try:
            return call(used)
        finally:
            self._release(used)

    def _call(self, call: Callable[[_Channel], T], codes: frozenset[grpc.StatusCode] | None, *, method: str) -> T:
        """`call(channel)` with this client's retry policy; codes None = a single attempt. Each attempt takes the
        channel of its time (a retry may go over a re-created one). `method`: the RPC's name, for the metrics."""
        def count(retry: int, error: BaseException, backoff_s: float) -> None:
            self.retries += 1
            if self._metrics is not None:
                self._metrics.observe_retry(method, error)

        def attempts() -> T:
            return call_with_retry(lambda: self._attempt(call), self._retry, retryable, self._rng, on_retry=count)

        retryable = retryable_codes(codes) if codes else never
        return attempts() if self._metrics is None else self._metrics.timed(method, attempts)

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and any re-created one still finishing calls (those calls are cancelled)."""
        with self._lock:
            self._closed = True
            channels = [self._current, *self._retired]
            self._retired.clear()
        for held in channels:
            held.channel.close()

    def rank(self, user_id: str, **options) -> ranking_pb2.RankResponse:
        """`rank_request(user_id, **options)` sent with this client's retries: unset knobs take the server's
        defaults; `candidate_item_ids` ranks these (search re-ranking) instead of retrieving; `include_any` /
        `exclude_any` are attribute values the items must / must not have."""
        return self.send_rank(rank_request(user_id, **options))

    def rank_batch(self, requests: Sequence[ranking_pb2.RankRequest]) -> ranking_pb2.RankBatchResponse:
        """Many users in one call (build each with `rank_request`); each result carries its own status."""
        request = ranking_pb2.RankBatchRequest(requests=list(requests))
        return self._call(lambda c: c.ranking.RankBatch(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS, method="RankBatch")

    def upsert_items(self, attributes_by_item: Mapping[str, Sequence[str]],
                     idempotency_key: str | None = None) -> ranking_pb2.UpsertItemsResponse:
        """New items or new attribute values, {raw id: [attribute values]}; `idempotency_key` None = a generated
        one, so that retries are safe."""
        request = ranking_pb2.UpsertItemsRequest(
            items=[ranking_pb2.ItemUpsert(item_id=item, attributes=list(values))
                   for item, values in attributes_by_item.items()],
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key)
        return self._call(lambda c: c.ranking.UpsertItems(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None, method="UpsertItems")

    def set_item_availability(self, item_ids: Sequence[str], available: bool,
                              idempotency_key: str | None = None) -> ranking_pb2.SetItemAvailabilityResponse:
        """Hides (available=False) or restores items; retried like `record`."""
        request = ranking_pb2.SetItemAvailabilityRequest(
            item_ids=list(item_ids), available=available,
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key)
        return self._call(lambda c: c.ranking.SetItemAvailability(request, timeout=self._timeout_s,
                                                                  metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None, method="SetItemAvailability")



    def send_rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        return self._call(lambda c: c.ranking.Rank(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS, method="Rank")

    def record(
        self, events_by_user: Mapping[str, Iterable[Event]], idempotency_key: str | None = None
    ) -> ranking_pb2.RecordEventsResponse:
        """Appends each user's events (oldest first) to the stored histories; `idempotency_key` None = a
        generated one, so that retries are safe."""
        request = ranking_pb2.RecordEventsRequest(
            users=[ranking_pb2.UserEvents(user_id=user_id, events=[event_message(e) for e in events])
                   for user_id, events in events_by_user.items()],
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key,
        )
        return self.send_record(request)

    def record_after_list(
        self, user_id: str, list_request_id: str, events: Iterable[Event], idempotency_key: str | None = None
    ) -> ranking_pb2.RecordEventsResponse:
        """`record` for one user's events that follow the Rank list whose RankResponse.request_id is
        `list_request_id`: stored alike, and counted per model version as hits or misses of that list
        (Event.list_request_id; docs/metrics.md, "Online quality")."""
        messages = [event_message(e) for e in events]
        for message in messages:
            message.list_request_id = list_request_id
        request = ranking_pb2.RecordEventsRequest(
            users=[ranking_pb2.UserEvents(user_id=user_id, events=messages)],
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key,
        )
        return self.send_record(request)

    def send_record(self, request: ranking_pb2.RecordEventsRequest) -> ranking_pb2.RecordEventsResponse:
        """Retried only when `request` carries an idempotency key: a retry without one could store it twice."""
        return self._call(lambda c: c.ranking.RecordEvents(request, timeout=self._timeout_s,
                                                           metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None, method="RecordEvents")

    def model_info(self) -> ranking_pb2.GetModelInfoResponse:
        return self._call(lambda c: c.ranking.GetModelInfo(ranking_pb2.GetModelInfoRequest(),
                                                           timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS, method="GetModelInfo")

    def health(self, service: str = "") -> int:
        """health_pb2.HealthCheckResponse status (SERVING = 1) of the server ("") or a named service; never
        retried (a probe wants the answer of now)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._call(lambda c: c.health.Check(request, timeout=self._timeout_s, metadata=self._metadata),
                          None, method="Check").status
