"""Typed client of the ranking service: RankingService RPCs and grpc.health.v1 Check over one channel.

Used by the `seqrank rank|record|info` commands, the load generator and the end-to-end tests. Methods return the
response messages; `as_dict` turns one into plain JSON-ready data. Errors arrive as `grpc.RpcError` with the
server's status code and a message naming the offending field.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.generated.seqrank.v1 import ranking_pb2, ranking_pb2_grpc
from serving.history import Event

DEFAULT_TARGET = "127.0.0.1:9000"
APPLICATION_METADATA_KEY = "application"  # routes to a Serve app; optional while exactly one is deployed
DEFAULT_TIMEOUT_S = 10.0


def event_message(event: Event) -> ranking_pb2.Event:
    message = ranking_pb2.Event(item_id=event.raw_item_id, behavior=event.behavior)
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


class RankingClient:
    def __init__(self, target: str = DEFAULT_TARGET, application: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target)
        self._ranking = ranking_pb2_grpc.RankingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = ((APPLICATION_METADATA_KEY, application),) if application else ()
        self._timeout_s = timeout_s

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
    ) -> ranking_pb2.RankResponse:
        """Unset knobs (None) take the server's defaults."""
        request = ranking_pb2.RankRequest(
            user_id=user_id, exclude_item_ids=list(exclude_item_ids), request_id=request_id,
            recent_events=[event_message(event) for event in recent_events],
        )
        for name, value in (("k", k), ("diversity", diversity), ("candidate_pool_size", candidate_pool_size),
                            ("exclude_seen", exclude_seen)):
            if value is not None:
                setattr(request, name, value)
        return self.send_rank(request)

    def send_rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        return self._ranking.Rank(request, timeout=self._timeout_s, metadata=self._metadata)

    def record(
        self, events_by_user: Mapping[str, Iterable[Event]], idempotency_key: str = ""
    ) -> ranking_pb2.RecordEventsResponse:
        """Appends each user's events (oldest first) to the stored histories."""
        request = ranking_pb2.RecordEventsRequest(
            users=[ranking_pb2.UserEvents(user_id=user_id, events=[event_message(e) for e in events])
                   for user_id, events in events_by_user.items()],
            idempotency_key=idempotency_key,
        )
        return self.send_record(request)

    def send_record(self, request: ranking_pb2.RecordEventsRequest) -> ranking_pb2.RecordEventsResponse:
        return self._ranking.RecordEvents(request, timeout=self._timeout_s, metadata=self._metadata)

    def model_info(self) -> ranking_pb2.GetModelInfoResponse:
        return self._ranking.GetModelInfo(ranking_pb2.GetModelInfoRequest(), timeout=self._timeout_s,
                                          metadata=self._metadata)

    def health(self, service: str = "") -> int:
        """health_pb2.HealthCheckResponse status (SERVING = 1) of the server ("") or a named service."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=self._timeout_s, metadata=self._metadata).status
