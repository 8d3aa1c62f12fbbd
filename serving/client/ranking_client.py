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
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqrank.serving.auth import AUTHORIZATION_METADATA_KEY, BEARER_SCHEME
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
    def __init__(self, target: str = DEFAULT_TARGET, application: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, *, token: str | None = None, tls: TlsConfig | None = None,
                 retry: RetryPolicy = RetryPolicy(), rng: random.Random | None = None) -> None:
        self.target = target
        self._channel = grpc.secure_channel(target, tls.credentials()) if tls else grpc.insecure_channel(target)
        self._ranking = ranking_pb2_grpc.RankingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        metadata = [(APPLICATION_METADATA_KEY, application)] if application else []
        if token:
            metadata.append((AUTHORIZATION_METADATA_KEY, f"{BEARER_SCHEME} {token}"))
        self._metadata = tuple(metadata)
        self._timeout_s = timeout_s
        self._retry = retry
        self._rng = rng or random.Random()
        self.retries = 0  # retries made so far, all calls together

    def _call(self, call: Callable[[], T], codes: frozenset[grpc.StatusCode] | None) -> T:
        """`call` with this client's retry policy; codes None = a single attempt."""
        def count(retry: int, error: BaseException, backoff_s: float) -> None:
            self.retries += 1

        retryable = retryable_codes(codes) if codes else never
        return call_with_retry(call, self._retry, retryable, self._rng, on_retry=count)

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def rank(
        self,
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
    ) -> ranking_pb2.RankResponse:
        """Unset knobs (None) take the server's defaults. `candidate_item_ids`: rank these (search re-ranking)
        instead of retrieving; `include_any` / `exclude_any`: attribute values the items must / must not have."""
        request = rank_request(user_id, k=k, diversity=diversity, candidate_pool_size=candidate_pool_size,
                               exclude_item_ids=exclude_item_ids, exclude_seen=exclude_seen,
                               recent_events=recent_events, request_id=request_id,
                               candidate_item_ids=candidate_item_ids, include_any=include_any,
                               exclude_any=exclude_any, min_catalogue_version=min_catalogue_version)
        return self.send_rank(request)

    def rank_batch(self, requests: Sequence[ranking_pb2.RankRequest]) -> ranking_pb2.RankBatchResponse:
        """Many users in one call (build each with `rank_request`); each result carries its own status."""
        request = ranking_pb2.RankBatchRequest(requests=list(requests))
        return self._call(lambda: self._ranking.RankBatch(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS)

    def upsert_items(self, attributes_by_item: Mapping[str, Sequence[str]],
                     idempotency_key: str | None = None) -> ranking_pb2.UpsertItemsResponse:
        """New items or new attribute values, {raw id: [attribute values]}; `idempotency_key` None = a generated
        one, so that retries are safe."""
        request = ranking_pb2.UpsertItemsRequest(
            items=[ranking_pb2.ItemUpsert(item_id=item, attributes=list(values))
                   for item, values in attributes_by_item.items()],
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key)
        return self._call(lambda: self._ranking.UpsertItems(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None)

    def set_item_availability(self, item_ids: Sequence[str], available: bool,
                              idempotency_key: str | None = None) -> ranking_pb2.SetItemAvailabilityResponse:
        """Hides (available=False) or restores items; retried like `record`."""
        request = ranking_pb2.SetItemAvailabilityRequest(
            item_ids=list(item_ids), available=available,
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key)
        return self._call(lambda: self._ranking.SetItemAvailability(request, timeout=self._timeout_s,
                                                                    metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None)



    def send_rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        return self._call(lambda: self._ranking.Rank(request, timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS)

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

    def send_record(self, request: ranking_pb2.RecordEventsRequest) -> ranking_pb2.RecordEventsResponse:
        """Retried only when `request` carries an idempotency key: a retry without one could store it twice."""
        return self._call(lambda: self._ranking.RecordEvents(request, timeout=self._timeout_s,
                                                             metadata=self._metadata),
                          RETRYABLE if request.idempotency_key else None)

    def model_info(self) -> ranking_pb2.GetModelInfoResponse:
        return self._call(lambda: self._ranking.GetModelInfo(ranking_pb2.GetModelInfoRequest(),
                                                             timeout=self._timeout_s, metadata=self._metadata),
                          RETRYABLE_READS)

    def health(self, service: str = "") -> int:
        """health_pb2.HealthCheckResponse status (SERVING = 1) of the server ("") or a named service; never
        retried (a probe wants the answer of now)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=self._timeout_s, metadata=self._metadata).status
