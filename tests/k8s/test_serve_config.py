"""serveConfigV2: one source (serving/serve_config.yaml + overrides), no drift, and a strict key check.

Ray's ServeDeploySchema ignores unknown keys, so a misspelled `max_ongoing_request` would deploy with the default
without a word; `seqrank.serving.ops.k8s_render.check_serve_config` rejects it.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from seqrank.serving.ops import k8s_render
from seqrank.serving.ops.k8s_render import RENDER_TARGETS, SERVE_CONFIG, merge_overrides
from seqrank.serving.ops.serve_config_check import check_serve_config, unknown_keys
from tests.k8s.conftest import K8S_DIR, only


@pytest.fixture(scope="module")
def local_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def pool_config() -> dict:
    """The base Kubernetes config: it has the autoscaled Encoder pool, which the local config runs in the ingress."""
    (base,) = [target for target in RENDER_TARGETS if target.directory == "base"]
    return k8s_render.render_serve_config(base, k8s_dir=K8S_DIR)


def test_committed_serve_config_v2_patches_match_a_fresh_render():
    stale = k8s_render.stale_patches(K8S_DIR)
    assert not stale, f"stale {sorted(str(path) for path in stale)}: run `python -m serving.k8s_render`"


@pytest.mark.parametrize("kustomization, target", [("base", "base"), ("overlays/dev-cpu", "base"),
                                                   ("overlays/prod-gpu", "overlays/prod-gpu")])
def test_each_rendered_rayservice_carries_the_serve_config_of_its_target(rendered, kustomization, target):
    (render_target,) = [t for t in RENDER_TARGETS if t.directory == target]
    serve_config_v2 = yaml.safe_load(only(rendered[kustomization], "RayService")["spec"]["serveConfigV2"])
    assert serve_config_v2 == k8s_render.render_serve_config(render_target, k8s_dir=K8S_DIR)
    check_serve_config(serve_config_v2)


def test_the_local_serve_config_passes_the_strict_check(local_config):
    check_serve_config(local_config)


def test_overrides_change_only_what_they_name(local_config):
    """The Kubernetes configs differ from the local one only at the paths the override files list."""

    def leaves(value, where=""):
        if isinstance(value, dict):
            return {leaf for key, item in value.items() for leaf in leaves(item, f"{where}.{key}")}
        if isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value):
            return {leaf for item in value for leaf in leaves(item, f"{where}[{item['name']}]")}
        return {(where, yaml.safe_dump(value))}

    for target in RENDER_TARGETS:
        changed = leaves(k8s_render.render_serve_config(target, k8s_dir=K8S_DIR)) - leaves(local_config)
        overridden = set()
        for directory in target.override_dirs:
            overrides = yaml.safe_load((K8S_DIR / directory / k8s_render.OVERRIDES_FILE).read_text())
            overridden |= {where for where, _ in leaves(overrides)}
        assert {where for where, _ in changed} <= overridden, target.directory


def _deployment_index(config: dict, key: str) -> int:
    """Index of the first deployment of the first application that sets `key`."""
    return next(i for i, deployment in enumerate(config["applications"][0]["deployments"]) if key in deployment)


def _misspell(config: dict, path: tuple, key: str) -> dict:
    broken = copy.deepcopy(config)
    node = broken
    for part in path:
        node = node[part]
    node[key] = 1
    return broken


@pytest.mark.parametrize(
    "path, key, reported",
    [
        ((), "grpc_option", "serve_config.grpc_option: unknown key for ServeDeploySchema"),
        (("grpc_options",), "request_timeout", "serve_config.grpc_options.request_timeout: unknown key for "
                                               "gRPCOptionsSchema"),
        (("applications", 0), "import_pth", "serve_config.applications[0].import_pth: unknown key for "
                                            "ServeApplicationSchema"),
        (("applications", 0, "deployments", "D"), "max_ongoing_request",
         "serve_config.applications[0].deployments[D].max_ongoing_request: unknown key for DeploymentSchema"),
        (("applications", 0, "deployments", "D", "autoscaling_config"), "target_ongoing_request",
         "serve_config.applications[0].deployments[D].autoscaling_config.target_ongoing_request: unknown key for "
         "AutoscalingConfig"),
        (("applications", 0, "deployments", "D", "ray_actor_options"), "num_gpu",
         "serve_config.applications[0].deployments[D].ray_actor_options.num_gpu: unknown key for "
         "RayActorOptionsSchema"),
    ],
)
def test_a_misspelled_key_at_any_depth_is_reported_although_ray_accepts_it(pool_config, path, key, reported):
    index = _deployment_index(pool_config, "autoscaling_config")  # it also has ray_actor_options
    path = tuple(index if part == "D" else part for part in path)
    reported = reported.replace("deployments[D]", f"deployments[{index}]")
    broken = _misspell(pool_config, path, key)
    ServeDeploySchema.model_validate(broken)  # Ray's own schema lets it through: the reason for the strict check
    problems = unknown_keys(broken, ServeDeploySchema, "serve_config")
    assert len(problems) == 1 and problems[0].startswith(reported), problems
    with pytest.raises(ValueError, match="unknown keys in the Serve config"):
        check_serve_config(broken)


def test_autoscaling_values_are_checked_too(pool_config):
    config = copy.deepcopy(pool_config)
    index = _deployment_index(config, "autoscaling_config")
    config["applications"][0]["deployments"][index]["autoscaling_config"] = {"min_replicas": 3, "max_replicas": 1}
    with pytest.raises(ValueError, match="max_replicas"):
        check_serve_config(config)


@pytest.mark.parametrize(
    "where, key, fragment",
    [
        (("args", "ingress", "history"), "urll", "urll"),  # a dataclass section of AppArgs
        (("args", "encoder"), "max_batch", "max_batch"),
        (("deployments", "D", "user_config"), "artifact_pth", "artifact_pth"),
    ],
)
def test_the_apps_own_args_and_user_config_are_checked_strictly(local_config, where, key, fragment):
    config = copy.deepcopy(local_config)
    index = _deployment_index(config, "user_config")
    node = config["applications"][0]
    for part in where:
        node = node[index if part == "D" else part]
    node[key] = 1
    with pytest.raises(ValueError, match=fragment):  # pydantic's ValidationError is a ValueError
        check_serve_config(config)


def test_an_override_naming_a_deployment_the_topology_does_not_bind_fails_loudly(tmp_path):
    """Overrides may add deployments (Kubernetes adds the Encoder and Retrieval pools), so a misspelled name is
    caught by the topology check of the render."""
    overrides = yaml.safe_load((K8S_DIR / "base" / k8s_render.OVERRIDES_FILE).read_text())
    overrides["applications"][0]["deployments"].append({"name": "Encodr", "num_replicas": 2})
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / k8s_render.OVERRIDES_FILE).write_text(yaml.safe_dump(overrides))
    (base,) = [target for target in RENDER_TARGETS if target.directory == "base"]
    with pytest.raises(ValueError, match=r"base: deployments\[Encodr\]: not part of the app"):
        k8s_render.render_serve_config(base, k8s_dir=tmp_path)


def test_kubernetes_runs_the_encoder_and_retrieval_pools_and_prod_gives_the_encoder_a_gpu(local_config):
    """Locally the stages run inside the ingress (fewest hops on a small machine); every Kubernetes target keeps
    the Encoder pool (autoscaled, on the GPU in prod) and the Retrieval deployment (needed for sharding)."""
    local_args = local_config["applications"][0]["args"]
    assert (local_args["encoder"]["placement"], local_args["retrieval"]["placement"]) == ("ingress", "ingress")
    for target in RENDER_TARGETS:
        (app,) = k8s_render.render_serve_config(target, k8s_dir=K8S_DIR)["applications"]
        assert app["args"]["encoder"]["placement"] == app["args"]["retrieval"]["placement"] == "deployment"
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == {"RankingIngress", "Encoder", "Retrieval"}, target.directory
        assert deployments["Encoder"]["autoscaling_config"]["max_replicas"] > 1
        expected_gpus = 1 if target.directory == "overlays/prod-gpu" else 0
        assert deployments["Encoder"]["ray_actor_options"]["num_gpus"] == expected_gpus, target.directory


def test_merge_overrides_merges_maps_and_named_lists_and_replaces_other_lists():
    config = {"a": {"b": 1, "c": [1, 2]}, "apps": [{"name": "x", "v": 1, "w": 2}, {"name": "y", "v": 3}]}
    overrides = {"a": {"c": [3]}, "apps": [{"name": "y", "v": 4}, {"name": "z", "v": 5}]}
    assert merge_overrides(config, overrides) == {
        "a": {"b": 1, "c": [3]}, "apps": [{"name": "x", "v": 1, "w": 2}, {"name": "y", "v": 4}, {"name": "z", "v": 5}]
    }
