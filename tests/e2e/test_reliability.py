"""Faults under bounded load, over real gRPC on loopback; docs/reliability.md reports what these measure.

- An Encoder replica starved of CPU, then killed with SIGKILL, under load: Serve replaces it; requests caught in the
  dying replica fail UNAVAILABLE (never INTERNAL), and none fail for a client that retries UNAVAILABLE with backoff.
- kill -9 right after a stream of acknowledged RecordEvents, then a restart: every acknowledged event is stored,
  each event once even when its call is re-sent with the same idempotency key; for SQLite and for Redis.
- Redis stopped: Rank answers the popular list marked HISTORY_SOURCE_STORE_UNAVAILABLE (inline events still rank
  personally), RecordEvents answers UNAVAILABLE naming the store, and both recover without a restart.

Why kill -9 hits the ingress replica and the store, not a second Ray cluster: acknowledged events live only in
the store (the SQLite file, or the Redis server and its AOF); the one process that writes them is the ingress
replica, and no other Ray process (controller, proxy, encoder, retrieval) holds any of them. SIGKILL of the
ingress replica (and of redis-server) is therefore, for the history, the same crash as kill -9 of the whole
`seqrank serve`, and the replacement replica that Serve starts reopens the store exactly as a restarted service
would (SQLite: WAL recovery of a file whose writer died; Redis: AOF replay). It needs no second cluster, which
would double the suite's start-up time on a 2-core machine. Not covered: power loss and kernel crashes (they need
a VM); there the guarantee is the fsync before the acknowledgement (SQLite synchronous=FULL, Redis
appendfsync always), checked in tests/serving/test_history.py.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.client.retry import NO_RETRY, RetryPolicy
from seqrank.serving.history import Event, HistoryConfig, SQLiteHistoryStore, open_history_store
from seqrank.serving.ops.deploy import preflight, submit, wait_until_running
from seqrank.serving.ops.serve_config_check import application
from seqrank.v1 import ranking_pb2 as pb
from tests.e2e.conftest import DEPLOY_TIMEOUT_S
from tests.e2e.helpers import random_history
from tests.e2e.load import OK, ClosedLoop
from tests.serving.conftest import RedisServer, require_redis_server
from tests.topology import with_deployment_pools

pytestmark = pytest.mark.slow

LOAD_WORKERS = 4  # closed-loop clients, each on its own channel
ENCODER_LOAD_WORKERS = 8
MAX_ENCODER_KILLS = 4  # a kill that caught no call is repeated (one in six needed a second)
THROTTLE_S = 3.0  # how long the victim is starved of CPU before its SIGKILL
THROTTLE_STOPPED_S, THROTTLE_RUNNING_S = 0.048, 0.002  # 4 % of a CPU, in 50 ms periods like a CFS quota
LOAD_MAX_S = 240.0  # every load stops by itself after this, whatever happens
REPLACE_TIMEOUT_S = 150.0  # Serve notices a dead replica at its next health check (10 s), then starts a new one
CALL_TIMEOUT_S = 60.0
CLIENT_RETRIES = RetryPolicy()  # the client's default policy (serving/client/retry.py)
REDIS_APP = "seqrank-redis"
MAX_EVENTS_PER_USER = 200  # the committed config's bound: stores are opened with it to read everything back


# ---- Serve replicas --------------------------------------------------------------------------------------------

def running_replicas(service, app_name: str, deployment: str) -> list[dict]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(service.dashboard_url).get_serve_details()
    replicas = details["applications"][app_name]["deployments"][deployment]["replicas"]
    return [replica for replica in replicas if replica["state"] == "RUNNING"]


def kill_9(replica: dict) -> None:
    os.kill(replica["pid"], signal.SIGKILL)  # the replica's worker process, on this machine (local cluster)


def starve_then_kill_9(replica: dict) -> float:
    """Starve the replica of CPU for THROTTLE_S (SIGSTOP/SIGCONT, the way a CPU quota throttles a container), then
    SIGKILL it while stopped; returns the time.monotonic() of the SIGKILL.

    Serve's router sends a replica a call only after the replica has answered for its queue length, and a call the
    replica had not yet accepted when it died is sent to another one, so only calls inside the replica die with it.
    Healthy, the replica holds each call for a few milliseconds of every round trip, and a SIGKILL at a random moment
    often catches none. Starved, it still accepts calls in its short running windows but barely works on them, so the
    calls pile up inside it and the SIGKILL catches them: a throttled replica that is then killed (OOM killer,
    liveness probe) is the crash this pins."""
    pid, deadline = replica["pid"], time.monotonic() + THROTTLE_S
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(THROTTLE_STOPPED_S)
        os.kill(pid, signal.SIGCONT)
        time.sleep(THROTTLE_RUNNING_S)
    os.kill(pid, signal.SIGSTOP)
    kill_9(replica)
    return time.monotonic()


def wait_for_replacement(service, app_name: str, deployment: str, killed: dict, before: list[dict]) -> dict:
    """A RUNNING replica that was not among `before`, once the killed one is no longer listed as RUNNING."""
    before_ids = {replica["replica_id"] for replica in before}
    deadline = time.monotonic() + REPLACE_TIMEOUT_S
    while time.monotonic() < deadline:
        running = running_replicas(service, app_name, deployment)
        new = [replica for replica in running if replica["replica_id"] not in before_ids]
        if new and all(replica["replica_id"] != killed["replica_id"] for replica in running):
            return new[0]
        time.sleep(0.25)
    raise AssertionError(f"{deployment} replica {killed['replica_id']} not replaced within {REPLACE_TIMEOUT_S} s")


def assert_process_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def clients_of(service, app_name: str, retry: RetryPolicy = NO_RETRY):
    return lambda: RankingClient(service.grpc_target, application=app_name, timeout_s=CALL_TIMEOUT_S, retry=retry)


def summary(label: str, outcomes) -> str:
    """One line for the test log (docs/reliability.md quotes these): calls by code, retries, slowest call."""
    codes = Counter(outcome.code for outcome in outcomes)
    retried = sum(1 for outcome in outcomes if outcome.attempts > 1)
    slowest_s = max((outcome.finished - outcome.started for outcome in outcomes), default=0.0)
    details = sorted({outcome.details[:160] for outcome in outcomes if outcome.code != OK})[:3]
    return (f"{label}: {len(outcomes)} calls, {dict(codes)}, {retried} needed a retry, slowest {slowest_s:.1f} s"
            + (f", e.g. {details}" if details else ""))


# ---- 1. an Encoder replica killed under Rank load ----------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_pool(service):
    """The Encoder deployment of the Kubernetes topology (locally the encoder runs inside the ingress)."""
    service.apply(with_deployment_pools(service.config))
    try:
        yield
    finally:
        service.apply(service.config)


@pytest.mark.parametrize("retry", [NO_RETRY, CLIENT_RETRIES], ids=["without_retries", "with_client_retries"])
def test_killed_encoder_replica_is_replaced_under_load(encoder_pool, service, manifest, item_ids, retry):
    length = min(len(item_ids) - 1, manifest["encoder_config"]["max_len"])
    histories = [random_history(item_ids, manifest["behavior_names"], seed=seed, length=length) for seed in range(8)]

    def rank(client: RankingClient, worker: int, sequence: int):
        return client.rank(f"u-encoder-kill-{worker}", recent_events=histories[(worker + sequence) % 8], k=10)

    def caught_a_request(outcomes) -> bool:  # the kill hit a batch inside the encoder
        return any(outcome.code != OK or outcome.attempts > 1 for outcome in outcomes)

    with ClosedLoop(clients_of(service, service.app_name, retry), rank, ENCODER_LOAD_WORKERS, LOAD_MAX_S) as load:
        load.wait_until(lambda: load.count() >= 40, 120, "Rank load flowing before the kill")
        for kill in range(1, MAX_ENCODER_KILLS + 1):  # again while no kill has caught a request in flight
            before = running_replicas(service, service.app_name, "Encoder")
            victim = before[0]
            killed_at = starve_then_kill_9(victim)
            replacement = wait_for_replacement(service, service.app_name, "Encoder", victim, before)
            replaced_at = time.monotonic()
            load.wait_until(lambda: load.count(after=replaced_at) >= 40, 120, "Rank answered after the replacement")
            assert_process_gone(victim["pid"])
            assert replacement["pid"] != victim["pid"]
            if caught_a_request(load.snapshot()):
                break
    outcomes = load.snapshot()
    # Without a hit the rest proves nothing about requests caught in a dying replica: fail rather than pass vacuously.
    assert caught_a_request(outcomes), f"none of {kill} SIGKILLs caught a request in flight in the encoder"
    print(summary(f"encoder SIGKILL x{kill} (last replaced after {replaced_at - killed_at:.1f} s), "
                  f"{ENCODER_LOAD_WORKERS} clients, retries={retry.max_attempts > 1}", outcomes))
    failures = load.failures()
    # Requests in the dying replica's batch fail as retryable UNAVAILABLE naming the cause; on a loaded machine a call
    # queued behind a replacement slower than the proxy's request timeout ends DEADLINE_EXCEEDED (bounded, also
    # retryable). None hang or turn INTERNAL, and a retrying client sees no failure at all.
    retryable = [(f.code == "UNAVAILABLE" and f.details.startswith("model_replica: ")) or f.code == "DEADLINE_EXCEEDED"
                 for f in failures]
    assert all(retryable), failures[:3]
    if retry is CLIENT_RETRIES:
        assert failures == []
    responses = [outcome.response for outcome in outcomes if outcome.code == OK]
    assert all(len(r.items) == 10 and r.model_version == manifest["model_version"] for r in responses)


# ---- 2. kill -9 after a stream of acknowledged RecordEvents, then restart ----------------------------------------

def recorded_events(item_ids: list[str], worker: int, sequence: int) -> list[Event]:
    """Two distinct catalogue items, no timestamp: the server's clock stamps them, so a re-send in a later second
    is not an exact duplicate and only the idempotency key keeps it from being stored twice."""
    first = 1 + (7 * sequence + 3 * worker) % (len(item_ids) - 2)
    return [Event(item_ids[first], "pv"), Event(item_ids[first + 1], "cart")]


def record_stream_call(prefix: str, item_ids: list[str]):
    def record(client: RankingClient, worker: int, sequence: int):
        user = f"{prefix}-{worker}-{sequence}"  # one user per call: its stored history is exactly that call
        return client.record({user: recorded_events(item_ids, worker, sequence)}, idempotency_key=user)

    return record


def kill_9_during_record_stream(service, app_name: str, prefix: str, item_ids: list[str], also_kill=None):
    """Streams RecordEvents, SIGKILLs the ingress replica (and runs `also_kill`) once 20 are acknowledged, keeps
    streaming until the replacement has acknowledged more, then re-sends every call with its key."""
    record = record_stream_call(prefix, item_ids)
    before = running_replicas(service, app_name, "RankingIngress")
    victim = before[0]
    with ClosedLoop(clients_of(service, app_name), record, LOAD_WORKERS, LOAD_MAX_S) as stream:
        stream.wait_until(lambda: stream.count() >= 20, 120, "RecordEvents acknowledged before the kill")
        killed_at = time.monotonic()
        kill_9(victim)
        if also_kill is not None:
            also_kill()
        wait_for_replacement(service, app_name, "RankingIngress", victim, before)
        replaced_at = time.monotonic()
        print(f"{prefix}: ingress replaced {replaced_at - killed_at:.1f} s after the SIGKILL")
        stream.wait_until(lambda: stream.count(after=replaced_at) >= 2 * LOAD_WORKERS, 120,
                          "RecordEvents acknowledged after the restart")
    assert_process_gone(victim["pid"])
    outcomes = stream.snapshot()
    with clients_of(service, app_name, CLIENT_RETRIES)() as client:
        for outcome in outcomes:  # a client re-sending everything, acknowledged or not, with the same key
            again = record(client, outcome.worker, outcome.sequence)
            if outcome.code == OK:
                assert again.idempotent_replay and again.stored == 0, (outcome, again)
            else:  # unknown outcome: applied before the crash (a replay) or not at all (stored now)
                assert again.idempotent_replay or again.stored == again.accepted == 2, (outcome, again)
    return outcomes


def assert_every_event_stored_once(store, outcomes, prefix: str, item_ids: list[str]) -> None:
    lost = 0
    for outcome in outcomes:
        stored = [(e.raw_item_id, e.behavior) for e in
                  store.recent(f"{prefix}-{outcome.worker}-{outcome.sequence}", MAX_EVENTS_PER_USER)]
        sent = [(e.raw_item_id, e.behavior) for e in recorded_events(item_ids, outcome.worker, outcome.sequence)]
        if outcome.code == OK:
            lost += len(set(sent) - set(stored))
        assert stored == sent, (outcome, stored)  # every event there, each once (re-sends included)
    acknowledged = sum(1 for outcome in outcomes if outcome.code == OK)
    print(summary(f"{prefix}: {acknowledged} acknowledged, {2 * acknowledged} events, {lost} lost", outcomes))
    assert lost == 0


def sqlite_path(service) -> Path:
    url = application(service.config)["args"]["ingress"]["history"]["url"]
    return Path(url[len("sqlite:///"):])


def test_kill_9_of_the_ingress_loses_no_acknowledged_event_sqlite(service, item_ids):
    prefix = "kill9-sqlite"
    outcomes = kill_9_during_record_stream(service, service.app_name, prefix, item_ids)
    store = SQLiteHistoryStore(sqlite_path(service), MAX_EVENTS_PER_USER)  # the file itself, after the crash
    try:
        assert_every_event_stored_once(store, outcomes, prefix, item_ids)
    finally:
        store.close()
    with clients_of(service, service.app_name)() as client:  # and the restarted service ranks from it
        assert client.rank(f"{prefix}-0-0").history_source == pb.HISTORY_SOURCE_STORE


# ---- a second application on the session's cluster, its history in a real redis-server ------------------------

@dataclass
class RedisApp:
    name: str
    server: RedisServer

    def store(self):
        return open_history_store(HistoryConfig(url=self.server.url(), max_events_per_user=MAX_EVENTS_PER_USER))


def redis_application(config: dict, url: str) -> dict:
    """The session's app renamed, its history in Redis, small: retrieval inside the ingress, one encoder."""
    app = copy.deepcopy(application(config))
    app["name"], app["route_prefix"] = REDIS_APP, f"/{REDIS_APP}"
    app["args"]["ingress"]["history"].update(url=url, busy_timeout_s=1.0)
    app["args"]["retrieval"]["placement"] = "ingress"
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Retrieval"]
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.25  # the cluster's 4 logical CPUs hold both apps
        if deployment.pop("autoscaling_config", None) is not None:
            deployment["num_replicas"] = 1
    return app


@pytest.fixture(scope="module")
def redis_app(service, tmp_path_factory):
    """Deployed next to the session's app through the same REST API (one Ray cluster); removed afterwards."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis-app")).start()  # AOF, appendfsync always
    app = redis_application(service.config, server.url())
    preflight({**service.config, "applications": [app]})
    both = copy.deepcopy(service.config)
    both["applications"].append(app)
    try:
        submit(both, service.dashboard_url)
        for name in (service.app_name, REDIS_APP):
            wait_until_running(service.dashboard_url, name, DEPLOY_TIMEOUT_S)
        yield RedisApp(REDIS_APP, server)
    finally:
        service.apply(service.config)  # declarative: the config without the Redis app removes it
        server.stop()


def test_kill_9_of_the_ingress_and_redis_loses_no_acknowledged_event(service, redis_app, item_ids):
    prefix = "kill9-redis"

    def kill_9_redis_and_restart():  # no shutdown save, no RDB: only what the AOF holds comes back
        redis_app.server.kill()
        redis_app.server.start()

    outcomes = kill_9_during_record_stream(service, redis_app.name, prefix, item_ids, kill_9_redis_and_restart)
    store = redis_app.store()
    try:
        assert_every_event_stored_once(store, outcomes, prefix, item_ids)
    finally:
        store.close()
    with clients_of(service, redis_app.name)() as client:
        assert client.rank(f"{prefix}-0-0").history_source == pb.HISTORY_SOURCE_STORE


# ---- 3. Redis stopped under load, then back ---------------------------------------------------------------------

OUTAGE_S = 8.0


def test_redis_stopped_rank_degrades_record_fails_loudly_and_both_recover_without_restart(
    service, redis_app, manifest, item_ids
):
    history = random_history(item_ids, manifest["behavior_names"], seed=77, length=6)
    new_client = clients_of(service, redis_app.name)
    with new_client() as client:
        client.record({"u-outage": history[:3]}, idempotency_key="outage-before")
        assert client.rank("u-outage").history_source == pb.HISTORY_SOURCE_STORE
        popular = [item.item_id for item in client.rank("u-outage-never-seen", k=10).items]  # the cold-start list
    ingress_before = {r["replica_id"] for r in running_replicas(service, redis_app.name, "RankingIngress")}

    def mixed(client: RankingClient, worker: int, sequence: int):
        if sequence % 3 == 0:
            user = f"u-outage-{worker}-{sequence}"
            return client.record({user: history[3:]}, idempotency_key=user)
        if sequence % 3 == 1:
            return client.rank("u-outage", k=10)
        return client.rank("u-outage-inline", recent_events=history, k=10)

    redis_app.server.stop()
    try:
        with ClosedLoop(new_client, mixed, LOAD_WORKERS, LOAD_MAX_S) as load:
            time.sleep(OUTAGE_S)  # Redis down throughout
    finally:
        redis_app.server.start()  # same port, same data
    outcomes = load.snapshot()
    print(summary("Redis stopped", outcomes))
    records = [o for o in outcomes if o.sequence % 3 == 0]
    stored_ranks = [o for o in outcomes if o.sequence % 3 == 1]
    inline_ranks = [o for o in outcomes if o.sequence % 3 == 2]
    assert records and stored_ranks and inline_ranks
    location = f"history_store: Redis 127.0.0.1:{redis_app.server.port}/0: "
    assert all(o.code == "UNAVAILABLE" and o.details.startswith(location) for o in records), records[:3]
    assert all(o.code == OK for o in stored_ranks + inline_ranks), [o for o in outcomes if o.code != OK][:3]
    for outcome in stored_ranks:
        assert outcome.response.history_source == pb.HISTORY_SOURCE_STORE_UNAVAILABLE
        assert [item.item_id for item in outcome.response.items] == popular
    for outcome in inline_ranks:
        assert outcome.response.history_source == pb.HISTORY_SOURCE_INLINE and len(outcome.response.items) == 10

    with new_client() as client:  # back without a restart: the very next calls reach Redis again
        assert client.rank("u-outage").history_source == pb.HISTORY_SOURCE_STORE
        for outcome in records:  # nothing refused during the outage was half-stored: each re-send stores all
            again = mixed(client, outcome.worker, outcome.sequence)
            assert not again.idempotent_replay and again.stored == again.accepted == 3
    store = redis_app.store()
    try:
        assert [e.raw_item_id for e in store.recent("u-outage", 10)] == [e.raw_item_id for e in history[:3]]
    finally:
        store.close()
    assert {r["replica_id"] for r in running_replicas(service, redis_app.name, "RankingIngress")} == ingress_before
