"""`seqrank bench catalogue`: how fast a catalogue change reaches every replica, and RankBatch against single Ranks.

One local Ray + Serve with the seqrank app at two ingress replicas (SQLite store, the config's
`history.catalogue_sync_ms`):
- freshness: for each of N changes (hide or restore an item, alternating), GetModelInfo is called back to back
  for twice the sync interval after the acknowledgement; a replica that has not applied the change answers an
  older catalogue version. The change's freshness is the time from the acknowledgement to the last such stale
  answer (0 when none): the moment every replica answered with it, to within one call (about a millisecond);
- batch: the same users ranked by RankBatch (batches of `batch_size`) and by single Rank calls at a given
  concurrency, users per second each, in one run.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from seqrank.serving.bench.loadgen import (
    CLUSTER_CPUS,
    DEPLOY_TIMEOUT_S,
    RANK_EVENTS,
    RANK_K,
    free_port,
    train_tiny_artifact,
)

logger = logging.getLogger(__name__)
INGRESS_REPLICAS = 2


def _users(artifact_path: Path, count: int, seed: int = 0):
    from seqrank.serving.client.ranking_client import rank_request
    from seqrank.serving.history.events import Event
    from seqrank.training.artifact import load_artifact

    artifact = load_artifact(artifact_path)
    behavior = (artifact.behavior_names or [""])[0]
    rng = np.random.default_rng(seed)
    return [rank_request(f"bench-{user}", k=RANK_K, recent_events=[
        Event(artifact.item_ids[i], behavior) for i in rng.choice(np.arange(1, artifact.num_items + 1), RANK_EVENTS,
                                                                  replace=False)]) for user in range(count)]


def measure_freshness(client, item_ids: list[str], changes: int, window_s: float) -> dict:
    """Seconds from each change's acknowledgement to the last stale answer of any replica."""
    freshness, calls = [], 0
    for change in range(changes):
        ack = client.set_item_availability([item_ids[change % len(item_ids)]], available=change % 2 == 1)
        acknowledged = time.perf_counter()
        last_stale = acknowledged
        while time.perf_counter() - acknowledged < window_s:
            answered = client.model_info().catalogue.version
            calls += 1
            if answered < ack.catalogue_version:
                last_stale = time.perf_counter()
        freshness.append(last_stale - acknowledged)
    ms = sorted(1000 * f for f in freshness)
    return {"changes": changes, "median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "max_ms": ms[-1], "stale_free": sum(f == 0 for f in freshness), "calls": calls}


def measure_batch(target: str, app: str, requests: list, batch_size: int, concurrency: int) -> dict:
    """Users per second: RankBatch in batches of `batch_size`, then single Ranks at `concurrency`, same users."""
    from seqrank.serving.client.ranking_client import RankingClient
    from seqrank.serving.client.retry import NO_RETRY

    def run(work, threads: int) -> float:
        chunks = [work[t::threads] for t in range(threads)]
        errors: list[BaseException] = []

        def worker(chunk):
            with RankingClient(target, application=app, timeout_s=60.0, retry=NO_RETRY) as client:
                try:
                    for item in chunk:
                        item(client)
                except BaseException as error:  # surfaced after the join
                    errors.append(error)

        started = time.perf_counter()
        pool = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - started

    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    batch_seconds = run([lambda client, b=b: client.rank_batch(b) for b in batches], min(len(batches), 2))
    single_seconds = run([lambda client, r=r: client.send_rank(r) for r in requests], concurrency)
    return {"users": len(requests), "batch_size": batch_size, "batch_users_per_s": len(requests) / batch_seconds,
            "single_concurrency": concurrency, "single_users_per_s": len(requests) / single_seconds,
            "ratio": single_seconds / batch_seconds}


def bench_catalogue(serve_config: dict, artifact: str | Path | None, changes: int, users: int, batch_size: int,
                    concurrency: int) -> dict:
    import ray
    from ray import serve

    from seqrank.serving.client.ranking_client import RankingClient
    from seqrank.serving.client.retry import NO_RETRY
    from seqrank.serving.config import AppArgs
    from seqrank.serving.ops.deploy import localize, preflight, start_local, submit, wait_until_running
    from seqrank.serving.ops.serve_config_check import application
    from seqrank.training.artifact import load_artifact

    with tempfile.TemporaryDirectory(prefix="seqrank-bench-catalogue-") as tmp:
        if artifact is None:
            artifact = train_tiny_artifact(Path(tmp))
        config = copy.deepcopy(serve_config)
        app = application(config)
        app.setdefault("args", {})["local"] = {**app["args"].get("local", {}), "metrics_export_port": free_port(),
                                               "dashboard_port": free_port()}
        app["args"].setdefault("ingress", {}).setdefault("history", {})["url"] = f"sqlite:///{tmp}/history.db"
        app["logging_config"] = {"enable_access_log": False}
        for deployment in app.get("deployments", []):
            if deployment["name"] == "RankingIngress":
                deployment["num_replicas"] = INGRESS_REPLICAS
        config.setdefault("grpc_options", {})["port"] = grpc_port = free_port()
        config.setdefault("http_options", {})["port"] = free_port()
        config = localize(config, artifact_path=artifact)
        app_args: AppArgs = preflight(config)
        sync_s = app_args.ingress.history.catalogue_sync_ms / 1000.0
        target = f"127.0.0.1:{grpc_port}"
        dashboard_url = start_local(config, app_args, num_cpus=CLUSTER_CPUS, log_to_driver=False)
        try:
            submit(config, dashboard_url)
            wait_until_running(dashboard_url, application(config)["name"], DEPLOY_TIMEOUT_S)
            item_ids = load_artifact(Path(artifact)).item_ids[1:]
            with RankingClient(target, application=application(config)["name"], timeout_s=30.0,
                               retry=NO_RETRY) as client:
                logger.info("freshness: %d changes, %.1f s windows", changes, 2 * sync_s)
                freshness = measure_freshness(client, item_ids, changes, 2 * sync_s)
            logger.info("batch: %d users", users)
            batch = measure_batch(target, application(config)["name"], _users(Path(artifact), users), batch_size,
                                  concurrency)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"artifact": str(artifact), "ingress_replicas": INGRESS_REPLICAS, "catalogue_sync_ms": 1000 * sync_s,
            "freshness": freshness, "batch": batch}


def format_catalogue(report: dict) -> str:
    fresh, batch = report["freshness"], report["batch"]
    return "\n".join([
        f"freshness with {report['ingress_replicas']} ingress replicas, catalogue_sync_ms "
        f"{report['catalogue_sync_ms']:.0f}: {fresh['changes']} changes",
        f"  ack -> every replica: median {fresh['median_ms']:.0f} ms, p90 {fresh['p90_ms']:.0f} ms, "
        f"max {fresh['max_ms']:.0f} ms ({fresh['stale_free']} changes never answered stale; "
        f"{fresh['calls']} GetModelInfo calls)",
        f"batch: {batch['users']} users, RankBatch of {batch['batch_size']}: {batch['batch_users_per_s']:.1f} "
        f"users/s; single Rank at concurrency {batch['single_concurrency']}: {batch['single_users_per_s']:.1f} "
        f"users/s; batch/single {batch['ratio']:.2f}x",
    ])
