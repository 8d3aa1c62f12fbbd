"""k8s/: base and both overlays, validated offline.

The RayService against KubeRay's CRD with closed objects (a misspelled key fails); core objects against the core/v1
schemas that CRD embeds; the rest structurally: kinds, ports, selectors, references, alert rules (promtool).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from seqrank.serving import metrics
from seqrank.serving.history import HistoryConfig
from seqrank.serving.history.redis_store import _check_redis_url
from tests.k8s.conftest import K8S_DIR, KUSTOMIZATIONS, only, validation_errors
from tests.k8s.kustomize import build

SERVE_PORTS = {"serve": 8000, "serve-grpc": 9000, "metrics": 8080}
EXPECTED_OBJECTS = {
    "base": {
        ("RayService", "seqrank"), ("PodMonitor", "seqrank-ray"), ("PrometheusRule", "seqrank-slo"),
        ("ConfigMap", "seqrank-grafana-dashboard"),
        ("NetworkPolicy", "seqrank-ray-default-deny"), ("NetworkPolicy", "seqrank-ray-allow"),
        ("NetworkPolicy", "seqrank-ray-head-allow"),
        ("PodDisruptionBudget", "seqrank-ray-cpu"), ("PodDisruptionBudget", "seqrank-ray-gpu"),
        ("Service", "seqrank-serve-grpc-headless"),
    },
}
EXPECTED_OBJECTS["overlays/prod-gpu"] = EXPECTED_OBJECTS["base"]
EXPECTED_OBJECTS["overlays/dev-cpu"] = EXPECTED_OBJECTS["base"] - {("PodDisruptionBudget", "seqrank-ray-gpu")} | {
    ("Service", "seqrank-redis"), ("StatefulSet", "seqrank-redis"), ("Secret", "seqrank-history"),
    ("Service", "seqrank-gcs-redis"), ("StatefulSet", "seqrank-gcs-redis"), ("Secret", "seqrank-gcs-redis"),
    ("PersistentVolumeClaim", "seqrank-artifacts"), ("Pod", "seqrank-artifact-loader"),
}
API_VERSIONS = {
    "RayService": "ray.io/v1", "PodMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
    "ConfigMap": "v1", "Secret": "v1", "Service": "v1", "PersistentVolumeClaim": "v1", "Pod": "v1",
    "StatefulSet": "apps/v1", "NetworkPolicy": "networking.k8s.io/v1", "PodDisruptionBudget": "policy/v1",
}
# Ray's own series the dashboard and alerts query, as exported by ray 2.60.0 (ray/serve/_private/
# request_ingress_metrics.py, deployment_state.py; ray/dashboard/modules/metrics/dashboards/default_dashboard_panels.py).
RAY_SERIES = {
    "ray_serve_num_grpc_requests_total", "ray_serve_grpc_request_latency_ms_bucket",
    "ray_serve_grpc_request_latency_ms_count",
    "ray_serve_deployment_replica_healthy", "ray_node_gpus_utilization",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Created outside the repository in production (k8s/README.md); dev creates them itself.
PROD_EXTERNAL_REFERENCES = {("Secret", "seqrank-history"), ("Secret", "seqrank-tokens"),
                            ("PersistentVolumeClaim", "seqrank-artifacts")}
# Referenced by the RayService itself (gcsFaultToleranceOptions), not by a container: test_hardening.py checks it.


def ray_groups(rayservice: dict) -> dict[str, dict]:
    """Pod templates of the head and of every worker group, by group name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in cluster.get("workerGroupSpecs", [])})
    return groups


def pod_specs(objects: list[dict]) -> list[tuple[str, dict, set[str]]]:
    """(where, pod spec, names of its volumes) for every pod the objects create."""
    specs = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayService":
            specs += [(f"{name}/{group}", spec["template"]["spec"], set()) for group, spec in ray_groups(obj).items()]
        elif obj["kind"] == "StatefulSet":
            claims = {claim["metadata"]["name"] for claim in obj["spec"].get("volumeClaimTemplates", [])}
            specs.append((name, obj["spec"]["template"]["spec"], claims))
        elif obj["kind"] == "Pod":
            specs.append((name, obj["spec"], set()))
    return [(where, spec, names | {v["name"] for v in spec.get("volumes", [])}) for where, spec, names in specs]


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_each_kustomization_renders_exactly_its_objects_with_known_api_versions(rendered, kustomization):
    objects = rendered[kustomization]
    assert {(obj["kind"], obj["metadata"]["name"]) for obj in objects} == EXPECTED_OBJECTS[kustomization]
    assert len(objects) == len(EXPECTED_OBJECTS[kustomization])  # no duplicates
    assert {obj["kind"]: obj["apiVersion"] for obj in objects}.items() <= API_VERSIONS.items()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rayservice_validates_against_the_kuberay_crds_with_unknown_keys_rejected(
    rendered, rayservice_validator, raycluster_spec_validator, kustomization
):
    rayservice = only(rendered[kustomization], "RayService")
    assert validation_errors(rayservice_validator, rayservice) == []
    # rayClusterConfig is a RayCluster spec: check it against that CRD too (the two must agree).
    assert validation_errors(raycluster_spec_validator, rayservice["spec"]["rayClusterConfig"]) == []
    assert len(rayservice["metadata"]["name"]) <= 47


def _set(obj: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    obj[last] = value


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        ("spec.upgradeStrategy.typ", "NewCluster", "'typ' was unexpected"),
        ("spec.rayClusterConfig.workerGroupSpecs.0.maxReplica", 4, "'maxReplica' was unexpected"),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always",
         "'imagePullPolicyy' was unexpected"),
        ("spec.rayClusterConfig.workerGroupSpecs.1.template.spec.tolerations.0.efect", "NoSchedule",
         "'efect' was unexpected"),
        ("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast", "'Fast' is not one of"),
        ("spec.rayClusterConfig.workerGroupSpecs.0.minReplicas", "1", "'1' is not of type 'integer'"),
        ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0, "0 is not of type 'string'"),
    ],
)
def test_a_misspelled_or_mistyped_field_is_rejected(rendered, rayservice_validator, path, value, fragment):
    rayservice = copy.deepcopy(only(rendered["overlays/prod-gpu"], "RayService"))
    _set(rayservice, path, value)
    errors = validation_errors(rayservice_validator, rayservice)
    assert len(errors) == 1 and fragment in errors[0], errors


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_objects_validate_against_the_core_schemas_embedded_in_the_crd(rendered, core_validators, kustomization):
    for obj in rendered[kustomization]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "StatefulSet":
            assert validation_errors(core_validators["pod_template"], obj["spec"]["template"]) == [], where
            for claim in obj["spec"]["volumeClaimTemplates"]:
                assert validation_errors(core_validators["pvc_spec"], claim["spec"]) == [], where
            assert set(obj["spec"]) <= {"serviceName", "replicas", "selector", "template", "volumeClaimTemplates"}
        elif obj["kind"] == "Pod":
            pod = {"metadata": obj["metadata"], "spec": obj["spec"]}
            assert validation_errors(core_validators["pod_template"], pod) == [], where
        elif obj["kind"] == "PersistentVolumeClaim":
            assert validation_errors(core_validators["pvc_spec"], obj["spec"]) == [], where
        elif obj["kind"] == "Service":
            assert validation_errors(core_validators["service"], obj) == [], where


def test_core_schema_check_rejects_a_misspelled_container_field(rendered, core_validators):
    statefulset = copy.deepcopy(only(rendered["overlays/dev-cpu"], "StatefulSet", "seqrank-redis"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    errors = validation_errors(core_validators["pod_template"], statefulset["spec"]["template"])
    assert len(errors) == 1 and "'readinesProbe' was unexpected" in errors[0]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_ray_group_exposes_serve_grpc_and_metrics_on_the_ports_the_serve_config_uses(rendered, kustomization):
    rayservice = only(rendered[kustomization], "RayService")
    serve_config = serve_config_of(rayservice)
    assert serve_config["http_options"]["port"] == SERVE_PORTS["serve"]
    assert serve_config["grpc_options"]["port"] == SERVE_PORTS["serve-grpc"]
    for group, spec in ray_groups(rayservice).items():
        (container,) = spec["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert {name: ports.get(name) for name in SERVE_PORTS} == SERVE_PORTS, group


def test_gpu_group_only_in_prod_with_gpu_limits_tolerations_and_node_selector(rendered):
    prod = only(rendered["overlays/prod-gpu"], "RayService")["spec"]["rayClusterConfig"]
    dev = only(rendered["overlays/dev-cpu"], "RayService")["spec"]["rayClusterConfig"]
    for cluster in (prod, dev):
        assert cluster["enableInTreeAutoscaling"] is True
    assert [group["groupName"] for group in prod["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert [group["groupName"] for group in dev["workerGroupSpecs"]] == ["cpu"]
    assert "nvidia.com/gpu" not in json.dumps(dev)
    gpu = prod["workerGroupSpecs"][1]
    spec = gpu["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    cpu_group = prod["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in json.dumps(cpu_group)
    assert "tolerations" not in cpu_group["template"]["spec"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_blue_green_upgrade_and_the_head_out_of_the_serve_service(rendered, kustomization):
    spec = only(rendered[kustomization], "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}  # the incremental upgrade routes HTTP only, not gRPC
    assert spec["excludeHeadPodFromServeSvc"] is True
    assert spec["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_podmonitor_selects_every_ray_pod_by_its_metrics_port_and_nothing_else(rendered, kustomization):
    objects = rendered[kustomization]
    monitor = only(objects, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for group, spec in ray_groups(only(objects, "RayService")).items():
        assert selector.items() <= spec["template"]["metadata"]["labels"].items(), group
    for obj in objects:
        if obj["kind"] in ("StatefulSet", "Pod"):
            labels = (obj["spec"]["template"]["metadata"] if obj["kind"] == "StatefulSet" else obj["metadata"])["labels"]
            assert not selector.items() <= labels.items(), f"{obj['kind']}/{obj['metadata']['name']} would be scraped"


def test_dev_redis_service_statefulset_and_secret_agree(rendered):
    objects = rendered["overlays/dev-cpu"]
    service, statefulset = only(objects, "Service", "seqrank-redis"), only(objects, "StatefulSet", "seqrank-redis")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in container_ports
    # Durability as serving/history/redis_store.py documents it: AOF fsynced before each reply.
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"
    url = only(objects, "Secret", "seqrank-history")["stringData"]["url"]
    _check_redis_url(url)
    HistoryConfig(url=url)
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == (service["metadata"]["name"], service_port["port"])


@pytest.mark.parametrize("kustomization", ["overlays/dev-cpu", "overlays/prod-gpu"])
def test_every_secret_and_volume_claim_a_pod_uses_exists_or_is_documented_as_external(rendered, kustomization):
    objects = rendered[kustomization]
    present = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    referenced = set()
    for where, spec, volume_names in pod_specs(objects):
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                referenced.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for container in spec["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    referenced.add(("Secret", env["valueFrom"]["secretKeyRef"]["name"]))
            assert {mount["name"] for mount in container.get("volumeMounts", [])} <= volume_names, where
    missing = referenced - present
    assert missing == (PROD_EXTERNAL_REFERENCES if kustomization == "overlays/prod-gpu" else set())


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_ray_pod_reads_the_history_url_from_the_secret(rendered, kustomization):
    for where, spec, _ in pod_specs([only(rendered[kustomization], "RayService")]):
        (container,) = spec["containers"]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        assert env["SEQRANK_HISTORY_URL"]["valueFrom"]["secretKeyRef"] == {"name": "seqrank-history", "key": "url"}, where


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_ray_pod_caps_grpc_messages_at_the_serve_config_limit(rendered, kustomization):
    from seqrank.serving.config import AppArgs

    rayservice = only(rendered[kustomization], "RayService")
    limit = AppArgs.parse(serve_config_of(rayservice)["applications"][0]["args"]).local.grpc_max_message_bytes
    for where, spec, _ in pod_specs([rayservice]):
        (container,) = spec["containers"]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == str(limit), where


def test_prod_requires_bearer_tokens_from_their_secret_and_dev_leaves_auth_off(rendered):
    prod = only(rendered["overlays/prod-gpu"], "RayService")
    assert serve_config_of(prod)["applications"][0]["args"]["ingress"]["auth"] == {"tokens": "env:SEQRANK_TOKENS"}
    for where, spec, _ in pod_specs([prod]):
        (container,) = spec["containers"]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        assert env["SEQRANK_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "seqrank-tokens", "key": "tokens"}, where
    dev = only(rendered["overlays/dev-cpu"], "RayService")
    assert serve_config_of(dev)["applications"][0]["args"]["ingress"]["auth"] == {"tokens": ""}


def test_prometheus_rules_pass_promtool(rendered, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; scripts/setup.sh does it)")
    rules = only(rendered["base"], "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"] if "alert" in rule}
    assert {"SeqrankRankLatencyP99High", "SeqrankErrorRatioHigh", "SeqrankNoHealthyReplicas"} <= alerts


def _queried_series(expressions: list[str]) -> set[str]:
    """Metric names in PromQL selectors (`name{...}`), recording-rule names excluded."""
    return {name for expr in expressions for name in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\{", expr)
            if not name.startswith("seqrank:")}


def _seqrank_series() -> set[str]:
    """Every series serving/metrics.py exports, by its Prometheus name."""
    series = set()
    for spec in metrics.ALL_METRICS:
        base = metrics.RAY_PREFIX + spec.name
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": HISTOGRAM_SUFFIXES}[spec.kind]
        series |= {base + suffix for suffix in suffixes}
    return series


def test_dashboard_and_alerts_query_only_series_that_exist(rendered):
    objects = rendered["base"]
    dashboard = json.loads(only(objects, "ConfigMap", "seqrank-grafana-dashboard")["data"]["seqrank.json"])
    panel_exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variable_exprs = [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    rules = only(objects, "PrometheusRule")["spec"]["groups"]
    rule_exprs = [rule["expr"] for group in rules for rule in group["rules"]]
    queried = _queried_series(panel_exprs + variable_exprs + rule_exprs)
    assert queried - RAY_SERIES - _seqrank_series() == set()
    assert {"ray_seqrank_stage_latency_ms_bucket", "ray_seqrank_model_info"} <= queried


def test_grafana_dashboard_is_valid_json_with_unique_panel_ids(rendered):
    dashboard = json.loads(only(rendered["base"], "ConfigMap", "seqrank-grafana-dashboard")["data"]["seqrank.json"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(panel["targets"] for panel in dashboard["panels"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_python_renderer_agrees_with_kubectl_kustomize(kustomization):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Python renderer alone is used (tests/k8s/kustomize.py)")
    result = subprocess.run([kubectl, "kustomize", str(K8S_DIR / kustomization)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    by_key = lambda objects: {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}  # noqa: E731
    assert by_key(build(K8S_DIR / kustomization)) == by_key(yaml.safe_load_all(result.stdout))
