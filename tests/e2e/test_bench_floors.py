"""The floors `seqrank bench serve` measures Rank against, over real gRPC on the session's Serve: the echo answers at
once, the relay echo only after its two sequential calls to another deployment (its answer counts them)."""

from __future__ import annotations

import copy

import pytest

from seqrank.serving.bench.loadgen import (
    ECHO_APP,
    RELAY_APP,
    RELAY_HOPS,
    echo_application,
    grpc_caller_factory,
    relay_application,
)
from seqrank.serving.ops.deploy import submit, wait_until_running
from seqrank.v1 import ranking_pb2 as pb
from tests.e2e.conftest import DEPLOY_TIMEOUT_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def floors(service):
    both = copy.deepcopy(service.config)
    both["applications"] += [echo_application(), relay_application()]
    try:
        submit(both, service.dashboard_url)
        for name in (service.app_name, ECHO_APP, RELAY_APP):
            wait_until_running(service.dashboard_url, name, DEPLOY_TIMEOUT_S)
        yield service.grpc_target
    finally:
        service.apply(service.config)  # declarative: the config without them removes both


@pytest.mark.parametrize("app, model_version", [(ECHO_APP, ""), (RELAY_APP, "relay:2")])
def test_floor_answers_rank_with_the_request_id(floors, app, model_version):
    assert RELAY_HOPS == 2  # the Kubernetes topology's ingress calls Encoder, then Retrieval
    request = pb.RankRequest(user_id="u", k=10, request_id="floor-1")
    call = grpc_caller_factory(floors, app, request)()
    try:
        response = call(30.0)
    finally:
        call.close()
    assert response.request_id == "floor-1"
    assert response.model_version == model_version
    assert list(response.items) == []


def test_apply_returns_once_the_applications_it_drops_are_gone(floors, service):
    """Last in the module: applying the session's config drops both floors, and `seqrank canary` needs one app."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    service.apply(service.config)
    assert set(ServeSubmissionClient(service.dashboard_url).get_serve_details()["applications"]) == {service.app_name}
