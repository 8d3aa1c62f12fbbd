"""Canary rollouts over real Ray Serve + gRPC, driven by `seqrank canary` against the session's cluster: the split
follows the SHA-256 of the user id computed here (sticky per user), and promote / rollback under closed-loop load
fail no request and end on the right version."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from seqrank.serving.cli import main
from seqrank.serving.history import Event
from seqrank.training.artifact import IndexParams
from seqrank.training.export import export_run
from tests.e2e.load import OK, ClosedLoop

USERS = [f"u-canary-{n}" for n in range(120)]
LOAD_WORKERS = 4


def oracle_version(user_id: str, percent: float, current: str, canary: str) -> str:
    bucket = int(hashlib.sha256(user_id.encode()).hexdigest()[:16], 16) % 10_000
    return canary if bucket < percent * 100 else current


def model_version(artifact) -> str:
    return json.loads((artifact / "manifest.json").read_text())["model_version"]


@pytest.fixture(scope="module")
def canary_artifact(tiny_run, tmp_path_factory):
    """The session's run exported again: a second model version."""
    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "canary", IndexParams(M=16, ef_construction=100,
                      ef_search=200), name="canary")


@pytest.fixture()
def restore(service):
    yield
    service.apply(service.config)  # the session's artifact, no canary, for the other tests


def canary(service, *step: str) -> None:
    assert main(["canary", "--address", service.dashboard_url, *step]) == 0


def test_each_user_gets_the_version_its_hash_picks_every_time(service, canary_artifact, item_ids, restore, capsys):
    current, new = model_version(service.artifact), model_version(canary_artifact)
    events = [Event(item_ids[i], "") for i in (3, 17, 42)]
    canary(service, "set", "35", "--artifact", str(canary_artifact))
    with service.client() as client:
        for _ in range(2):  # twice: sticky
            got = {user: client.rank(user, recent_events=events, k=5).model_version for user in USERS}
            assert got == {user: oracle_version(user, 35, current, new) for user in USERS}
    assert 0 < sum(version == new for version in got.values()) < len(USERS)
    capsys.readouterr()
    canary(service, "status")
    assert "35 % of users" in capsys.readouterr().out


def test_rollback_and_promote_under_load_fail_no_request(service, canary_artifact, item_ids, restore):
    current, new = model_version(service.artifact), model_version(canary_artifact)
    events = [Event(item_ids[i], "") for i in (5, 8, 13)]

    def call(client, worker, sequence):
        return client.rank(USERS[(worker * 31 + sequence) % len(USERS)], recent_events=events, k=5)

    canary(service, "set", "50", "--artifact", str(canary_artifact))
    with ClosedLoop(lambda: service.client(timeout_s=60.0), call, LOAD_WORKERS, max_s=300) as load:
        load.wait_until(lambda: load.count() >= 20, 60, "traffic before the rollback")
        canary(service, "rollback")
        rolled_back_at = time.monotonic()
        load.wait_until(lambda: load.count(after=rolled_back_at) >= 20, 60, "traffic after the rollback")
        canary_again_at = time.monotonic()
        canary(service, "set", "50", "--artifact", str(canary_artifact))
        load.wait_until(lambda: load.count(after=canary_again_at) >= 20, 60, "traffic on the canary again")
        canary(service, "promote")
        promoted_at = time.monotonic()
        load.wait_until(lambda: load.count(after=promoted_at) >= 20, 60, "traffic after the promotion")
    outcomes = load.snapshot()
    assert load.failures() == []
    assert {o.response.model_version for o in outcomes} == {current, new}
    after_rollback = [o for o in outcomes if rolled_back_at < o.started and o.finished < canary_again_at]
    assert after_rollback and all(o.response.model_version == current for o in after_rollback)
    after_promotion = [o for o in outcomes if o.started > promoted_at]
    assert after_promotion and all(o.response.model_version == new for o in after_promotion)
    assert all(o.code == OK for o in outcomes)


def test_canary_across_encoder_and_retrieval_deployments_under_load(service, canary_artifact, item_ids):
    """The Kubernetes topology: Serve reconfigures the ingress, Encoder and Retrieval one after another, so for a
    moment the ingress may route a user to a canary a stage does not hold yet; no request may fail for it."""
    from tests.topology import with_deployment_pools

    current, new = model_version(service.artifact), model_version(canary_artifact)
    events = [Event(item_ids[i], "") for i in (2, 9, 21)]

    def call(client, worker, sequence):
        return client.rank(USERS[(worker * 17 + sequence) % len(USERS)], recent_events=events, k=5)

    service.apply(with_deployment_pools(service.config))  # new args: Serve rebuilds the app
    try:
        with ClosedLoop(lambda: service.client(timeout_s=60.0), call, LOAD_WORKERS, max_s=300) as load:
            load.wait_until(lambda: load.count() >= 20, 60, "traffic before the canary")
            canary(service, "set", "50", "--artifact", str(canary_artifact))
            set_at = time.monotonic()
            load.wait_until(lambda: load.count(after=set_at) >= 40, 60, "traffic on the canary")
            promoting_at = time.monotonic()
            canary(service, "promote")
            promoted_at = time.monotonic()
            load.wait_until(lambda: load.count(after=promoted_at) >= 20, 60, "traffic after the promotion")
        outcomes = load.snapshot()
        assert load.failures() == []
        on_canary = [o for o in outcomes if set_at < o.started and o.finished < promoting_at]
        users = [USERS[(o.worker * 17 + o.sequence) % len(USERS)] for o in on_canary]
        assert on_canary and [o.response.model_version for o in on_canary] == [
            oracle_version(user, 50, current, new) for user in users]
        assert all(o.response.model_version == new for o in outcomes if o.started > promoted_at)
    finally:
        service.apply(service.config)
