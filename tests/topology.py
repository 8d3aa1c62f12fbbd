"""The Kubernetes topology on a local Serve config: the encoder and retrieval in deployments of their own, with the
entries of k8s/base/serve-overrides.yaml. Locally both run inside the ingress (serving/serve_config.yaml); tests of
what only those deployments have (an Encoder replica to kill or to call, shards, the pools' options) use this."""

from __future__ import annotations

import copy

import yaml

from seqrank.serving.ops.k8s_render import OVERRIDES_FILE
from seqrank.serving.ops.serve_config_check import (
    ENCODER_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    RETRIEVAL_DEPLOYMENT,
    application,
)
from tests.k8s.conftest import K8S_DIR

POOLS = (ENCODER_DEPLOYMENT, RETRIEVAL_DEPLOYMENT)


def with_deployment_pools(config: dict) -> dict:
    """A copy of `config` with `placement: deployment` for encoder and retrieval, their deployment entries and the
    ingress's CPUs as on Kubernetes, and every added entry's user_config the ingress's (the same artifact)."""
    overrides = yaml.safe_load((K8S_DIR / "base" / OVERRIDES_FILE).read_text())
    (override_app,) = overrides["applications"]
    entries = {entry["name"]: entry for entry in override_app["deployments"]}
    config = copy.deepcopy(config)
    app = application(config)
    for stage in ("encoder", "retrieval"):
        app["args"].setdefault(stage, {})["placement"] = "deployment"
    (ingress,) = [d for d in app["deployments"] if d["name"] == INGRESS_DEPLOYMENT]
    ingress["ray_actor_options"] = copy.deepcopy(entries[INGRESS_DEPLOYMENT]["ray_actor_options"])
    for name in POOLS:
        entry = {**copy.deepcopy(entries[name]), "user_config": copy.deepcopy(ingress["user_config"])}
        app["deployments"].append(entry)
    return config
