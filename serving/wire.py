"""Request bytes -> protobuf message, with a decode failure located at its field.

protobuf's own DecodeError says only "Error parsing message with type 'seqrank.v1.RankRequest'". A caller fixing
its request needs the field, so on failure the wire format is walked once more (tag, wire type, length) to find
the first field that breaks it: a truncated length, a string that is not UTF-8, a nested message that does not
parse. Pure: no Ray, no gRPC; `errors.rpc_method` turns a `WireError` into INVALID_ARGUMENT.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

REQUEST_FIELD = "request"  # the subject of an error that no single field explains (garbage from the first byte)
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """The bytes are not a valid message of the expected type; `field` is the path of the first bad field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        if position >= len(data):
            raise IndexError
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise IndexError


def locate(descriptor: Descriptor, data: bytes, path: str = "") -> tuple[str, str] | None:
    """(field path, what is wrong) of the first field of `data` that breaks `descriptor`'s wire format; None
    when the walk finds nothing (protobuf may still refuse the bytes for a reason this walk does not check)."""
    position, seen = 0, {}
    while position < len(data):
        try:
            key, position = _varint(data, position)
        except IndexError:
            return path or REQUEST_FIELD, "truncated field tag"
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = field.name if field is not None else f"<field {number}>"
        if field is not None and field.is_repeated:
            name = f"{name}[{seen.get(number, 0)}]"
            seen[number] = seen.get(number, 0) + 1
        where = f"{path}.{name}" if path else name
        try:
            if wire_type == _VARINT:
                _, position = _varint(data, position)
            elif wire_type in (_FIXED64, _FIXED32):
                position += 8 if wire_type == _FIXED64 else 4
            elif wire_type == _LENGTH_DELIMITED:
                length, position = _varint(data, position)
                chunk, position = data[position:position + length], position + length
                if len(chunk) < length:
                    return where, f"truncated: {length} bytes announced, {len(chunk)} sent"
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = locate(field.message_type, chunk, where)
                    if inner is not None:
                        return inner
            else:
                return where, f"wire type {wire_type} is not one this API uses"
        except IndexError:
            return where, "truncated value"
        except UnicodeDecodeError:
            return where, "not valid UTF-8"
        if position > len(data):
            return where, "truncated value"
    return None


def decode(message_type: type[Message], data: bytes) -> Message:
    """`message_type` parsed from `data`; WireError naming the field when the bytes are not such a message."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        field, reason = locate(message_type.DESCRIPTOR, bytes(data)) or (REQUEST_FIELD, "does not parse")
        raise WireError(field, f"not a valid {message_type.DESCRIPTOR.full_name}: {reason}") from None
