"""The client over real gRPC against a small scripted local server: retries (Rank always, RecordEvents only with
an idempotency key, the same key on every attempt), the bearer token, and TLS / mTLS with throwaway certificates."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from seqrank.serving.cli import build_parser, main
from seqrank.serving.cli.client import TOKEN_ENV, client_of
from seqrank.serving.client.ranking_client import IDEMPOTENCY_KEY_PREFIX, RankingClient, TlsConfig
from seqrank.serving.client.retry import RetryPolicy
from seqrank.serving.history import Event
from seqrank.v1 import ranking_pb2 as pb
from seqrank.v1 import ranking_pb2_grpc

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)
TOKEN = "client-test-token-0123456789"
C = grpc.StatusCode


@dataclass
class Scripted(ranking_pb2_grpc.RankingServiceServicer):
    """Fails the first calls with the scripted codes, then answers; records what every attempt carried."""

    failures: list = field(default_factory=list)
    attempts: list = field(default_factory=list)  # (method, request, metadata dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _attempt(self, method, request, context):
        with self.lock:
            self.attempts.append((method, request, dict(context.invocation_metadata())))
            code = self.failures.pop(0) if self.failures else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    def Rank(self, request, context):
        self._attempt("Rank", request, context)
        return pb.RankResponse(request_id=request.request_id or "ranked")

    def RecordEvents(self, request, context):
        self._attempt("RecordEvents", request, context)
        return pb.RecordEventsResponse(accepted=1, stored=1)

    def GetModelInfo(self, request, context):
        self._attempt("GetModelInfo", request, context)
        return pb.GetModelInfoResponse(model_version="v-scripted", num_items=3)


def serve(servicer, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("code", [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED])
def test_rank_is_retried_on_transient_codes(scripted, code):
    servicer, target = scripted
    servicer.failures = [code, code]
    with RankingClient(target, retry=FAST) as client:
        assert client.rank("u1", request_id="r1").request_id == "r1"
        assert client.retries == 2
    assert [method for method, _, _ in servicer.attempts] == ["Rank"] * 3


def test_rank_gives_up_after_the_attempt_budget(scripted):
    servicer, target = scripted
    servicer.failures = [C.UNAVAILABLE] * 10
    with RankingClient(target, retry=FAST) as client, pytest.raises(grpc.RpcError) as error:
        client.rank("u1")
    assert error.value.code() == C.UNAVAILABLE and len(servicer.attempts) == FAST.max_attempts


@pytest.mark.parametrize("code", [C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAUTHENTICATED, C.INTERNAL])
def test_non_transient_codes_are_never_retried(scripted, code):
    servicer, target = scripted
    servicer.failures = [code]
    with RankingClient(target, retry=FAST) as client, pytest.raises(grpc.RpcError) as error:
        client.rank("u1")
    assert error.value.code() == code and len(servicer.attempts) == 1


@pytest.mark.parametrize("code", [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED])
def test_record_events_without_an_idempotency_key_is_never_retried(scripted, code):
    servicer, target = scripted
    servicer.failures = [code]
    request = pb.RecordEventsRequest(users=[pb.UserEvents(user_id="u1", events=[pb.Event(item_id="a")])])
    with RankingClient(target, retry=FAST) as client:
        with pytest.raises(grpc.RpcError):
            client.send_record(request)
        with pytest.raises(grpc.RpcError):
            servicer.failures = [code]
            client.record({"u1": [Event("a", "")]}, idempotency_key="")  # "" = explicitly no key
        assert client.retries == 0
    assert len(servicer.attempts) == 2


def test_record_events_gets_a_generated_key_reused_on_every_retry(scripted):
    servicer, target = scripted
    servicer.failures = [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED]
    with RankingClient(target, retry=FAST) as client:
        assert client.record({"u1": [Event("a", "pv")]}).stored == 1
        client.record({"u1": [Event("a", "pv")]})
    keys = [request.idempotency_key for _, request, _ in servicer.attempts]
    assert len(keys) == 4 and keys[0] == keys[1] == keys[2] != keys[3]  # one key per logical call
    assert keys[0].startswith(IDEMPOTENCY_KEY_PREFIX) and len(keys[0]) <= 128


def test_record_events_with_a_caller_key_is_retried_with_that_key_but_not_on_deadline(scripted):
    servicer, target = scripted
    servicer.failures = [C.UNAVAILABLE]
    with RankingClient(target, retry=FAST) as client:
        client.record({"u1": [Event("a", "")]}, idempotency_key="caller-key-1")
        servicer.failures = [C.DEADLINE_EXCEEDED]
        with pytest.raises(grpc.RpcError):  # the write may have happened: the caller decides, with the same key
            client.record({"u1": [Event("a", "")]}, idempotency_key="caller-key-2")
    assert [request.idempotency_key for _, request, _ in servicer.attempts] == ["caller-key-1"] * 2 + ["caller-key-2"]


def test_token_and_application_travel_as_metadata(scripted):
    servicer, target = scripted
    with RankingClient(target, application="seqrank", token=TOKEN, retry=FAST) as client:
        client.model_info()
    metadata = servicer.attempts[0][2]
    assert metadata["authorization"] == f"Bearer {TOKEN}" and metadata["application"] == "seqrank"


# ---- TLS with throwaway certificates -------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def write_pki(directory: Path) -> Pki:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path, data):
        path.write_bytes(data)
        return path

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = certificate("seqrank test CA", ca_key, "seqrank test CA", ca_key,
                     [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate("localhost", server_key, "seqrank test CA", ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    client = certificate("seqrank test client", client_key, "seqrank test CA", ca_key,
                         [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    pem = serialization.Encoding.PEM
    return Pki(ca=write(directory / "ca.pem", ca.public_bytes(pem)),
               server_cert=write(directory / "server.pem", server.public_bytes(pem)),
               server_key=write(directory / "server.key", key_pem(server_key)),
               client_cert=write(directory / "client.pem", client.public_bytes(pem)),
               client_key=write(directory / "client.key", key_pem(client_key)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


def serve_tls(pki: Pki, require_client_auth: bool):
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if require_client_auth else None,
        require_client_auth=require_client_auth)
    servicer = Scripted()
    server, target = serve(servicer, credentials)
    return server, servicer, target


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def tls_server(request, pki):
    server, servicer, target = serve_tls(pki, require_client_auth=request.param)
    yield servicer, target, request.param
    server.stop(None)


def test_tls_and_mtls_carry_calls_and_the_token(tls_server, pki):
    servicer, target, mtls = tls_server
    tls = TlsConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key)) if mtls else TlsConfig(str(pki.ca))
    with RankingClient(target, token=TOKEN, tls=tls, retry=FAST) as client:
        assert client.model_info().model_version == "v-scripted"
    assert servicer.attempts[0][2]["authorization"] == f"Bearer {TOKEN}"


def test_a_server_the_ca_did_not_sign_is_refused(tls_server, tmp_path):
    _, target, _ = tls_server
    stranger = write_pki(tmp_path)  # another CA
    with RankingClient(target, tls=TlsConfig(str(stranger.ca)), retry=FAST, timeout_s=5) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.model_info()
    assert error.value.code() == C.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(pki):
    server, servicer, target = serve_tls(pki, require_client_auth=True)
    try:
        with RankingClient(target, tls=TlsConfig(str(pki.ca)), retry=FAST, timeout_s=5) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.model_info()
    finally:
        server.stop(None)
    assert error.value.code() == C.UNAVAILABLE and servicer.attempts == []


def test_plaintext_to_a_tls_port_fails(tls_server):
    _, target, _ = tls_server
    with RankingClient(target, retry=FAST, timeout_s=5) as client, pytest.raises(grpc.RpcError) as error:
        client.model_info()
    assert error.value.code() == C.UNAVAILABLE


def test_cli_info_over_mtls_with_the_token_from_the_environment(tls_server, pki, monkeypatch, capsys):
    servicer, target, mtls = tls_server
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    argv = ["info", "--target", target, "--tls", "--ca-cert", str(pki.ca), "--json"]
    if mtls:
        argv += ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    assert main(argv) == 0
    assert '"model_version": "v-scripted"' in capsys.readouterr().out
    assert servicer.attempts[0][2]["authorization"] == f"Bearer {TOKEN}"


def test_cli_client_flags():
    args = build_parser().parse_args(["rank", "u1", "--token", "t" * 20, "--retries", "0", "--timeout", "2"])
    assert client_of(args, environ={TOKEN_ENV: "ignored"})._metadata == (("authorization", "Bearer " + "t" * 20),)
    args = build_parser().parse_args(["rank", "u1"])
    assert client_of(args, environ={TOKEN_ENV: "from-env"})._metadata == (("authorization", "Bearer from-env"),)
    assert client_of(args, environ={})._metadata == ()
    with pytest.raises(ValueError, match="need --tls"):
        client_of(build_parser().parse_args(["info", "--ca-cert", "ca.pem"]), environ={})
    with pytest.raises(ValueError, match="client_cert and client_key"):
        TlsConfig(client_cert="c.pem")


def test_the_load_generator_retries_rank_like_the_client(scripted):
    from seqrank.serving.bench.loadgen import grpc_caller_factory

    servicer, target = scripted
    servicer.failures = [C.RESOURCE_EXHAUSTED, C.UNAVAILABLE]
    retries: list[str] = []
    call = grpc_caller_factory(target, "seqrank", pb.RankRequest(user_id="u1", request_id="r9"), FAST, retries)()
    try:
        assert call(5.0).request_id == "r9"
    finally:
        call.close()
    assert retries == ["RESOURCE_EXHAUSTED", "UNAVAILABLE"] and len(servicer.attempts) == 3
