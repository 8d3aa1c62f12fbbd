"""Bearer-token auth and admission control on a second application of the session's cluster ("seqrank-guarded":
the same code and artifact, `ingress.auth.tokens: file:...`, an ingress admitting one request and queueing one).

The session's own app stays unauthenticated for the other tests; this module adds the second app through the same
REST API and removes it again at its end (while two apps run, calls must name theirs in `application` metadata).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.client.retry import NO_RETRY, RetryPolicy
from seqrank.serving.history import Event
from seqrank.serving.ops.deploy import preflight, submit, wait_until_running
from seqrank.serving.ops.serve_config_check import INGRESS_DEPLOYMENT, RETRIEVAL_DEPLOYMENT, application
from seqrank.v1 import ranking_pb2 as pb
from seqrank.v1 import ranking_pb2_grpc
from tests.e2e.conftest import DEPLOY_TIMEOUT_S

GUARDED = "seqrank-guarded"
OLD_TOKEN, NEW_TOKEN = "e2e-old-token-5b0c9f2e41d7a863", "e2e-new-token-0e6f3a9d27c4b158"
REJECTED_TOKEN = "e2e-rejected-token-91a4c07f3e5d2b68"  # must never show up in a log or a message
BURST = 40  # concurrent Rank calls against 1 running + 1 queued
DEADLINE_S = 30.0


def guarded_application(base: dict, tokens_file: Path, history_db: Path) -> dict:
    app = copy.deepcopy(base)
    app["name"], app["route_prefix"] = GUARDED, f"/{GUARDED}"
    args = app["args"]
    args["ingress"]["auth"] = {"tokens": f"file:{tokens_file}"}
    args["ingress"]["max_batch_size"] = 1  # preflight: a batch must fit max_ongoing_requests
    args["ingress"]["history"]["url"] = f"sqlite:///{history_db}"
    args["retrieval"]["placement"] = "ingress"  # one replica fewer on a small machine
    deployments = []
    for deployment in app["deployments"]:
        if deployment["name"] == RETRIEVAL_DEPLOYMENT:
            continue
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"]["num_cpus"] = 0.25
        if deployment["name"] == INGRESS_DEPLOYMENT:
            deployment["max_ongoing_requests"], deployment["max_queued_requests"] = 1, 1
        deployments.append(deployment)
    app["deployments"] = deployments
    return app


def applications_running(service) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return set(ServeSubmissionClient(service.dashboard_url).get_serve_details().get("applications", {}))


@pytest.fixture(scope="module")
def guarded(service, tmp_path_factory):
    directory = tmp_path_factory.mktemp("guarded")
    tokens_file = directory / "tokens"
    tokens_file.write_text(f"{OLD_TOKEN}\n{NEW_TOKEN}\n")  # two tokens: a rotation in progress
    app = guarded_application(application(service.config), tokens_file, directory / "history.db")
    alone = {**copy.deepcopy(service.config), "applications": [app]}
    preflight(alone)
    both = {**copy.deepcopy(service.config), "applications": [application(service.config), app]}
    submit(both, service.dashboard_url)
    try:
        wait_until_running(service.dashboard_url, GUARDED, DEPLOY_TIMEOUT_S)
        yield service
    finally:
        submit(service.config, service.dashboard_url)  # back to the session's one app
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while GUARDED in applications_running(service) and time.monotonic() < deadline:
            time.sleep(0.5)
        wait_until_running(service.dashboard_url, service.app_name, DEPLOY_TIMEOUT_S)


def guarded_client(service, token: str | None = None, **options) -> RankingClient:
    return RankingClient(service.grpc_target, application=GUARDED, timeout_s=30.0, token=token,
                         **{"retry": NO_RETRY, **options})


def rank_request(item_ids) -> pb.RankRequest:
    return pb.RankRequest(user_id="u-guarded", k=5, recent_events=[pb.Event(item_id=i) for i in item_ids[1:4]])


@pytest.mark.parametrize("token, fragment", [
    (None, "authorization: missing; send metadata 'authorization: Bearer <token>'"),
    (REJECTED_TOKEN, "authorization: invalid or revoked bearer token"),
])
def test_calls_without_a_valid_token_are_unauthenticated(guarded, item_ids, token, fragment):
    calls = {
        "Rank": lambda client: client.send_rank(rank_request(item_ids)),
        "RecordEvents": lambda client: client.record({"u-guarded-write": [Event(item_ids[1], "")]}),
        "GetModelInfo": lambda client: client.model_info(),
    }
    with guarded_client(guarded, token) as client:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call(client)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert error.value.details() == fragment, name
    with guarded_client(guarded, NEW_TOKEN) as client:  # the refused write stored nothing
        assert client.rank("u-guarded-write").history_source == pb.HISTORY_SOURCE_FALLBACK


@pytest.mark.parametrize("token", [OLD_TOKEN, NEW_TOKEN])
def test_every_token_of_a_rotation_is_accepted(guarded, item_ids, token):
    with guarded_client(guarded, token) as client:
        assert len(client.send_rank(rank_request(item_ids)).items) == 5
        assert client.model_info().num_items == len(item_ids) - 1


def test_health_needs_no_token(guarded):
    with guarded_client(guarded) as client:
        assert client.health() == health_pb2.HealthCheckResponse.SERVING


def test_garbage_without_a_token_is_unauthenticated_and_with_one_invalid_argument(guarded):
    # Auth comes first: an unauthenticated caller learns nothing about how its bytes would decode.
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        call = channel.unary_unary("/seqrank.v1.RankingService/Rank", request_serializer=None,
                                   response_deserializer=None)
        for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED), (OLD_TOKEN, grpc.StatusCode.INVALID_ARGUMENT)):
            metadata = (("application", GUARDED),) + ((("authorization", f"Bearer {token}"),) if token else ())
            with pytest.raises(grpc.RpcError) as error:
                call(b"\x0a\x02\xff\xfe", timeout=30, metadata=metadata)
            assert error.value.code() == expected, error.value.details()


def test_no_token_appears_in_any_log_file(guarded, item_ids):
    """Neither a rejected token nor the accepted ones (the token file's contents), after calls with each."""
    import ray

    with guarded_client(guarded, REJECTED_TOKEN) as client, pytest.raises(grpc.RpcError):
        client.model_info()
    for token in (OLD_TOKEN, NEW_TOKEN):
        with guarded_client(guarded, token) as client:
            client.send_rank(rank_request(item_ids))
    time.sleep(1.0)  # let the replica's and the proxy's log lines reach their files
    logs = Path(ray.init(ignore_reinit_error=True).address_info["session_dir"]) / "logs"
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert files, f"no log files under {logs}"
    for token in (REJECTED_TOKEN, OLD_TOKEN, NEW_TOKEN):
        needle = token.encode()
        assert [str(path) for path in files if needle in path.read_bytes()] == [], token


def test_a_full_queue_answers_resource_exhausted_at_once(guarded, item_ids):
    """max_ongoing_requests 1 + max_queued_requests 1: a burst beyond both is refused by the proxy, quickly."""
    request = rank_request(item_ids)
    metadata = (("application", GUARDED), ("authorization", f"Bearer {OLD_TOKEN}"))
    outcomes: list[tuple[grpc.StatusCode, float, str]] = []
    lock = threading.Lock()
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        stub.Rank(request, metadata=metadata, timeout=30)  # warm: the channel is connected

        def record(future, started):
            code = future.code()
            with lock:
                outcomes.append((code, time.monotonic() - started, future.details() or ""))

        started = time.monotonic()
        futures = [stub.Rank.future(request, metadata=metadata, timeout=DEADLINE_S) for _ in range(BURST)]
        for future in futures:
            future.add_done_callback(lambda f, started=started: record(f, started))
        for future in futures:
            future.exception()  # wait
    codes = Counter(code for code, _, _ in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.OK] >= 1 and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= BURST // 2, codes
    rejected = sorted(seconds for code, seconds, _ in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    # refused without waiting for capacity: every rejection lands long before the deadline a queued call would
    # run into (a wall-clock bound only, loose enough for a loaded 2-core machine; timings belong to docs/reliability.md)
    assert rejected[-1] < DEADLINE_S / 3, rejected
    median_ms, max_ms = 1000 * rejected[len(rejected) // 2], 1000 * rejected[-1]
    print(f"\nburst of {BURST} against 1 running + 1 queued: {({c.name: n for c, n in codes.items()})}, "
          f"rejections answered in median {median_ms:.0f} ms, max {max_ms:.0f} ms")


def test_clients_that_retry_with_backoff_all_get_through_a_full_queue(guarded, item_ids):
    request = rank_request(item_ids)
    policy = RetryPolicy(max_attempts=12, initial_backoff_s=0.05, max_backoff_s=1.0)
    results: list[str] = []
    retries = []

    def worker():
        with guarded_client(guarded, OLD_TOKEN, retry=policy) as client:
            try:
                client.send_rank(request)
                results.append("OK")
            except grpc.RpcError as error:
                results.append(error.code().name)
            retries.append(client.retries)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["OK"] * len(threads), Counter(results)
    print(f"\n{len(threads)} retrying clients: all OK after {sum(retries)} retries in all")
    assert sum(retries) > 0  # the queue was full for some of them: the retries are what got them through
