"""A canary on Kubernetes is one edit of the `user_config` anchor in serve-overrides.yaml: the render carries it into
every model deployment of every serveConfigV2 patch, and refuses a share without a canary artifact."""

from __future__ import annotations

import shutil

import pytest
import yaml

from seqrank.serving.ops.k8s_render import OVERRIDES_FILE, RENDER_TARGETS, render_serve_config, stale_patches
from seqrank.serving.ops.serve_config_check import ConfigError, is_model_deployment
from tests.k8s.conftest import K8S_DIR

ANCHOR = "&artifact {artifact_path: /artifacts/v1}"


def k8s_copy(tmp_path, anchor: str):
    copied = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copied, ignore=shutil.ignore_patterns("Dockerfile*"))
    overrides = copied / "base" / OVERRIDES_FILE
    text = overrides.read_text()
    assert text.count(ANCHOR) == 1
    overrides.write_text(text.replace(ANCHOR, anchor))
    return copied


def test_the_canary_reaches_every_model_deployment_of_every_patch(tmp_path):
    anchor = "&artifact {artifact_path: /artifacts/v1, canary_artifact_path: /artifacts/v2, canary_percent: 5}"
    copied = k8s_copy(tmp_path, anchor)
    for target in RENDER_TARGETS:
        config = render_serve_config(target, k8s_dir=copied)
        deployments = [d for d in config["applications"][0]["deployments"] if is_model_deployment(d["name"])]
        assert len(deployments) >= 2, target
        assert all(d["user_config"] == {"artifact_path": "/artifacts/v1", "canary_artifact_path": "/artifacts/v2",
                                        "canary_percent": 5} for d in deployments), target
        assert "canary_percent: 5" in yaml.safe_dump(config)
    assert len(stale_patches(copied)) == len(RENDER_TARGETS)  # committed patches: no canary


def test_a_share_without_a_canary_artifact_is_refused(tmp_path):
    copied = k8s_copy(tmp_path, "&artifact {artifact_path: /artifacts/v1, canary_percent: 5}")
    with pytest.raises((ConfigError, ValueError), match="canary_percent"):
        render_serve_config(RENDER_TARGETS[0], k8s_dir=copied)
