"""Canary rollouts: which users a canary model version serves, and the Serve-config edits that start, move, promote
and roll back a canary. Pure: no Ray; `seqrank canary` (the CLI) applies the edited config with `seqrank deploy`'s
path (serving/ops/deploy.py), so every change is a hot reload in place.

A user is in the canary when the SHA-256 of their user id, read as a number, falls in the first `percent` of
CANARY_BUCKETS buckets: deterministic across replicas, restarts and languages, and monotone in the percentage (a
user in the 5 % canary stays in it at 20 %), so raising the share only adds users. Every model deployment holds
both versions (serving/reload.py `Loaded`); the ingress picks one per request (`Loaded.for_user`) and names it
downstream, and every response and metric carries the version that produced the list.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

CANARY_BUCKETS = 10_000  # percent in steps of 0.01
FULL_PERCENT = 100.0
CANARY_FIELDS = ("canary_artifact_path", "canary_percent")  # ModelUserConfig fields a canary adds


def canary_bucket(user_id: str) -> int:
    """The user's bucket in [0, CANARY_BUCKETS): the first 8 bytes of SHA-256(UTF-8 user id), big-endian, mod."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % CANARY_BUCKETS


def in_canary(user_id: str, percent: float) -> bool:
    """Whether a canary at `percent` (0..100) serves this user."""
    return canary_bucket(user_id) < percent * (CANARY_BUCKETS / FULL_PERCENT)


@dataclass(frozen=True)
class CanaryState:
    """The rollout as one model deployment's user_config says it."""

    artifact_path: str
    canary_artifact_path: str | None
    canary_percent: float

    @classmethod
    def of(cls, user_config: Mapping[str, Any]) -> CanaryState:
        return cls(str(user_config.get("artifact_path")), user_config.get("canary_artifact_path"),
                   float(user_config.get("canary_percent", 0.0)))


def _model_user_configs(config: dict, is_model_deployment) -> list[dict]:
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"applications: expected one application, got {len(apps)}")
    configs = [deployment.setdefault("user_config", {}) for deployment in apps[0].get("deployments", [])
               if is_model_deployment(deployment.get("name"))]
    if not configs:
        raise ValueError("deployments: no model deployment (RankingIngress, Encoder, Retrieval...) to edit")
    return configs


def canary_state(config: dict, is_model_deployment) -> CanaryState:
    """The rollout the config describes; ValueError when its model deployments disagree."""
    states = {CanaryState.of(user_config) for user_config in _model_user_configs(config, is_model_deployment)}
    if len(states) != 1:
        raise ValueError(f"user_config: the model deployments disagree about the rollout: {sorted(map(str, states))}")
    return states.pop()


def with_canary(config: dict, is_model_deployment, percent: float, canary_artifact_path: str | None = None) -> dict:
    """A copy serving the canary (`canary_artifact_path`, else the one already set) to `percent` of the users."""
    if not 0.0 <= percent <= FULL_PERCENT:
        raise ValueError(f"percent: must be in [0, 100], got {percent}")
    config = copy.deepcopy(config)
    for user_config in _model_user_configs(config, is_model_deployment):
        path = canary_artifact_path or user_config.get("canary_artifact_path")
        if path is None:
            raise ValueError("canary_artifact_path: no canary set yet; pass --artifact")
        user_config["canary_artifact_path"] = str(path)
        user_config["canary_percent"] = float(percent)
    return config


def promoted(config: dict, is_model_deployment) -> dict:
    """A copy serving the canary to everyone as the current version (its artifact becomes artifact_path)."""
    config = copy.deepcopy(config)
    for user_config in _model_user_configs(config, is_model_deployment):
        path = user_config.get("canary_artifact_path")
        if path is None:
            raise ValueError("canary_artifact_path: no canary to promote")
        user_config["artifact_path"] = path
        for name in CANARY_FIELDS:
            user_config.pop(name, None)
    return config


def rolled_back(config: dict, is_model_deployment) -> dict:
    """A copy without the canary: everyone on artifact_path again."""
    config = copy.deepcopy(config)
    for user_config in _model_user_configs(config, is_model_deployment):
        for name in CANARY_FIELDS:
            user_config.pop(name, None)
    return config
