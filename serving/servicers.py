"""The gRPC servicer functions Serve's proxy registers (the Serve config's `grpc_servicer_functions`).

They register the same services as protoc's `add_*_to_server`, with one difference: requests reach the ingress
as the raw bytes the client sent (no request deserializer), and `errors.rpc_method` decodes them after the auth
check. With protoc's deserializer the proxy itself decodes, so garbage, a truncated message or invalid UTF-8 in a
string field fails inside the proxy as UNKNOWN "Unexpected <class 'DecodeError'>": before auth, outside the
request metrics, and without naming the field. Decoding in the replica answers INVALID_ARGUMENT instead.

The health service registers `Check` only: grpc itself then answers the streaming `Watch` UNIMPLEMENTED, as the
health protocol asks of a server that does not offer it (a registered `Watch` would reach the ingress, which has
no such method, and come back INTERNAL).
"""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2

from seqrank.v1 import ranking_pb2

RANKING_SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
HEALTH_METHODS = ("Check",)
RANKING_SERVICER_FUNCTION = f"{__name__}.add_RankingServiceServicer_to_server"
HEALTH_SERVICER_FUNCTION = f"{__name__}.add_HealthServicer_to_server"


def _method_handlers(service: ServiceDescriptor, servicer, methods: tuple[str, ...]) -> dict:
    """Unary handlers taking raw request bytes; responses serialised as protoc's code would."""
    return {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=None,  # bytes through to the ingress, which decodes after auth
            response_serializer=lambda response: response.SerializeToString(),
        )
        for method in service.methods
        if method.name in methods
    }


def _register(service: ServiceDescriptor, servicer, server, methods: tuple[str, ...]) -> None:
    handlers = _method_handlers(service, servicer, methods)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    add_registered = getattr(server, "add_registered_method_handlers", None)  # grpcio >= 1.65
    if add_registered is not None:
        add_registered(service.full_name, handlers)


def add_RankingServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 (protoc's naming, on purpose)
    """seqrank.v1.RankingService, every method, requests as bytes."""
    _register(RANKING_SERVICE, servicer, server, tuple(method.name for method in RANKING_SERVICE.methods))


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802
    """grpc.health.v1.Health with `Check` only, requests as bytes; `Watch` stays UNIMPLEMENTED."""
    _register(HEALTH_SERVICE, servicer, server, HEALTH_METHODS)
