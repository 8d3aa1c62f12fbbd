"""grpc.health.v1 Check semantics: SERVING once a model is loaded, NOT_FOUND for services we do not serve."""

import pytest
from grpc_health.v1 import health_pb2

from seqrank.serving.errors import NotFound
from seqrank.serving.health import RANKING_SERVICE, check


@pytest.mark.parametrize("service", ["", RANKING_SERVICE])
def test_served_services_report_their_state(service):
    assert check(service, model_loaded=True).status == health_pb2.HealthCheckResponse.SERVING
    assert check(service, model_loaded=False).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_unknown_service_is_not_found_naming_the_field():
    with pytest.raises(NotFound) as error:
        check("other.Service", model_loaded=True)
    assert error.value.subject == "service" and "other.Service" in error.value.reason
    assert RANKING_SERVICE == "seqrank.v1.RankingService"
