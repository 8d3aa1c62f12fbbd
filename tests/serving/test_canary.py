"""Canary routing and rollouts without Ray: the user split against a hash computed here, stickiness, the split
fraction within binomial bounds, the ModelSlot holding current + canary (+ the version last dropped), and the
Serve-config edits `seqrank canary` applies."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest

from seqrank.serving.canary import canary_state, in_canary, promoted, rolled_back, with_canary
from seqrank.serving.config import ModelUserConfig
from seqrank.serving.ops.serve_config_check import is_model_deployment
from seqrank.serving.reload import ModelSlot, VersionUnavailable


def oracle_in_canary(user_id: str, percent: float) -> bool:
    """The documented rule: SHA-256 of the UTF-8 user id, first 8 bytes big-endian, mod 10000, < percent * 100."""
    bucket = int(hashlib.sha256(user_id.encode()).hexdigest()[:16], 16) % 10_000
    return bucket < percent * 100


USERS = [f"user-{n}" for n in range(20_000)] + ["", "é", "🙂" * 10, "a" * 128]


@pytest.mark.parametrize("percent", [0.0, 0.01, 5.0, 12.5, 50.0, 99.99, 100.0])
def test_split_is_the_documented_hash_and_within_binomial_bounds(percent):
    chosen = [in_canary(user, percent) for user in USERS]
    assert chosen == [oracle_in_canary(user, percent) for user in USERS]
    n, p = len(USERS), percent / 100
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(sum(chosen) - n * p) <= 5 * sigma + 1  # 5 sigma: never flaky for a fixed user list


def test_a_user_stays_on_one_version_and_raising_the_share_only_adds_users():
    for user in USERS[:2000]:
        assert len({in_canary(user, 30.0) for _ in range(3)}) == 1
    small = {user for user in USERS if in_canary(user, 5.0)}
    large = {user for user in USERS if in_canary(user, 20.0)}
    assert small < large


@dataclass(frozen=True)
class Model:
    model_version: str


def test_slot_serves_current_and_canary_and_keeps_the_version_it_drops(artifacts):
    builds = []
    slot = ModelSlot("test", lambda artifact: builds.append(artifact.model_version) or Model(artifact.model_version))
    slot.reload({"artifact_path": artifacts["v1"]})
    slot.reload({"artifact_path": artifacts["v1"], "canary_artifact_path": artifacts["v2"], "canary_percent": 30})
    loaded = slot.loaded
    assert loaded.versions == ("v1", "v2") and loaded.canary_percent == 30
    for user in USERS[:500]:
        assert loaded.for_user(user).model_version == ("v2" if oracle_in_canary(user, 30) else "v1")
    assert slot.resolve("v2").model_version == "v2"
    slot.reload({"artifact_path": artifacts["v1"], "canary_artifact_path": artifacts["v2"], "canary_percent": 60})
    assert builds == ["v1", "v2"]  # a new percentage loads nothing
    # promote: v2 current, v1 kept for requests in flight
    slot.reload({"artifact_path": artifacts["v2"]})
    assert slot.loaded.versions == ("v2", "v1") and slot.loaded.canary is None and builds == ["v1", "v2"]
    # a canary rolled back: the dropped canary stays resolvable
    slot.reload({"artifact_path": artifacts["v2"], "canary_artifact_path": artifacts["v3"], "canary_percent": 10})
    slot.reload({"artifact_path": artifacts["v2"]})
    assert slot.loaded.versions == ("v2", "v3") and slot.resolve("v3").model_version == "v3"
    with pytest.raises(VersionUnavailable):
        slot.resolve("v1")


def test_canary_percent_needs_a_canary_artifact():
    with pytest.raises(ValueError, match="canary_percent"):
        ModelUserConfig.parse({"artifact_path": "/a", "canary_percent": 5})
    with pytest.raises(ValueError, match="canary_percent"):
        ModelUserConfig.parse({"artifact_path": "/a", "canary_artifact_path": "/b", "canary_percent": 100.5})


def serve_config() -> dict:
    return {"applications": [{"name": "seqrank", "deployments": [
        {"name": "RankingIngress", "user_config": {"artifact_path": "/v1"}},
        {"name": "Encoder", "user_config": {"artifact_path": "/v1"}},
        {"name": "Other", "user_config": {"x": 1}}]}]}


def test_config_edits_set_promote_and_roll_back_every_model_deployment():
    config = serve_config()
    canary = with_canary(config, is_model_deployment, 25, "/v2")
    assert config == serve_config()  # a copy
    deployments = canary["applications"][0]["deployments"]
    assert [d["user_config"] for d in deployments[:2]] == [
        {"artifact_path": "/v1", "canary_artifact_path": "/v2", "canary_percent": 25.0}] * 2
    assert deployments[2]["user_config"] == {"x": 1}
    assert canary_state(canary, is_model_deployment).canary_percent == 25.0
    moved = with_canary(canary, is_model_deployment, 100)
    assert canary_state(moved, is_model_deployment).canary_artifact_path == "/v2"
    done = promoted(moved, is_model_deployment)
    assert [d["user_config"] for d in done["applications"][0]["deployments"][:2]] == [{"artifact_path": "/v2"}] * 2
    back = rolled_back(moved, is_model_deployment)
    assert [d["user_config"] for d in back["applications"][0]["deployments"][:2]] == [{"artifact_path": "/v1"}] * 2
    with pytest.raises(ValueError, match="no canary"):
        promoted(serve_config(), is_model_deployment)
    with pytest.raises(ValueError, match="percent"):
        with_canary(config, is_model_deployment, 101, "/v2")
