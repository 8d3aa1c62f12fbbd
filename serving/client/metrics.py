"""The client's own Prometheus metrics: calls, their latency and retries, as the caller of the service sees them.

Opt-in: `RankingClient(metrics=registry)` records into the caller's `prometheus_client.CollectorRegistry` (the
caller serves or pushes it); without it the client records nothing and touches no global registry. Each series is
documented in docs/metrics.md ("Client library").

What counts as one request: one call of a client method (`rank`, `record`, ...), retries included. Its latency runs
from the call to its answer or final error, backoff waits included (what the caller waited); its `code` is the
final outcome. Each retry is counted apart, by the status code that caused it, so attempts = requests + retries.
Latency is in seconds, Prometheus's base unit (the server's own `_ms` series keep Ray Serve's unit: docs/metrics.md
"Units").
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

REQUESTS = "seqrank_client_requests"  # exported as seqrank_client_requests_total
REQUEST_DURATION = "seqrank_client_request_duration_seconds"
RETRIES = "seqrank_client_retries"  # exported as seqrank_client_retries_total
# A ranking call takes milliseconds to a few hundred; 0.25 s is the server-side p99 alert threshold, 5 s is past
# any sensible deadline.
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                      2.5, 5.0)
# The RPC names, as the server's ray_seqrank_requests_total labels them (Check: grpc.health.v1).
METHODS = ("Rank", "RankBatch", "RecordEvents", "UpsertItems", "SetItemAvailability", "GetModelInfo", "Check")
CLIENT_ERROR = "CLIENT_ERROR"  # `code` of a call that failed without a gRPC status (e.g. on a closed client)
CODES = tuple(code.name for code in grpc.StatusCode) + (CLIENT_ERROR,)
T = TypeVar("T")
# One ClientMetrics per registry, so that several clients can record into the same one.
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, ClientMetrics] = weakref.WeakKeyDictionary()
_BY_REGISTRY_LOCK = threading.Lock()


def check_method(method: str) -> None:
    """Keeps the `method` label to the service's RPCs (a bounded set, as Prometheus labels must be)."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")


def status_name(error: BaseException | None) -> str:
    """The `code` label of a call's outcome: the gRPC status code's name, OK for None, CLIENT_ERROR otherwise."""
    if error is None:
        return grpc.StatusCode.OK.name
    if isinstance(error, grpc.RpcError) and isinstance(error.code(), grpc.StatusCode):
        return error.code().name
    return CLIENT_ERROR


class ClientMetrics:
    """The client series in one registry. Build it once per registry (`for_registry` does) and share it between
    clients: registering the same names twice in one registry is an error."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.registry = registry
        self.requests = Counter(REQUESTS, "Calls of the ranking client by RPC method and final gRPC status code "
                                          "(retries included in one call).", ("method", "code"), registry=registry)
        self.duration = Histogram(REQUEST_DURATION, "Seconds from a client call to its answer or final error, "
                                                    "retries and backoff included.", ("method",),
                                  buckets=DURATION_BUCKETS_S, registry=registry)
        self.retries = Counter(RETRIES, "Attempts the ranking client retried, by RPC method and the gRPC status "
                                        "code that caused the retry.", ("method", "code"), registry=registry)
        self._clock = clock

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> ClientMetrics:
        """The one ClientMetrics of `registry`, created on first use (kept only while the registry lives)."""
        with _BY_REGISTRY_LOCK:
            metrics = _BY_REGISTRY.get(registry)
            if metrics is None:
                metrics = _BY_REGISTRY[registry] = cls(registry)
            return metrics

    def timed(self, method: str, call: Callable[[], T]) -> T:
        """`call()`, counted and timed as one request of `method`; its error is raised unchanged."""
        check_method(method)
        started = self._clock()
        try:
            result = call()
        except Exception as error:
            self._observe(method, status_name(error), started)
            raise
        self._observe(method, grpc.StatusCode.OK.name, started)
        return result

    def observe_retry(self, method: str, error: BaseException) -> None:
        check_method(method)
        self.retries.labels(method=method, code=status_name(error)).inc()

    def _observe(self, method: str, code: str, started: float) -> None:
        self.duration.labels(method=method).observe(self._clock() - started)
        self.requests.labels(method=method, code=code).inc()


def client_metrics(metrics: ClientMetrics | CollectorRegistry | None) -> ClientMetrics | None:
    """What `RankingClient(metrics=...)` accepts: a registry (its shared ClientMetrics), a ClientMetrics, or None."""
    if metrics is None or isinstance(metrics, ClientMetrics):
        return metrics
    if isinstance(metrics, CollectorRegistry):
        return ClientMetrics.for_registry(metrics)
    raise TypeError(f"metrics: must be a prometheus_client.CollectorRegistry, a ClientMetrics or None, "
                    f"got {type(metrics).__name__}")
