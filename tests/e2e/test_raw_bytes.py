"""Every byte a client can send, over real gRPC to the session's service: garbage, truncated messages, invalid
UTF-8 and another method's message get INVALID_ARGUMENT naming the field; Health/Watch gets UNIMPLEMENTED; no
answer is UNKNOWN or INTERNAL, and no details carry a traceback. The token-protected case is in
test_guarded_app.py (unauthenticated garbage is refused before it is decoded)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from seqrank.v1 import ranking_pb2 as pb

METHODS = ("/seqrank.v1.RankingService/Rank", "/seqrank.v1.RankingService/RecordEvents",
           "/seqrank.v1.RankingService/GetModelInfo", "/grpc.health.v1.Health/Check")
VALID_RANK = pb.RankRequest(user_id="raw-bytes-user", k=3).SerializeToString()
BAD_BODIES = {
    "garbage": b"\xde\xad\xbe\xef\xff\xff\xff\xff\x00garbage",
    "truncated": VALID_RANK[:-3] + b"\x0a\x30",  # a last field announcing 48 bytes that never come
    "invalid utf-8": b"\x0a\x03\xff\xfe\xfd",  # field 1 (a string in every request) holding no UTF-8
    "huge varint": b"\x18" + b"\xff" * 11,
}
TRACEBACK_MARKS = ("Traceback", 'File "', "ray.exceptions", "actor_id", "pid=")


def raw_call(target: str, method: str, body: bytes, metadata=()) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(body, timeout=30, metadata=(("application", "seqrank"), *metadata))
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bytes_are_invalid_argument_naming_the_field(service, method, name):
    code, details = raw_call(service.grpc_target, method, BAD_BODIES[name])
    if method.endswith("/GetModelInfo") or method.endswith("/Check"):
        # GetModelInfoRequest has no fields and HealthCheckRequest one: field 1 is `service` (a string) there.
        allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}
    else:
        allowed = {grpc.StatusCode.INVALID_ARGUMENT}
    assert code in allowed, (code, details)
    assert not any(mark in details for mark in TRACEBACK_MARKS), details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        assert field and reason.startswith("not a valid "), details


def test_invalid_utf8_in_user_id_names_user_id(service):
    code, details = raw_call(service.grpc_target, METHODS[0], BAD_BODIES["invalid utf-8"])
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "user_id: not a valid seqrank.v1.RankRequest: not valid UTF-8")


def test_another_methods_message_is_refused_by_validation_not_crashed_on(service):
    # A RankRequest's bytes sent to RecordEvents: field 1 is then `users`, a nested message.
    code, details = raw_call(service.grpc_target, METHODS[1], VALID_RANK)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("users"), details


def test_health_watch_is_unimplemented_without_a_traceback(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as error:
            next(iter(watch(health_pb2.HealthCheckRequest(), timeout=30, metadata=(("application", "seqrank"),))))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not any(mark in (error.value.details() or "") for mark in TRACEBACK_MARKS)


def test_valid_bytes_still_rank(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        call = channel.unary_unary(METHODS[0], request_serializer=None, response_deserializer=pb.RankResponse.FromString)
        response = call(VALID_RANK, timeout=30, metadata=(("application", "seqrank"),))
    assert response.history_source == pb.HISTORY_SOURCE_FALLBACK and len(response.items) == 3
