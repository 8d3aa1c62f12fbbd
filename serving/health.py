"""grpc.health.v1 for the app itself: Serve's proxy forwards Health/Check to the ingress, which answers here.

Serve registers the servicer named by `servicers.HEALTH_SERVICER_FUNCTION` (listed in the Serve config's
grpc_servicer_functions) and routes `Check` to the ingress method of that name; without both the proxy
answers UNIMPLEMENTED. The streaming `Watch` is not offered: it answers UNIMPLEMENTED.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from seqrank.serving.errors import NotFound, shown
from seqrank.v1 import ranking_pb2

RANKING_SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name  # seqrank.v1.RankingService
OVERALL = ""  # the gRPC health protocol's name for the server as a whole
SERVED_SERVICES = (OVERALL, RANKING_SERVICE)


def check(service: str, model_loaded: bool) -> health_pb2.HealthCheckResponse:
    """SERVING once a model is loaded; unknown service names are NOT_FOUND, as the health protocol asks."""
    if service not in SERVED_SERVICES:
        raise NotFound("service", f"must be one of {list(SERVED_SERVICES)}, got {shown(service)}")
    status = health_pb2.HealthCheckResponse.SERVING if model_loaded else health_pb2.HealthCheckResponse.NOT_SERVING
    return health_pb2.HealthCheckResponse(status=status)
