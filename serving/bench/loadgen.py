"""`seqrank bench serve`: closed-loop gRPC load against Rank and against an echo floor on the same Serve.

Read top to bottom: latency statistics (pure), the closed-loop generator (threads, no Ray, no gRPC imports),
the echo deployment (the floor: an app whose Rank returns an empty response at once, behind the same Serve
gRPC proxy, so Rank/echo isolates what seqrank itself costs) and the relay echo (the same answer after two calls to
another replica in turn, the floor of a topology whose ingress calls the Encoder and then the Retrieval deployment),
then `bench_serve`, the shell that starts local Ray + Serve, runs the targets at each concurrency and shuts
everything down.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from seqrank.serving.client.retry import NO_RETRY, RetryPolicy, call_with_retry

logger = logging.getLogger(__name__)

ECHO_APP = "echo"  # application name and route prefix /echo of the floor
RELAY_APP = "echo-relay"  # the floor plus RELAY_HOPS sequential deployment calls
RELAY_HOPS = 2  # the Kubernetes topology's ingress calls Encoder, then Retrieval
RANK_EVENTS = 20  # inline recent events per benchmark Rank request
RANK_K = 10
DEFAULT_WARMUP_REQUESTS = 5  # per thread, not measured
DEFAULT_REQUEST_TIMEOUT_S = 30.0
CLUSTER_CPUS = 4  # logical, like tests/e2e: the seqrank replicas ask for 2, the rest is room for Serve itself
DEPLOY_TIMEOUT_S = 300.0
TINY_TRAINING = [  # a small model in well under a minute on 2 cores (like tests/conftest.py TINY_OVERRIDES)
    "model.hidden_size=32", "model.intermediate_size=64", "optim.max_epochs=6", "optim.patience=3",
    "optim.lr=0.005", "optim.batch_size=128", "optim.num_threads=1",
]


# ---- statistics (pure) ---------------------------------------------------------------------------------------

def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method: the smallest value with at least q % of the samples at
    or below it, i.e. sorted_values[ceil(q / 100 * n) - 1]; always an observed sample, never interpolated."""
    if not sorted_values:
        raise ValueError("latencies: no samples, percentiles are undefined")
    if not 0 < q <= 100:
        raise ValueError(f"q: {q} is outside (0, 100]")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LatencyStats:
    """Latencies of the successful requests in milliseconds; errors counted by gRPC status code name."""

    count: int  # successful requests
    errors: dict[str, int]  # e.g. {"DEADLINE_EXCEEDED": 3}
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    requests_per_s: float  # successful requests / duration_s

    @classmethod
    def from_samples(cls, latencies_ms: list[float], errors_by_code: dict[str, int] | None,
                     duration_s: float) -> LatencyStats:
        if duration_s <= 0:
            raise ValueError(f"duration_s: {duration_s} must be > 0")
        values = sorted(latencies_ms)
        errors = dict(sorted((errors_by_code or {}).items()))
        if not values:
            nan = float("nan")
            return cls(0, errors, duration_s, nan, nan, nan, nan, nan, 0.0)
        return cls(
            count=len(values), errors=errors, duration_s=duration_s,
            p50_ms=nearest_rank(values, 50), p90_ms=nearest_rank(values, 90), p99_ms=nearest_rank(values, 99),
            max_ms=values[-1], mean_ms=statistics.fmean(values), requests_per_s=len(values) / duration_s,
        )


def median_by_stage(samples: dict[str, list[float]]) -> dict[str, float]:
    return {stage: statistics.median(values) for stage, values in samples.items() if values}


# ---- closed-loop load (threads; the caller supplies the RPC) ------------------------------------------------

Caller = Callable[[float], object]  # call(timeout_s) -> response; raises on error


@dataclass
class LoadResult:
    stats: LatencyStats
    stage_ms: dict[str, float] = field(default_factory=dict)  # median per stage, from `observe`


def error_code(error: BaseException) -> str:
    """grpc.RpcError's status code name (e.g. UNAVAILABLE); any other exception by its type name."""
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return code().name
        except Exception:  # an RpcError without a status (should not happen): fall back to the type
            pass
    return type(error).__name__


def run_closed_loop(new_caller: Callable[[], Caller], concurrency: int, duration_s: float,
                    warmup_requests: int = DEFAULT_WARMUP_REQUESTS,
                    observe: Callable[[object], dict[str, float]] | None = None,
                    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> LoadResult:
    """`concurrency` threads, each with its own caller from `new_caller()` (own gRPC channel; closed at the end
    if it has `close`), each sends its next request as soon as the previous one returns.

    Each thread first sends `warmup_requests` unmeasured requests, then waits for the others, then loops while
    the shared deadline (start + duration_s) has not passed; a request still in flight at the deadline is
    bounded by its timeout, min(request_timeout_s, time left + request_timeout_s). The rate divides by the
    measured wall time from the start to the last thread's end. `observe(response)` may return per-stage
    milliseconds; their medians are reported.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency: {concurrency} must be >= 1")
    if duration_s <= 0:
        raise ValueError(f"duration_s: {duration_s} must be > 0")
    deadline = [0.0]

    def start_clock() -> None:  # run by the barrier before it releases anyone: every thread sees the deadline
        deadline[0] = time.monotonic() + duration_s

    ready = threading.Barrier(concurrency + 1, action=start_clock)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[Counter] = [Counter() for _ in range(concurrency)]
    stages: list[dict[str, list[float]]] = [{} for _ in range(concurrency)]
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        call = None
        try:
            call = new_caller()
            for _ in range(warmup_requests):
                try:
                    call(request_timeout_s)
                except Exception:  # warmup errors are not measured; the measured loop will count them
                    pass
        except BaseException as error:  # cannot even build a caller: report after the join
            failures.append(error)
        finally:
            ready.wait()
        try:
            while call is not None and time.monotonic() < deadline[0]:
                timeout_s = min(request_timeout_s, max(0.0, deadline[0] - time.monotonic()) + request_timeout_s)
                started = time.perf_counter()
                try:
                    response = call(timeout_s)
                except Exception as error:
                    errors[n][error_code(error)] += 1
                    continue
                latencies[n].append((time.perf_counter() - started) * 1000)
                if observe is not None:
                    for stage, ms in observe(response).items():
                        stages[n].setdefault(stage, []).append(ms)
        finally:
            close = getattr(call, "close", None)
            if callable(close):
                close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()  # every thread warmed up
    started = deadline[0] - duration_s
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"load generator: a caller could not be created: {failures[0]!r}") from failures[0]
    merged_stages: dict[str, list[float]] = {}
    for per_thread in stages:
        for stage, values in per_thread.items():
            merged_stages.setdefault(stage, []).extend(values)
    stats = LatencyStats.from_samples([ms for per in latencies for ms in per], sum(errors, Counter()), elapsed)
    return LoadResult(stats=stats, stage_ms=median_by_stage(merged_stages))


# ---- the floor: a one-deployment gRPC echo app ---------------------------------------------------------------

def build_echo_app(args: dict | None = None):
    """Serve import_path target (`seqrank.serving.bench.loadgen:build_echo_app`): one deployment whose Rank returns an empty
    RankResponse at once (echoing request_id). Ray is imported here so the module's core stays Ray-free."""
    from ray import serve

    from seqrank.v1 import ranking_pb2

    @serve.deployment(name="Echo", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def Rank(self, request, grpc_context):
            if isinstance(request, bytes):  # seqrank's servicer functions pass the request bytes (serving/servicers.py)
                request = ranking_pb2.RankRequest.FromString(request)
            return ranking_pb2.RankResponse(request_id=request.request_id)

    return Echo.bind()


def echo_application() -> dict:
    return {"name": ECHO_APP, "route_prefix": f"/{ECHO_APP}", "import_path": "seqrank.serving.bench.loadgen:build_echo_app"}


def build_relay_app(args: dict | None = None):
    """Serve import_path target (`seqrank.serving.bench.loadgen:build_relay_app`): the echo, but its replica first
    awaits RELAY_HOPS calls to another deployment, one after the other, as the ingress of the Kubernetes topology
    awaits the Encoder and then the Retrieval deployment. Each hop answers with its process id; the answer's
    model_version counts the hops answered by another process (`relay:2`), so a test can tell they happened."""
    import os

    from ray import serve

    from seqrank.v1 import ranking_pb2

    @serve.deployment(name="EchoHop", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
    class EchoHop:
        async def pid(self) -> int:
            return os.getpid()

    @serve.deployment(name="EchoRelay", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
    class EchoRelay:
        def __init__(self, hop) -> None:
            self._hop = hop

        async def Rank(self, request, grpc_context):
            if isinstance(request, bytes):
                request = ranking_pb2.RankRequest.FromString(request)
            answered = [await self._hop.pid.remote() for _ in range(RELAY_HOPS)]  # in turn, not gathered
            hops = sum(pid != os.getpid() for pid in answered)
            return ranking_pb2.RankResponse(request_id=request.request_id, model_version=f"relay:{hops}")

    return EchoRelay.bind(EchoHop.bind())


def relay_application() -> dict:
    return {"name": RELAY_APP, "route_prefix": f"/{RELAY_APP}",
            "import_path": "seqrank.serving.bench.loadgen:build_relay_app"}


# ---- the shell: local Ray + Serve, both apps, each concurrency ----------------------------------------------

def train_tiny_artifact(out_dir: Path) -> Path:
    """Synthetic log → small model → artifact, for a benchmark without an artifact of its own."""
    from seqrank.training.artifact import IndexParams
    from seqrank.training.config import load_config
    from seqrank.training.export import export_run
    from seqrank.training.synthetic import write_synthetic_dataset
    from seqrank.training.train import fit

    events, attributes = write_synthetic_dataset(out_dir / "data", num_users=800, num_items=200)
    config = load_config(None, [f"data.path={events}", f"data.attributes={attributes}", *TINY_TRAINING])
    fit(config, out_dir / "run", progress=False)
    return export_run(out_dir / "run", out_dir / "artifact", IndexParams(M=16, ef_construction=200, ef_search=200))


def rank_request(artifact_path: Path):
    from seqrank.training.artifact import load_artifact
    from seqrank.v1 import ranking_pb2

    artifact = load_artifact(artifact_path)
    behavior = (artifact.behavior_names or [""])[0]
    items = artifact.item_ids[1:RANK_EVENTS + 1]
    return ranking_pb2.RankRequest(user_id="bench", k=RANK_K,
                                   recent_events=[ranking_pb2.Event(item_id=i, behavior=behavior) for i in items])


def grpc_caller_factory(target: str, app_name: str, request, retry: RetryPolicy = NO_RETRY,
                        retries: list | None = None, users: int = 1) -> Callable[[], Caller]:
    """Each call of the factory opens its own channel; the caller sends `request` to `app_name`'s Rank, retried
    like the client retries Rank (serving/client/ranking_client.py); each retry appends its status code name to `retries`.
    A measured latency includes the retries of its request; an error is counted once all attempts failed. `users` > 1:
    the calls cycle through that many user ids (built once, so the loop copies nothing), e.g. to spread a canary."""
    import random

    import grpc

    from seqrank.serving.client.ranking_client import APPLICATION_METADATA_KEY, RETRYABLE_READS, retryable_codes
    from seqrank.v1 import ranking_pb2_grpc

    metadata = ((APPLICATION_METADATA_KEY, app_name),)
    retryable = retryable_codes(RETRYABLE_READS)

    def count(attempt: int, error: BaseException, backoff_s: float) -> None:
        if retries is not None:
            retries.append(error_code(error))  # list.append is atomic: threads share the list

    def new_caller() -> Caller:
        channel = grpc.insecure_channel(target)
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        rng = random.Random()
        requests = [request] if users == 1 else [with_user(request, f"bench-{n}") for n in range(users)]
        sent = [0]

        def call(timeout_s: float):
            next_request = requests[sent[0] % len(requests)]
            sent[0] += 1
            return call_with_retry(lambda: stub.Rank(next_request, timeout=timeout_s, metadata=metadata), retry,
                                   retryable, rng, on_retry=count)

        call.close = channel.close
        return call

    return new_caller


def with_user(request, user_id: str):
    copy = type(request)()
    copy.CopyFrom(request)
    copy.user_id = user_id
    return copy


def replica_rss_mb(dashboard_url: str, app_name: str, deployment: str) -> float:
    """Resident memory of the deployment's running replicas on this machine, mean over replicas, in MiB (VmRSS of
    /proc/<pid>/status: Linux; NaN elsewhere)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(dashboard_url).get_serve_details()
    replicas = details["applications"][app_name]["deployments"][deployment]["replicas"]
    rss_kib = []
    for replica in replicas:
        status = Path(f"/proc/{replica.get('pid')}/status")
        if replica["state"] == "RUNNING" and status.is_file():
            line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
            rss_kib.append(int(line.split()[1]))
    return statistics.fmean(rss_kib) / 1024 if rss_kib else float("nan")


CANARY_USERS = 256  # distinct user ids per caller when a canary splits them


def response_timings(response) -> dict[str, float]:
    return {timing.stage: timing.ms for timing in response.timings}


def bench_serve(serve_config: dict, artifact: str | Path | None, concurrencies: list[int], seconds: float,
                warmup_requests: int = DEFAULT_WARMUP_REQUESTS, retry: RetryPolicy = RetryPolicy(),
                canary_artifact: str | Path | None = None, canary_percent: float = 50.0, relay: bool = False) -> dict:
    """Starts local Ray + Serve on free ports with the seqrank app (from `serve_config`) and the echo app,
    measures echo (with `relay`, then the relay echo) then Rank at each concurrency (retrying like the client),
    shuts Ray down; returns a JSON-ready dict. With `canary_artifact`: Rank runs first with one version and
    attribution off, then (the config applied in place, same cluster) as `rank+canary` with the canary serving
    `canary_percent` of the users and attribution on; both Rank runs spread CANARY_USERS user ids, and each records
    the ingress replicas' memory."""
    import copy

    import ray
    from ray import serve

    from seqrank.serving.ops.deploy import localize, preflight, start_local, submit, wait_until_running
    from seqrank.serving.ops.serve_config_check import INGRESS_DEPLOYMENT, application

    with tempfile.TemporaryDirectory(prefix="seqrank-bench-") as tmp:
        if artifact is None:
            logger.info("no --artifact: training a tiny model on synthetic data in %s", tmp)
            artifact = train_tiny_artifact(Path(tmp))
        config = copy.deepcopy(serve_config)
        app = application(config)
        app.setdefault("args", {})["local"] = {**app["args"].get("local", {}),
                                               "metrics_export_port": free_port(), "dashboard_port": free_port()}
        app["args"].setdefault("ingress", {}).setdefault("history", {})["url"] = f"sqlite:///{tmp}/history.db"
        app["logging_config"] = {"enable_access_log": False}
        config.setdefault("grpc_options", {})["port"] = grpc_port = free_port()
        config.setdefault("http_options", {})["port"] = free_port()
        if canary_artifact is not None:  # the baseline: one version, attribution off
            app["args"]["ingress"]["attribution"] = {"max_lists": 0}
        config = localize(config, artifact_path=artifact)
        app_args = preflight(config)  # the seqrank app alone, strictly, before anything starts
        request = rank_request(Path(artifact))
        floors = {"echo": echo_application(), **({"relay": relay_application()} if relay else {})}  # label -> app
        both = copy.deepcopy(config)
        both["applications"] += floors.values()
        dashboard_url = start_local(config, app_args, num_cpus=CLUSTER_CPUS, log_to_driver=False)
        try:
            names = [deployed["name"] for deployed in both["applications"]]
            logger.info("deploying %s (dashboard %s)", ", ".join(names), dashboard_url)
            submit(both, dashboard_url)
            for name in names:
                wait_until_running(dashboard_url, name, DEPLOY_TIMEOUT_S)
            target = f"127.0.0.1:{grpc_port}"
            runs = []
            users = CANARY_USERS if canary_artifact is not None else 1
            memory_mb = {}

            def measure(label: str, name: str, concurrency: int, observe) -> None:
                logger.info("%s at concurrency %d for %.0f s", label, concurrency, seconds)
                retries: list[str] = []
                result = run_closed_loop(grpc_caller_factory(target, name, request, retry, retries,
                                                             users if name == app["name"] else 1),
                                         concurrency, seconds, warmup_requests, observe)
                runs.append({"target": label, "concurrency": concurrency, **asdict(result.stats),
                             "retries": dict(Counter(retries)), "stage_ms": result.stage_ms})

            for concurrency in concurrencies:
                for label, floor in floors.items():
                    measure(label, floor["name"], concurrency, None)
                measure("rank", app["name"], concurrency, response_timings)
            if canary_artifact is not None:
                memory_mb["rank"] = replica_rss_mb(dashboard_url, app["name"], INGRESS_DEPLOYMENT)
                from seqrank.serving.canary import with_canary
                from seqrank.serving.ops.serve_config_check import is_model_deployment

                canary_config = with_canary(config, is_model_deployment, canary_percent,
                                            str(Path(canary_artifact).resolve()))
                application(canary_config)["args"]["ingress"]["attribution"] = {}  # the defaults: on
                preflight(canary_config)
                both_canary = copy.deepcopy(canary_config)
                both_canary["applications"] += floors.values()
                submit(both_canary, dashboard_url)
                wait_until_running(dashboard_url, app["name"], DEPLOY_TIMEOUT_S)
                wait_for_canary(target, app["name"], request, users)
                for concurrency in concurrencies:
                    measure("rank+canary", app["name"], concurrency, response_timings)
                memory_mb["rank+canary"] = replica_rss_mb(dashboard_url, app["name"], INGRESS_DEPLOYMENT)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"seconds": seconds, "rank_events": RANK_EVENTS, "k": RANK_K, "artifact": str(artifact), "runs": runs,
            **({"canary_artifact": str(canary_artifact), "canary_percent": canary_percent,
                "ingress_rss_mb": memory_mb} if canary_artifact is not None else {})}


def wait_for_canary(target: str, app_name: str, request, users: int, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Until the spread user ids get two model versions back (a config applied with new `args` replaces replicas)."""
    caller = grpc_caller_factory(target, app_name, request, users=users)()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if len({caller(DEFAULT_REQUEST_TIMEOUT_S).model_version for _ in range(64)}) == 2:
                return
        raise TimeoutError(f"no second model version after {timeout_s:.0f} s")
    finally:
        caller.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- report (pure) --------------------------------------------------------------------------------------------

def ratios(runs: list[dict]) -> list[dict]:
    """Every other target over echo for p50, p99 and req/s, at each concurrency measured for both."""
    by_key = {(run["target"], run["concurrency"]): run for run in runs}
    out = []
    for (target, concurrency), run in by_key.items():
        echo = by_key.get(("echo", concurrency))
        if target == "echo" or echo is None:
            continue
        out.append({"target": target, "concurrency": concurrency,
                    **{key: run[key] / echo[key] if echo[key] else float("nan")
                       for key in ("p50_ms", "p99_ms", "requests_per_s")}})
    return out


def format_report(report: dict) -> str:
    runs = report["runs"]
    lines = [f"{'target':<12}{'conc':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>9}  errors"]
    for run in runs:
        errors = ", ".join(f"{code} {n}" for code, n in run["errors"].items()) or "-"
        if run.get("retries"):
            errors += " (retried: " + ", ".join(f"{code} {n}" for code, n in run["retries"].items()) + ")"
        lines.append(f"{run['target']:<12}{run['concurrency']:>5}{run['p50_ms']:>9.2f}{run['p90_ms']:>9.2f}"
                     f"{run['p99_ms']:>9.2f}{run['max_ms']:>9.2f}{run['requests_per_s']:>9.1f}  {errors}")
    for label, mb in report.get("ingress_rss_mb", {}).items():
        lines.append(f"ingress replica memory with {label}: {mb:.0f} MiB (RSS)")
    lines += ["", f"{'over echo':<12}{'conc':>5}{'p50':>7}{'p99':>7}{'req/s':>7}"]
    lines += [f"{r['target']:<12}{r['concurrency']:>5}{r['p50_ms']:>7.2f}{r['p99_ms']:>7.2f}{r['requests_per_s']:>7.2f}"
              for r in ratios(runs)]
    lines += ["", "Rank per-stage median ms (response.timings)"]
    for run in runs:
        if run["target"] == "rank":
            stages = ", ".join(f"{stage} {ms:.2f}" for stage, ms in run["stage_ms"].items())
            lines.append(f"  conc {run['concurrency']:>3}: {stages}")
    return "\n".join(lines)
