"""One real local Ray cluster per test session: the committed Serve config, applied the way `seqrank serve`
applies it (Serve's REST API), on free ports, serving the session's tiny trained artifact over gRPC."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from seqrank.serving.client.ranking_client import RankingClient
from seqrank.serving.client.retry import NO_RETRY
from seqrank.serving.ops.deploy import apply, localize, preflight, read_serve_config, start_local
from seqrank.serving.ops.serve_config_check import application
from tests.support import free_port

CLUSTER_CPUS = 4  # logical: the replicas ask for 2, the rest is room for Serve's own tasks
DEPLOY_TIMEOUT_S = 600.0  # a slow start on a loaded CI machine is not a failure; DEPLOY_FAILED still fails at once


@dataclass
class Service:
    config: dict  # the applied Serve config (local ports, the tiny artifact)
    dashboard_url: str
    grpc_target: str
    metrics_url: str
    artifact: Path

    @property
    def app_name(self) -> str:
        return application(self.config)["name"]

    def client(self, timeout_s: float = 30.0, **options) -> RankingClient:
        """No retries unless asked for (`retry=`): the tests see each call's own status code."""
        return RankingClient(self.grpc_target, timeout_s=timeout_s, **{"retry": NO_RETRY, **options})

    def with_artifact(self, artifact: Path) -> dict:
        return localize(self.config, artifact_path=artifact)

    def apply(self, config: dict) -> None:
        apply(config, self.dashboard_url, DEPLOY_TIMEOUT_S)


@pytest.fixture(scope="session")
def driver_loop():
    """An event loop for DeploymentHandle calls from the tests: alive until after Serve shuts down, since
    handles may bind to the loop that first used them (Ray's throughput-optimized mode)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def service(tiny_artifact, tmp_path_factory, driver_loop):
    import ray
    from ray import serve

    config = read_serve_config()
    app = application(config)
    app["args"]["local"] = {"metrics_export_port": free_port(), "dashboard_port": free_port()}
    app["args"]["ingress"]["history"]["url"] = f"sqlite:///{tmp_path_factory.mktemp('history') / 'history.db'}"
    config["grpc_options"]["port"] = free_port()
    config["http_options"]["port"] = free_port()
    config = localize(config, artifact_path=tiny_artifact)
    args = preflight(config)
    dashboard_url = start_local(config, args, num_cpus=CLUSTER_CPUS, log_to_driver=False)
    try:
        apply(config, dashboard_url, DEPLOY_TIMEOUT_S)
        yield Service(
            config=config,
            dashboard_url=dashboard_url,
            grpc_target=f"127.0.0.1:{config['grpc_options']['port']}",
            metrics_url=f"http://127.0.0.1:{args.local.metrics_export_port}/metrics",
            artifact=Path(tiny_artifact),
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def client(service):
    with service.client() as client:
        yield client


@pytest.fixture(scope="session")
def manifest(tiny_artifact) -> dict:
    return json.loads((Path(tiny_artifact) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def item_ids(tiny_artifact) -> list[str]:
    return json.loads((Path(tiny_artifact) / "item_ids.json").read_text())


@pytest.fixture(scope="session")
def item_vectors(tiny_artifact) -> np.ndarray:
    return np.load(Path(tiny_artifact) / "item_vectors.npy")
