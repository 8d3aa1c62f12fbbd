"""The status-code table and the RPC wrapper: every domain error reaches the client as its code and message."""

import asyncio
import inspect
import logging

import grpc
import pytest

from seqrank.serving import errors
from seqrank.serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RpcHooks,
    Unauthenticated,
    Unavailable,
    rpc_method,
)
from seqrank.v1 import ranking_pb2
from tests.support import FakeContext


class Ingress:
    def __init__(self, behaviour, hooks=None):
        self.behaviour = behaviour
        self.calls = 0
        if hooks is not None:
            self.rpc_hooks = hooks

    @rpc_method(ranking_pb2.RankRequest, ranking_pb2.RankResponse)
    async def Rank(self, request, grpc_context):
        self.calls += 1
        return await self.behaviour(request)


def call(ingress, context=None):
    context = context or FakeContext()
    response = asyncio.run(ingress.Rank(ranking_pb2.RankRequest(user_id="u1"), grpc_context=context))
    return response, context


def raising(error):
    async def behaviour(request):
        raise error

    return behaviour


@pytest.mark.parametrize(
    "error, code",
    [
        (InvalidArgument("k", "must be in [1, 100], got 0"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("user_id", "no user 'u9'"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("requests", "over 100 per second"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("history_store", "database is locked"), grpc.StatusCode.UNAVAILABLE),
        (Unauthenticated("authorization", "missing bearer token"), grpc.StatusCode.UNAUTHENTICATED),
        (FailedPrecondition("idempotency_key", "reused with another payload"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_domain_error_sets_its_code_and_a_message_naming_the_field(error, code):
    response, context = call(Ingress(raising(error)))
    assert context.code == code
    assert context.details == str(error)
    assert context.details.startswith(f"{error.subject}: ")
    assert response == ranking_pb2.RankResponse()
    assert type(response) is ranking_pb2.RankResponse


def test_every_domain_error_class_has_exactly_one_code():
    classes = [value for value in vars(errors).values() if isinstance(value, type)]
    domain_errors = {cls for cls in classes if issubclass(cls, errors.ServingError)}
    assert domain_errors - {errors.ServingError} == set(errors.STATUS_CODE_OF)


def test_subclass_inherits_its_parents_code():
    class UnknownBehavior(InvalidArgument):
        pass

    assert errors.status_code_of(UnknownBehavior("behavior", "x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_argument_message_format():
    error = InvalidArgument("k", "must be in [1, 100], got 0")
    assert str(error) == "k: must be in [1, 100], got 0"
    assert error.field == "k"


def test_unexpected_error_is_internal_without_leaking_and_logged_with_traceback(caplog):
    secret = "password=hunter2 at /srv/secret/path"
    with caplog.at_level(logging.ERROR, logger="seqrank.serving.errors"):
        response, context = call(Ingress(raising(KeyError(secret))))
    assert context.code == grpc.StatusCode.INTERNAL
    assert secret not in context.details and "hunter2" not in context.details
    assert context.details == errors.INTERNAL_ERROR_DETAILS
    assert response == ranking_pb2.RankResponse()
    assert any(record.exc_info and record.exc_info[0] is KeyError for record in caplog.records)


def test_success_returns_the_response_and_sets_no_code():
    async def ok(request):
        return ranking_pb2.RankResponse(request_id="r1")

    response, context = call(Ingress(ok))
    assert response.request_id == "r1"
    assert context.code is None and context.details is None


def test_observe_hook_sees_method_code_and_duration():
    outcomes = []

    async def slow_then_fail(request):
        await asyncio.sleep(0.02)
        raise InvalidArgument("k", "bad")

    call(Ingress(slow_then_fail, RpcHooks(observe=outcomes.append)))
    (outcome,) = outcomes
    assert outcome.method == "Rank"
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.duration_s >= 0.02


def test_a_failing_observe_hook_does_not_fail_the_request():
    def broken_metrics(outcome):
        raise RuntimeError("metrics backend down")

    async def ok(request):
        return ranking_pb2.RankResponse(request_id="r1")

    response, context = call(Ingress(ok, RpcHooks(observe=broken_metrics)))
    assert response.request_id == "r1" and context.code is None


def test_authenticate_hook_rejects_before_the_method_runs():
    def require_token(metadata):
        if ("authorization", "Bearer good") not in metadata:
            raise Unauthenticated("authorization", "missing or wrong bearer token")

    async def ok(request):
        return ranking_pb2.RankResponse(request_id="r1")

    ingress = Ingress(ok, RpcHooks(authenticate=require_token))
    _, denied = call(ingress, FakeContext([("authorization", "Bearer bad")]))
    assert denied.code == grpc.StatusCode.UNAUTHENTICATED and ingress.calls == 0
    response, allowed = call(ingress, FakeContext([("authorization", "Bearer good")]))
    assert allowed.code is None and response.request_id == "r1" and ingress.calls == 1


def test_cancellation_propagates_and_is_observed():
    outcomes = []

    async def cancelled(request):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        call(Ingress(cancelled, RpcHooks(observe=outcomes.append)))
    assert [outcome.code for outcome in outcomes] == [grpc.StatusCode.CANCELLED]


def test_wrapped_method_keeps_the_grpc_context_parameter_ray_looks_for():
    # Ray passes grpc_context only to methods whose signature names it (replica.UserMethodInfo).
    assert "grpc_context" in inspect.signature(Ingress.Rank).parameters
    assert Ingress.Rank.__name__ == "Rank"
    assert inspect.iscoroutinefunction(Ingress.Rank)
