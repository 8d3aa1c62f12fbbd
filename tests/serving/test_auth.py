"""Bearer-token auth: token sources, the metadata check, Health exempt, and no token in any message or log."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from seqrank.serving.auth import MIN_TOKEN_LENGTH, AuthConfig, BearerAuth, authenticator, load_tokens, parse_tokens
from seqrank.serving.config import AppArgs
from seqrank.serving.errors import RpcHooks, Unauthenticated, rpc_method
from seqrank.v1 import ranking_pb2
from tests.support import FakeContext

OLD, NEW = "old-token-0123456789abcdef", "new-token-fedcba9876543210"
FIXED_REASONS = {"missing; send metadata 'authorization: Bearer <token>'", "must be 'Bearer <token>'",
                 "invalid or revoked bearer token"}


def test_tokens_split_on_commas_and_newlines():
    assert parse_tokens(f" {OLD} ,\n{NEW}\r\n\n,") == (OLD, NEW)
    assert parse_tokens("") == ()


def test_tokens_load_from_an_environment_variable_or_a_file(tmp_path):
    assert load_tokens(AuthConfig("env:SEQRANK_TOKENS"), {"SEQRANK_TOKENS": f"{OLD},{NEW}"}) == (OLD, NEW)
    path = tmp_path / "tokens"
    path.write_text(f"{OLD}\n{NEW}\n")
    assert load_tokens(AuthConfig(f"file:{path}"), {}) == (OLD, NEW)


@pytest.mark.parametrize("source, environ, fragment", [
    ("env:SEQRANK_TOKENS", {}, "SEQRANK_TOKENS is not set"),
    ("env:SEQRANK_TOKENS", {"SEQRANK_TOKENS": " ,\n"}, "holds no token"),
    ("env:SEQRANK_TOKENS", {"SEQRANK_TOKENS": f"{OLD},short"}, f"shorter than {MIN_TOKEN_LENGTH}"),
    ("file:/nonexistent/seqrank-tokens", {}, "cannot read file:/nonexistent/seqrank-tokens"),
])
def test_a_missing_empty_or_weak_token_source_fails_at_start_without_showing_tokens(source, environ, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        load_tokens(AuthConfig(source), environ)
    assert OLD not in str(error.value)


def test_auth_config_is_off_by_default_and_strict():
    assert AppArgs().ingress.auth.enabled is False and authenticator(AuthConfig(), {}) is None
    assert AppArgs.parse({"ingress": {"auth": {"tokens": "env:X"}}}).ingress.auth == AuthConfig("env:X")
    for bad in ({"tokens": "X"}, {"tokens": "env:"}, {"token": "env:X"}, {"tokens": 5}):
        with pytest.raises(ValidationError):
            AppArgs.parse({"ingress": {"auth": bad}})


@pytest.mark.parametrize("metadata, fragment", [
    ([], "missing"),
    ([("authorization", "Basic dXNlcjpwYXNz")], "must be 'Bearer <token>'"),
    ([("authorization", f"Bearer{OLD}")], "must be 'Bearer <token>'"),
    ([("authorization", "Bearer wrong-token-0123456789")], "invalid or revoked"),
    ([("authorization", f"Bearer {OLD}x")], "invalid or revoked"),
    ([("authorization", f"Bearer {OLD}"), ("authorization", f"Bearer {NEW}")], "sent 2 times"),
])
def test_bad_credentials_are_unauthenticated_naming_authorization(metadata, fragment):
    with pytest.raises(Unauthenticated) as error:
        BearerAuth([OLD, NEW]).check(metadata)
    assert error.value.subject == "authorization" and fragment in error.value.reason
    presented = " ".join(value for _, value in metadata)
    assert all(part not in str(error.value) for part in presented.split() if len(part) > 8)


@pytest.mark.parametrize("token", [OLD, NEW])
def test_every_listed_token_is_accepted_for_rotation(token):
    auth = BearerAuth([OLD, NEW])
    auth.check([("application", "seqrank"), ("authorization", f"Bearer {token}")])
    auth.check([("authorization", f"bearer   {token} ")])  # the scheme is case-insensitive (RFC 6750)
    assert auth.matches(token) and not auth.matches(token[:-1])


class GuardedIngress:
    def __init__(self):
        self.rpc_hooks = RpcHooks(authenticate=BearerAuth([OLD]).check)

    @rpc_method(ranking_pb2.RankRequest, ranking_pb2.RankResponse)
    async def Rank(self, request, grpc_context):
        return ranking_pb2.RankResponse(request_id="ranked")

    @rpc_method(ranking_pb2.RankRequest, ranking_pb2.RankResponse, public=True)
    async def Check(self, request, grpc_context):
        return ranking_pb2.RankResponse(request_id="healthy")


def call(method, metadata):
    context = FakeContext(metadata)
    return asyncio.run(method(ranking_pb2.RankRequest(), grpc_context=context)), context


def test_the_wrapper_refuses_before_the_method_runs_and_never_logs_the_token(caplog):
    ingress = GuardedIngress()
    rejected = "Bearer rejected-secret-0123456789"
    with caplog.at_level(logging.DEBUG):
        response, context = call(ingress.Rank, [("authorization", rejected)])
    assert response.request_id == "" and context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.details == "authorization: invalid or revoked bearer token"
    assert "UNAUTHENTICATED" in caplog.text and "rejected-secret" not in caplog.text
    response, context = call(ingress.Rank, [("authorization", f"Bearer {OLD}")])
    assert response.request_id == "ranked" and context.code is None


def test_public_methods_skip_authentication():
    response, context = call(GuardedIngress().Check, [])
    assert response.request_id == "healthy" and context.code is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["authorization", "Authorization", "application", "x-other"]),
                          st.one_of(st.text(max_size=80), st.binary(max_size=20),
                                    st.builds(lambda t: f"Bearer {t}", st.text(max_size=60)))), max_size=4))
def test_any_metadata_is_accepted_only_with_a_listed_token_and_never_echoed(metadata):
    auth = BearerAuth([OLD, NEW])
    values = [value for key, value in metadata if key.lower() == "authorization"]
    try:
        auth.check(metadata)
    except Unauthenticated as error:  # the message is one of a few fixed texts: nothing of the value is echoed
        assert error.subject == "authorization"
        assert error.reason in FIXED_REASONS or error.reason == f"sent {len(values)} times; send it once"
        return
    (value,) = values  # accepted: exactly one authorization value, carrying one of the tokens
    assert value.split()[-1] in (OLD, NEW)
