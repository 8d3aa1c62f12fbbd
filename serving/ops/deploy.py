"""Apply the Serve config: check it, start a local Ray + Serve, submit it through Serve's REST API, wait.

Configs go through the dashboard's `PUT /api/serve/applications/` (what `serve deploy` and KubeRay's
serveConfigV2 use) rather than `serve.run`: on that declarative path a changed `user_config` calls
`reconfigure` on the running replicas (hot reload in place), while a `serve.run` redeploy replaces them.
Before anything is submitted `preflight` checks the whole config strictly and verifies the artifact, so a bad
config fails here, loudly, while the running version keeps serving.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from seqrank.serving.config import SERVE_CONFIG_PATH, AppArgs, ModelUserConfig
from seqrank.serving.history.events import SQLITE_URL_PREFIX
from seqrank.serving.ops.serve_config_check import (
    DOWNSTREAM_BATCH_SECTIONS,
    INGRESS_DEPLOYMENT,
    RETRIEVAL_DEPLOYMENT,
    ConfigError,
    application,
    check_serve_config,
    check_topology,
    is_model_deployment,
)
from seqrank.serving.shards import plan_num_shards, shard_deployment_name
from seqrank.training.artifact import MANIFEST_FILE, load_artifact

logger = logging.getLogger(__name__)

RUNNING, DEPLOY_FAILED = "RUNNING", "DEPLOY_FAILED"
THROUGHPUT_OPTIMIZED_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"  # Ray Serve >= 2.55, documented for KubeRay
GRPC_MAX_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # read by each gRPC proxy at start (ray 2.60 constants)
POLL_INTERVAL_S = 0.5
PROXY_READY_TIMEOUT_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_TIMEOUT_S = 30.0


def read_serve_config(path: str | Path = SERVE_CONFIG_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def localize(config: dict, *, artifact_path: str | Path | None = None, base_dir: Path | None = None) -> dict:
    """A copy with `artifact_path` set on every model deployment, relative paths (a canary's too) made absolute,
    and the retrieval shards planned for the artifact (`plan_shards`).

    Replicas do not share the caller's working directory, so `artifacts/current` and `sqlite:///x.db` are
    resolved against `base_dir` (default: the current directory).
    """
    config = copy.deepcopy(config)
    base_dir = (base_dir or Path.cwd()).resolve()
    app = application(config)
    for deployment in app.get("deployments", []):
        if not is_model_deployment(deployment.get("name")):
            continue
        user_config = deployment.setdefault("user_config", {})
        path = artifact_path if artifact_path is not None else user_config.get("artifact_path")
        if path is not None:
            user_config["artifact_path"] = str((base_dir / path).resolve())
        canary_path = user_config.get("canary_artifact_path")
        if isinstance(canary_path, str) and canary_path:
            user_config["canary_artifact_path"] = str((base_dir / canary_path).resolve())
    history = app.get("args", {}).get("ingress", {}).get("history", {})
    url = history.get("url")
    if isinstance(url, str) and url.startswith(SQLITE_URL_PREFIX) and not url.startswith(SQLITE_URL_PREFIX + "/"):
        history["url"] = SQLITE_URL_PREFIX + str(base_dir / url[len(SQLITE_URL_PREFIX):])
    return plan_shards(config)


def plan_shards(config: dict) -> dict:
    """With `retrieval.shard_memory_budget_mb` set, raises `retrieval.num_shards` until one shard's index fits
    the budget (sizes from the Retrieval deployment's artifact manifest); then gives every shard without a
    `RetrievalShard<s>` entry a copy of the Retrieval entry (replicas, resources, user_config). In place."""
    app = application(config)
    retrieval = app.get("args", {}).get("retrieval", {})
    deployments = app.setdefault("deployments", [])
    by_name = {d.get("name"): d for d in deployments}
    template = by_name.get(RETRIEVAL_DEPLOYMENT)
    num_shards = retrieval.get("num_shards", 1)
    budget = retrieval.get("shard_memory_budget_mb")
    if budget is not None and template is not None:
        artifact_path = template.get("user_config", {}).get("artifact_path")
        manifest_path = Path(str(artifact_path)) / MANIFEST_FILE
        if artifact_path is not None and manifest_path.is_file():  # otherwise preflight names the problem
            manifest = json.loads(manifest_path.read_text())
            planned = plan_num_shards(manifest["num_items"], manifest["dim"], manifest["index"]["M"], budget,
                                      num_shards)
            if planned != num_shards:
                logger.info("retrieval: the index needs %d shards to fit %s MB per shard", planned, budget)
                retrieval["num_shards"] = num_shards = planned
    if isinstance(num_shards, int) and num_shards > 1 and template is not None:
        for shard in range(num_shards):
            name = shard_deployment_name(shard)
            if name not in by_name:
                deployments.append({**copy.deepcopy(template), "name": name})
    return config


def preflight(config: dict) -> AppArgs:
    """Everything checkable before submitting: Serve's schema (unknown keys too), AppArgs, deployment names,
    one artifact for all model deployments (verified), batch sizes the queue limits allow."""
    try:
        check_serve_config(config)  # the same strict check the k8s render runs: unknown keys at any depth
    except ValueError as error:  # pydantic's ValidationError included
        raise ConfigError(f"serve_config: {error}") from None
    app = application(config)
    try:
        args = AppArgs.parse(app.get("args") or {})
    except ValidationError as error:
        raise ConfigError(f"applications[0].args: {error}") from None
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    bound = check_topology(app, args)
    artifact_paths, canaries = set(), set()
    for name in (n for n in bound if is_model_deployment(n)):
        try:
            model_config = ModelUserConfig.parse(deployments.get(name, {}).get("user_config"))
        except (ValidationError, ValueError) as error:
            raise ConfigError(f"deployments[{name}].user_config: {error}") from None
        artifact_paths.add(model_config.artifact_path)
        canaries.add((model_config.canary_artifact_path, model_config.canary_percent))
    if len(artifact_paths) != 1:
        raise ConfigError(f"user_config.artifact_path: the model deployments must name one artifact, got "
                          f"{sorted(artifact_paths)}")
    if len(canaries) != 1:  # the ingress routes by its own copy; the stages must hold the same canary
        raise ConfigError(f"user_config.canary_artifact_path, canary_percent: the model deployments must name one "
                          f"canary, got {sorted(canaries, key=str)}")
    load_artifact(artifact_paths.pop())  # ArtifactError names the missing or corrupted file
    canary_path = canaries.pop()[0]
    if canary_path is not None:
        load_artifact(canary_path)
    ingress_batch = args.ingress.max_batch_size
    ingress_limit = deployments.get(INGRESS_DEPLOYMENT, {}).get("max_ongoing_requests")
    if ingress_limit is not None and ingress_limit < ingress_batch:
        raise ConfigError(f"deployments[{INGRESS_DEPLOYMENT}].max_ongoing_requests: {ingress_limit} caps Rank "
                          f"batches below args.ingress.max_batch_size={ingress_batch}; raise it")
    for section in DOWNSTREAM_BATCH_SECTIONS:  # their calls carry whole ingress batches
        batch = getattr(args, section).max_batch_size
        if batch < ingress_batch:  # Serve refuses a call holding more items than a batch
            raise ConfigError(f"args.{section}.max_batch_size: {batch} is below args.ingress.max_batch_size="
                              f"{ingress_batch}, so one ingress batch would not fit")
    return args


def start_local(config: dict, args: AppArgs, num_cpus: float | None = None, log_to_driver: bool = True) -> str:
    """Starts Ray on this machine (dashboard and metrics on the configured ports) and Serve's proxies with
    the config's gRPC options; returns the dashboard URL that `submit` talks to."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if args.local.throughput_optimized:  # read by every Ray process this call starts, so set before it
        os.environ[THROUGHPUT_OPTIMIZED_ENV] = "1"
    os.environ[GRPC_MAX_MESSAGE_SIZE_ENV] = str(args.local.grpc_max_message_bytes)  # likewise
    # Serve gives a starting proxy 5 s per readiness check and kills it after three misses; on a busy 2-core
    # machine importing gRPC and the generated modules takes longer, so the proxy was killed in a loop.
    os.environ.setdefault(PROXY_READY_TIMEOUT_ENV, str(PROXY_READY_TIMEOUT_S))
    context = ray.init(
        num_cpus=num_cpus,
        log_to_driver=log_to_driver,  # replica logs stay in Ray's session directory either way
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=args.local.dashboard_port,
        _metrics_export_port=args.local.metrics_export_port,  # KubeRay passes --metrics-export-port=8080
    )
    serve.start(
        proxy_location=config.get("proxy_location", "EveryNode"),
        http_options=config.get("http_options", {}),
        grpc_options=gRPCOptions(**config.get("grpc_options", {})),
    )
    return "http://" + context.dashboard_url


def submit(config: dict, dashboard_url: str) -> None:
    """PUT the config to Serve's REST API, exactly as `serve deploy` does (its client adds Ray's auth token)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard_url).deploy_applications(config)


def wait_until_running(dashboard_url: str, app_name: str, timeout_s: float) -> None:
    """Polls the application's status until RUNNING; raises on DEPLOY_FAILED or after `timeout_s`."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard_url)
    deadline = time.monotonic() + timeout_s
    status, message = "NOT_STARTED", ""
    while time.monotonic() < deadline:
        details = client.get_serve_details().get("applications", {}).get(app_name)
        if details is not None:
            status, message = details["status"], details.get("message", "")
            if status == RUNNING:
                return
            if status == DEPLOY_FAILED:
                raise RuntimeError(f"application {app_name!r} failed to deploy: {message}")
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f} s (status {status}: {message})")


def wait_until_only(dashboard_url: str, app_names: set[str], timeout_s: float) -> None:
    """Polls until the cluster lists no application outside `app_names`: Serve deletes an application the applied
    config dropped in the background, and `seqrank canary` refuses a cluster with more than one."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard_url)
    deadline = time.monotonic() + timeout_s
    while True:
        extra = set(client.get_serve_details().get("applications") or {}) - app_names
        if not extra:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications {sorted(extra)} still deleting after {timeout_s:.0f} s")
        time.sleep(POLL_INTERVAL_S)


def deployed_config(dashboard_url: str) -> dict:
    """The Serve config the cluster runs now (its one application as last applied, with the proxy options), as
    `apply` takes it: what `seqrank canary` edits, so a rollout step never reverts an earlier change."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(dashboard_url).get_serve_details()
    apps = [app.get("deployed_app_config") for app in (details.get("applications") or {}).values()]
    if len(apps) != 1 or apps[0] is None:
        raise ConfigError(f"{dashboard_url}: expected one deployed application, found {len(apps)}")
    config = {"applications": apps}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            config[key] = details[key]
    return config


def apply_here_or_at(config: dict, address: str | None) -> str:
    """Applies `config` at the dashboard `address`, or, with none, to the local cluster `seqrank serve` runs
    (attaching finds its dashboard and loads its auth token; a remote cluster takes Ray's RAY_AUTH_MODE /
    RAY_AUTH_TOKEN settings). Returns the address applied to."""
    if address:
        apply(config, address)
        return address
    import ray

    address = "http://" + ray.init(address="auto", logging_level=logging.WARNING).dashboard_url
    try:
        apply(config, address)
    finally:
        ray.shutdown()  # detaches; the cluster keeps running
    return address


def apply(config: dict, dashboard_url: str, timeout_s: float = 300.0) -> AppArgs:
    """preflight, submit, wait: the whole path of a config (first deploy or hot reload). Returns once its application
    is RUNNING and any application the config no longer lists is gone."""
    args = preflight(config)
    submit(config, dashboard_url)
    wait_until_running(dashboard_url, application(config)["name"], timeout_s)
    wait_until_only(dashboard_url, {app["name"] for app in config["applications"]}, timeout_s)
    return args
