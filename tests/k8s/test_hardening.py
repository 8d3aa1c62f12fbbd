"""k8s/ hardening, checked on every built kustomization: pod security, NetworkPolicy, PDBs, GCS fault tolerance,
Ray token auth, production replicas and images by digest (k8s/README.md "Hardening").

Each check is a function returning a list of problems; the negative tests remove one property from the built
manifests in memory and assert that the check reports it, so no check can pass vacuously.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import yaml

from tests.k8s.conftest import K8S_DIR, KUSTOMIZATIONS, only
from tests.k8s.kustomize import build

RAY_POD_LABELS = {"app.kubernetes.io/name": "seqrank"}
RAY_WRITABLE_DIRS = ("/tmp/ray", "/tmp", "/home/ray")  # Ray's session dir, tempfile, $HOME caches (uid 1000)
AUTOSCALER_LOG_VOLUME = "ray-logs"  # KubeRay mounts the volume of this name at /tmp/ray in the autoscaler sidecar
CLIENT_LABEL = {"seqrank.io/client": "true"}
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
HA_DEPLOYMENTS = ("RankingIngress", "Encoder", "Retrieval")
DIGEST = re.compile(r"^[^@:]+(:\d+)?(/[^@:]+)*@sha256:[0-9a-f]{64}$")
CONTAINER_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


# ---- where pods and containers are -------------------------------------------------------------------------------

def ray_groups(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]} | {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}


def pods(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod labels, pod spec) for every pod template the objects carry."""
    found = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayService":
            found += [(f"{name}/{group}", spec["template"]["metadata"].get("labels", {}), spec["template"]["spec"])
                      for group, spec in ray_groups(obj).items()]
        elif obj["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            template = obj["spec"]["template"]
            found.append((name, template["metadata"].get("labels", {}), template["spec"]))
        elif obj["kind"] == "Pod":
            found.append((name, obj["metadata"].get("labels", {}), obj["spec"]))
    return found


def containers(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, container, its pod spec) for every container and init container, plus KubeRay's autoscaler sidecar."""
    found = []
    for where, _, spec in pods(objects):
        for field in ("initContainers", "containers"):
            found += [(f"{where}/{field}/{c.get('name')}", c, spec) for c in spec.get(field, [])]
    for obj in objects:
        cluster = obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else None
        if cluster and cluster.get("enableInTreeAutoscaling"):
            sidecar = cluster.get("autoscalerOptions", {})
            found.append((f"RayService/{obj['metadata']['name']}/autoscaler", sidecar,
                          cluster["headGroupSpec"]["template"]["spec"]))
    return found


# ---- checks ------------------------------------------------------------------------------------------------------

def pod_security_problems(objects: list[dict]) -> list[str]:
    """Every pod: non-root uid 1000, fsGroup, RuntimeDefault seccomp; every container: CONTAINER_SECURITY, drop ALL."""
    problems = []
    for where, _, spec in pods(objects):
        pod = spec.get("securityContext", {})
        for key, expected in (("runAsNonRoot", True), ("runAsUser", 1000), ("seccompProfile", {"type": "RuntimeDefault"})):
            if pod.get(key) != expected:
                problems.append(f"{where}: pod securityContext.{key} is {pod.get(key)!r}, not {expected!r}")
        if not isinstance(pod.get("fsGroup"), int):
            problems.append(f"{where}: pod securityContext.fsGroup missing")
    for where, container, _ in containers(objects):
        context = container.get("securityContext", {})
        for key, expected in CONTAINER_SECURITY.items():
            if context.get(key) != expected:
                problems.append(f"{where}: securityContext.{key} is {context.get(key)!r}, not {expected!r}")
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
            problems.append(f"{where}: securityContext.capabilities must drop [ALL] and add nothing")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
    return problems


def writable_dir_problems(objects: list[dict]) -> list[str]:
    """Ray containers have a read-only root: /tmp/ray, /tmp and $HOME must be emptyDir mounts."""
    problems = []
    for obj in objects:
        if obj["kind"] != "RayService":
            continue
        for group, spec in ray_groups(obj).items():
            pod = spec["template"]["spec"]
            empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                for path in RAY_WRITABLE_DIRS:
                    if mounts.get(path) not in empty_dirs:
                        problems.append(f"{group}/{container['name']}: {path} is not an emptyDir mount")
                if mounts.get("/tmp/ray") != AUTOSCALER_LOG_VOLUME:
                    problems.append(f"{group}/{container['name']}: /tmp/ray must be volume {AUTOSCALER_LOG_VOLUME!r}")
        sidecar_mounts = {m["mountPath"] for m in obj["spec"]["rayClusterConfig"].get("autoscalerOptions", {})
                          .get("volumeMounts", [])}
        if "/tmp" not in sidecar_mounts:
            problems.append("autoscaler: /tmp is not mounted (KubeRay adds only /tmp/ray)")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(port.get("protocol", "TCP"), port["port"]) for port in rule.get("ports", [])}


def network_policy_problems(objects: list[dict]) -> list[str]:
    """A default-deny policy over every Ray pod, and the allows listed in k8s/README.md "Hardening"."""
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    ray_labels = [labels for where, labels, _ in pods(objects) if where.startswith("RayService/")]
    problems = []
    deny = [p for p in policies if p["spec"]["podSelector"] == {"matchLabels": RAY_POD_LABELS}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        problems.append("no default-deny NetworkPolicy (Ingress and Egress, no rules) over the Ray pods")
    if not all(_selects(p["spec"]["podSelector"], labels) for p in deny for labels in ray_labels):
        problems.append("the default-deny NetworkPolicy misses a Ray pod")
    allow = [p for p in policies if p["spec"]["podSelector"] == {"matchLabels": RAY_POD_LABELS} and p not in deny]
    ingress = [rule for p in allow for rule in p["spec"].get("ingress", [])]
    egress = [rule for p in allow for rule in p["spec"].get("egress", [])]

    def peers(rule: dict, kind: str) -> list[dict]:
        return [peer[kind] for peer in rule.get("from", rule.get("to", [])) if set(peer) == {kind}]

    if not any(_ports(r) == {("TCP", 9000)} and {"matchLabels": CLIENT_LABEL} in peers(r, "podSelector")
               for r in ingress):
        problems.append("no ingress to 9000 from pods labelled seqrank.io/client=true")
    if not any(_ports(r) == {("TCP", 9000)} and peers(r, "namespaceSelector") for r in ingress):
        problems.append("no ingress to 9000 from the mesh/gateway namespace")
    if not any(_ports(r) == {("TCP", 8080)} and {"matchLabels": MONITORING_NAMESPACE} in peers(r, "namespaceSelector")
               for r in ingress):
        problems.append("no ingress to the metrics port 8080 from the monitoring namespace")
    if not any(not r.get("ports") and {"matchLabels": RAY_POD_LABELS} in peers(r, "podSelector") for r in ingress):
        problems.append("no ingress between the Ray pods")
    if not any(not r.get("ports") and {"matchLabels": RAY_POD_LABELS} in peers(r, "podSelector") for r in egress):
        problems.append("no egress between the Ray pods")
    if not any({("UDP", 53), ("TCP", 53)} <= _ports(r) for r in egress):
        problems.append("no DNS egress (UDP and TCP 53)")
    redis_rules = [r for r in egress if ("TCP", 6379) in _ports(r)]
    redis_names = {name for r in redis_rules for selector in peers(r, "podSelector")
                   for expression in selector.get("matchExpressions", []) for name in expression["values"]}
    if not {"seqrank-redis", "seqrank-gcs-redis"} <= redis_names:
        problems.append("no egress to the Redis pods (history store and GCS)")
    for p in policies:
        if any(r.get("from") == [] or r.get("to") == [] for r in p["spec"].get("ingress", []) + p["spec"].get("egress", [])):
            problems.append(f"NetworkPolicy/{p['metadata']['name']}: an empty from/to allows everything")
        if any(not r.get("from") for r in p["spec"].get("ingress", [])):
            problems.append(f"NetworkPolicy/{p['metadata']['name']}: an ingress rule without `from` allows everyone")
    return problems


def pdb_problems(objects: list[dict]) -> list[str]:
    """One PodDisruptionBudget per worker group, by KubeRay's labels, maxUnavailable 1 (never blocks scale-down)."""
    budgets = [obj for obj in objects if obj["kind"] == "PodDisruptionBudget"]
    groups = {}
    for obj in objects:
        if obj["kind"] == "RayService":
            groups |= {name: spec for name, spec in ray_groups(obj).items() if name != "head"}
    problems = []
    for name, spec in groups.items():
        # The labels a pod of this group carries: ours from the template, KubeRay's own.
        labels = spec["template"]["metadata"]["labels"] | {"ray.io/group": name, "ray.io/node-type": "worker",
                                                           "ray.io/cluster": "seqrank-generated"}
        mine = [b for b in budgets if b["spec"]["selector"].get("matchLabels", {}).get("ray.io/group") == name]
        if len(mine) != 1:
            problems.append(f"worker group {name}: {len(mine)} PodDisruptionBudgets, not 1")
            continue
        budget = mine[0]["spec"]
        selector = budget["selector"]
        if not selector["matchLabels"].items() <= labels.items():
            problems.append(f"worker group {name}: the PDB selector does not match its pods")
        for expression in selector.get("matchExpressions", []):
            if expression != {"key": "ray.io/cluster", "operator": "Exists"}:
                problems.append(f"worker group {name}: unexpected PDB expression {expression}")
        if budget.get("maxUnavailable") != 1 or "minAvailable" in budget:
            problems.append(f"worker group {name}: PDB must say maxUnavailable: 1 (and no minAvailable)")
    for budget in budgets:
        if budget["spec"]["selector"].get("matchLabels", {}).get("ray.io/group") not in groups:
            problems.append(f"PodDisruptionBudget/{budget['metadata']['name']}: no such worker group")
    return problems


def cluster_problems(objects: list[dict]) -> list[str]:
    """GCS fault tolerance on a Redis of its own, password from a Secret; Ray token authentication."""
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    problems = []
    options = cluster.get("gcsFaultToleranceOptions")
    if not options or not options.get("redisAddress"):
        return problems + ["no gcsFaultToleranceOptions.redisAddress"] + _auth_problems(cluster)
    password = options.get("redisPassword", {})
    reference = password.get("valueFrom", {}).get("secretKeyRef", {})
    if "value" in password or not reference.get("name") or not reference.get("key"):
        problems.append("gcsFaultToleranceOptions.redisPassword must come from a Secret (valueFrom.secretKeyRef)")
    if reference.get("name") == "seqrank-history":
        problems.append("the GCS Redis password comes from the history store's Secret")
    history = [obj for obj in objects if obj["kind"] == "Secret" and obj["metadata"]["name"] == "seqrank-history"]
    gcs_host = options["redisAddress"].rpartition(":")[0]
    if history and urlsplit(history[0]["stringData"]["url"]).hostname == gcs_host:
        problems.append("the GCS Redis is the history store's Redis")
    return problems + _auth_problems(cluster)


def _auth_problems(cluster: dict) -> list[str]:
    return [] if cluster.get("authOptions", {}).get("mode") == "token" else ["authOptions.mode is not token"]


def prod_problems(objects: list[dict]) -> list[str]:
    """Two replicas or more, one per node, of every deployment on the request path; groups sized for them; digests."""
    rayservice = only(objects, "RayService")
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    deployments = {d["name"]: d for d in application["deployments"]}
    groups = ray_groups(rayservice)
    problems = []
    minimum = {}
    for name in HA_DEPLOYMENTS:
        deployment = deployments.get(name, {})
        minimum[name] = deployment.get("autoscaling_config", {}).get("min_replicas", deployment.get("num_replicas", 1))
        if minimum[name] < 2:
            problems.append(f"{name}: at least 2 replicas, found {minimum[name]}")
        if deployment.get("max_replicas_per_node") != 1:
            problems.append(f"{name}: max_replicas_per_node is {deployment.get('max_replicas_per_node')!r}, not 1")
    if groups["gpu"]["minReplicas"] < minimum["Encoder"]:
        problems.append(f"gpu group minReplicas {groups['gpu']['minReplicas']} < Encoder min_replicas")
    if groups["cpu"]["minReplicas"] < max(minimum["RankingIngress"], minimum["Retrieval"]):
        problems.append(f"cpu group minReplicas {groups['cpu']['minReplicas']} < the ingress/retrieval replicas")
    for where, container, _ in containers(objects):
        image = container.get("image")
        if image is not None and not DIGEST.match(image):
            problems.append(f"{where}: image {image!r} is not pinned by digest")
    return problems


CHECKS: dict[str, Callable[[list[dict]], list[str]]] = {
    "pod_security": pod_security_problems, "writable_dirs": writable_dir_problems,
    "network_policy": network_policy_problems, "pdb": pdb_problems, "cluster": cluster_problems,
}


def all_problems(objects: list[dict], kustomization: str) -> list[str]:
    checks = list(CHECKS.values()) + ([prod_problems] if kustomization == "overlays/prod-gpu" else [])
    return [problem for check in checks for problem in check(objects)]


# ---- every kustomization passes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_is_hardened(rendered, kustomization, check):
    assert CHECKS[check](rendered[kustomization]) == []


def test_prod_runs_two_replicas_per_deployment_one_per_node_and_images_by_digest(rendered):
    objects = rendered["overlays/prod-gpu"]
    assert prod_problems(objects) == []
    images = {container["image"] for _, container, _ in containers(objects) if "image" in container}
    assert images and all(DIGEST.match(image) for image in images), images


def test_the_gcs_redis_exists_in_dev_and_is_external_in_prod(rendered):
    dev = rendered["overlays/dev-cpu"]
    options = only(dev, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    host, _, port = options["redisAddress"].rpartition(":")
    service = only(dev, "Service", host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    secret_ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in only(dev, "Secret", secret_ref["name"])["stringData"]
    (redis,) = only(dev, "StatefulSet", host)["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" in redis["args"] and redis["env"][0]["valueFrom"]["secretKeyRef"] == secret_ref
    prod_names = {obj["metadata"]["name"] for obj in rendered["overlays/prod-gpu"] if obj["kind"] in ("Secret", "Service")}
    assert secret_ref["name"] not in prod_names  # created outside the repository (k8s/README.md)


def test_prod_allows_egress_to_its_external_redis_addresses(rendered):
    allow = only(rendered["overlays/prod-gpu"], "NetworkPolicy", "seqrank-ray-allow")
    blocks = [peer["ipBlock"] for rule in allow["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert blocks, "prod needs egress to its Redis addresses (overlays/prod-gpu/networkpolicy-redis.yaml)"


def test_token_auth_mode_is_in_the_pinned_crd(rayservice_schema):
    cluster = rayservice_schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    assert "token" in cluster["authOptions"]["properties"]["mode"]["enum"]
    assert "redisPassword" in cluster["gcsFaultToleranceOptions"]["properties"]


# ---- negative: drop one property, the check must say so ----------------------------------------------------------

def _ray(objects: list[dict]) -> dict:
    return only(objects, "RayService")["spec"]["rayClusterConfig"]


def _worker(objects: list[dict], index: int = 0) -> dict:
    return _ray(objects)["workerGroupSpecs"][index]["template"]["spec"]


def _policy(objects: list[dict], name: str) -> dict:
    return only(objects, "NetworkPolicy", name)["spec"]


def _serve_deployment(objects: list[dict], name: str, edit: Callable[[dict], None]) -> None:
    rayservice = only(objects, "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (deployment,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    edit(deployment)
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _drop_redis_egress(objects: list[dict]) -> None:
    spec = _policy(objects, "seqrank-ray-allow")
    spec["egress"] = [rule for rule in spec["egress"] if ("TCP", 6379) not in _ports(rule)]


MUTATIONS: list[tuple[str, str, Callable[[list[dict]], None], str]] = [
    ("dev-cpu", "no readOnlyRootFilesystem on the cpu worker",
     lambda o: _worker(o)["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
    ("prod-gpu", "privilege escalation on the gpu worker",
     lambda o: _worker(o, 1)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation"),
    ("prod-gpu", "capabilities kept on the head",
     lambda o: _ray(o)["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities"),
     "drop [ALL]"),
    ("prod-gpu", "an added capability", lambda o: _worker(o)["containers"][0]["securityContext"]["capabilities"]
     .update(add=["NET_ADMIN"]), "drop [ALL]"),
    ("prod-gpu", "no seccomp on the autoscaler sidecar",
     lambda o: _ray(o)["autoscalerOptions"]["securityContext"].pop("seccompProfile"), "autoscaler: securityContext.seccompProfile"),
    ("prod-gpu", "an init container without securityContext",
     lambda o: _worker(o).setdefault("initContainers", []).append({"name": "init", "image": "x@sha256:" + "0" * 64}),
     "initContainers/init: securityContext.runAsNonRoot"),
    ("dev-cpu", "the Redis runs as root",
     lambda o: only(o, "StatefulSet", "seqrank-redis")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
     "pod securityContext.runAsUser"),
    ("dev-cpu", "no fsGroup on the loader pod",
     lambda o: only(o, "Pod", "seqrank-artifact-loader")["spec"]["securityContext"].pop("fsGroup"), "fsGroup"),
    ("dev-cpu", "no runAsNonRoot on the loader container",
     lambda o: only(o, "Pod", "seqrank-artifact-loader")["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot"),
     "runAsNonRoot"),
    ("base", "no /tmp emptyDir on the head",
     lambda o: _ray(o)["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop(2), "/tmp is not"),
    ("base", "/tmp/ray under another volume name",
     lambda o: _worker(o)["containers"][0]["volumeMounts"][1].update(name="tmp"), "must be volume 'ray-logs'"),
    ("base", "no default-deny", lambda o: o.remove(only(o, "NetworkPolicy", "seqrank-ray-default-deny")),
     "no default-deny"),
    ("base", "default-deny for ingress only",
     lambda o: _policy(o, "seqrank-ray-default-deny").update(policyTypes=["Ingress"]), "no default-deny"),
    ("base", "gRPC open to every pod",
     lambda o: _policy(o, "seqrank-ray-allow")["ingress"][0]["from"].pop(0), "seqrank.io/client=true"),
    ("base", "no scrape from monitoring", lambda o: _policy(o, "seqrank-ray-allow")["ingress"].pop(1), "8080"),
    ("base", "no intra-cluster ingress", lambda o: _policy(o, "seqrank-ray-allow")["ingress"].pop(2),
     "no ingress between"),
    ("base", "no DNS", lambda o: _policy(o, "seqrank-ray-allow")["egress"].pop(1), "DNS"),
    ("dev-cpu", "no Redis egress", _drop_redis_egress, "Redis pods"),
    ("base", "an ingress rule open to all", lambda o: _policy(o, "seqrank-ray-allow")["ingress"].append({}),
     "without `from`"),
    ("base", "no PDB for cpu", lambda o: o.remove(only(o, "PodDisruptionBudget", "seqrank-ray-cpu")),
     "worker group cpu: 0"),
    ("prod-gpu", "PDB with minAvailable", lambda o: only(o, "PodDisruptionBudget", "seqrank-ray-gpu")["spec"]
     .update(minAvailable=1), "maxUnavailable: 1"),
    ("prod-gpu", "PDB blocking drains", lambda o: only(o, "PodDisruptionBudget", "seqrank-ray-gpu")["spec"]
     .update(maxUnavailable=0), "maxUnavailable: 1"),
    ("prod-gpu", "PDB selecting another group's label", lambda o: only(o, "PodDisruptionBudget", "seqrank-ray-cpu")
     ["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "ray-worker-gpu"}), "does not match"),
    ("dev-cpu", "PDB for an absent group", lambda o: o.append(copy.deepcopy(only(rendered_prod(), "PodDisruptionBudget",
     "seqrank-ray-gpu"))), "no such worker group"),
    ("base", "no GCS fault tolerance", lambda o: _ray(o).pop("gcsFaultToleranceOptions"), "redisAddress"),
    ("base", "GCS Redis password inline", lambda o: _ray(o)["gcsFaultToleranceOptions"].update(
        redisPassword={"value": "hunter2"}), "from a Secret"),
    ("dev-cpu", "GCS on the history Redis", lambda o: _ray(o)["gcsFaultToleranceOptions"].update(
        redisAddress="seqrank-redis:6379"), "history store's Redis"),
    ("base", "no token auth", lambda o: _ray(o).pop("authOptions"), "authOptions"),
    ("prod-gpu", "one ingress replica", lambda o: _serve_deployment(o, "RankingIngress", lambda d: d.update(
        num_replicas=1)), "RankingIngress: at least 2"),
    ("prod-gpu", "encoder min_replicas 1", lambda o: _serve_deployment(o, "Encoder", lambda d: d[
        "autoscaling_config"].update(min_replicas=1)), "Encoder: at least 2"),
    ("prod-gpu", "retrieval replicas anywhere", lambda o: _serve_deployment(o, "Retrieval", lambda d: d.pop(
        "max_replicas_per_node")), "Retrieval: max_replicas_per_node"),
    ("prod-gpu", "one gpu worker", lambda o: _ray(o)["workerGroupSpecs"][1].update(minReplicas=1), "gpu group"),
    ("prod-gpu", "image by tag", lambda o: _worker(o)["containers"][0].update(image="registry.example.com/seqrank:1"),
     "not pinned by digest"),
]


def rendered_prod() -> list[dict]:
    return build(K8S_DIR / "overlays/prod-gpu")


@pytest.mark.parametrize("overlay, what, mutate, fragment", MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_the_checks_report_a_dropped_property(rendered, overlay, what, mutate, fragment):
    kustomization = overlay if overlay == "base" else f"overlays/{overlay}"
    objects = copy.deepcopy(rendered[kustomization])
    assert all_problems(objects, kustomization) == []
    mutate(objects)
    problems = all_problems(objects, kustomization)
    assert any(fragment in problem for problem in problems), problems
