"""Request bytes decoded in the ingress: bad bytes become INVALID_ARGUMENT naming the first bad field.

The bytes are built by hand from the protobuf wire format (tag = field_number << 3 | wire_type, varint lengths),
so the test does not lean on the encoder it checks.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from seqrank.serving.errors import RpcHooks, Unauthenticated, rpc_method
from seqrank.serving.wire import REQUEST_FIELD, WireError, decode, locate
from seqrank.v1 import ranking_pb2
from tests.support import FakeContext


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a one-byte length."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def varint_field(number: int, value: int) -> bytes:
    assert value < 128
    return bytes([number << 3 | 0, value])


def test_hand_built_bytes_decode_to_the_message():
    # RankRequest: user_id = 1 (string), k = 3 (int32)
    request = decode(ranking_pb2.RankRequest, field(1, b"u7") + varint_field(3, 5))
    assert request.user_id == "u7" and request.k == 5


@pytest.mark.parametrize("data, where, reason", [
    # user_id (field 1) holds 0xff, which no UTF-8 sequence starts with
    (field(1, b"\xff\xfe"), "user_id", "not valid UTF-8"),
    # recent_events[1].item_id (RankRequest field 2 -> Event field 1) is bad UTF-8; recent_events[0] is fine
    (field(2, field(1, b"ok")) + field(2, field(1, b"\xc3")), "recent_events[1].item_id", "not valid UTF-8"),
    # exclude_item_ids (field 6) announces 9 bytes and sends 2
    (bytes([6 << 3 | 2, 9]) + b"ab", "exclude_item_ids[0]", "truncated: 9 bytes announced, 2 sent"),
    # a varint that never ends
    (bytes([3 << 3 | 0]) + b"\xff" * 3, "k", "truncated value"),
    # wire type 7 does not exist
    (bytes([1 << 3 | 7]), "user_id", "wire type 7 is not one this API uses"),
])
def test_the_first_bad_field_is_named(data, where, reason):
    assert locate(ranking_pb2.RankRequest.DESCRIPTOR, data) == (where, reason)
    with pytest.raises(WireError) as raised:
        decode(ranking_pb2.RankRequest, data)
    assert raised.value.field == where
    assert raised.value.reason == f"not a valid seqrank.v1.RankRequest: {reason}"


def test_nested_record_events_fields_are_named_with_their_indices():
    # RecordEventsRequest.users (1) -> UserEvents.events (2) -> Event.behavior (2)
    bad_event = field(1, b"sku-1") + field(2, b"\xe2\x82")  # a 3-byte UTF-8 sequence cut after 2 bytes
    user = field(1, b"u1") + field(2, field(1, b"sku-0")) + field(2, bad_event)
    with pytest.raises(WireError) as raised:
        decode(ranking_pb2.RecordEventsRequest, field(1, field(1, b"u0")) + field(1, user))
    assert raised.value.field == "users[1].events[1].behavior"


def test_garbage_without_a_field_is_blamed_on_the_request():
    with pytest.raises(WireError) as raised:
        decode(ranking_pb2.RankRequest, b"\x80")  # a tag varint cut short
    assert raised.value.field == REQUEST_FIELD


class Ingress:
    def __init__(self, hooks: RpcHooks):
        self.rpc_hooks = hooks
        self.seen = []

    @rpc_method(ranking_pb2.RankRequest, ranking_pb2.RankResponse)
    async def Rank(self, request, grpc_context):
        self.seen.append(request)
        return ranking_pb2.RankResponse(request_id=request.user_id)


def test_bytes_are_decoded_after_auth_and_bad_bytes_are_invalid_argument_and_counted():
    outcomes = []
    ingress = Ingress(RpcHooks(observe=outcomes.append))
    context = FakeContext()
    response = asyncio.run(ingress.Rank(field(1, b"u9"), grpc_context=context))
    assert response.request_id == "u9" and ingress.seen == [ranking_pb2.RankRequest(user_id="u9")]

    context = FakeContext()
    asyncio.run(ingress.Rank(field(1, b"\xff"), grpc_context=context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details == "user_id: not a valid seqrank.v1.RankRequest: not valid UTF-8"
    assert [outcome.code for outcome in outcomes] == [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT]
    assert len(ingress.seen) == 1  # the method never saw the bad bytes


def test_without_a_token_bad_bytes_are_unauthenticated_not_decoded():
    def refuse(metadata):
        raise Unauthenticated("authorization", "missing bearer token")

    ingress = Ingress(RpcHooks(authenticate=refuse))
    context = FakeContext()
    asyncio.run(ingress.Rank(b"\xff\xff\xff", grpc_context=context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
