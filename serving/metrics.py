"""Every custom metric of the service, defined once: name, unit, meaning, labels. Request code only records.

Metrics go through `ray.serve.metrics` (Serve adds the deployment, replica and application labels) to Ray's
per-node metrics agent, which serves them to Prometheus next to Serve's own `ray_serve_*` series on the metrics
export port. Ray prefixes every name with `ray_`; counters gain `_total`, histograms `_bucket`/`_sum`/`_count`.
docs/metrics.md documents each one; a test keeps the two in step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal, Sequence

from ray.serve import metrics as serve_metrics

from seqrank.serving.attribution import Attribution
from seqrank.serving.errors import RpcOutcome

RAY_PREFIX = "ray_"
LATENCY_MS_BOUNDARIES = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2500)
BATCH_SIZE_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)
COUNT_BOUNDARIES = (1, 5, 10, 20, 50, 100, 200, 500, 1000)  # Ray wants positive bounds; le=1 holds 0 too
MODEL_INFO_REFRESH_S = 5.0  # well under the agent's gauge TTL (two export intervals, 2 x 10 s by default)

# Rank stages, in execution order; also the names in RankResponse.timings (plus "total").
STAGE_RANK = "rank"  # the ingress's batch of validated Rank requests (batch sizes only)
STAGE_HISTORY = "history"
STAGE_ENCODE = "encode"
STAGE_RETRIEVE = "retrieve"
STAGE_RERANK = "rerank"
STAGE_FALLBACK = "fallback"
STAGE_TOTAL = "total"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered; Prometheus sees RAY_PREFIX + name (+ suffix)
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms only

    @property
    def exported_name(self) -> str:
        """The series name to query: ray_<name>_total for counters, ray_<name>_count for histograms."""
        suffix = {"counter": "_total", "histogram": "_count", "gauge": ""}[self.kind]
        return RAY_PREFIX + self.name + suffix


REQUESTS = MetricSpec(
    "seqrank_requests", "counter", "RPCs answered by the ingress, by method and gRPC status code.", ("method", "code")
)
REQUEST_LATENCY = MetricSpec(
    "seqrank_request_latency_ms", "histogram", "Ingress time per RPC in milliseconds (validation to response).",
    ("method",), LATENCY_MS_BOUNDARIES,
)
STAGE_LATENCY = MetricSpec(
    "seqrank_stage_latency_ms", "histogram",
    "Rank time per stage in milliseconds as the ingress sees it: history, encode, retrieve (includes rerank when "
    "the re-ranker runs inside retrieval), rerank (MMR compute), fallback.",
    ("stage",), LATENCY_MS_BOUNDARIES,
)
BATCH_SIZE = MetricSpec(
    "seqrank_batch_size", "histogram",
    "Requests per executed @serve.batch call, by stage (rank: the ingress's batch; encode, retrieve, rerank).",
    ("stage",), BATCH_SIZE_BOUNDARIES,
)
CANDIDATES = MetricSpec(
    "seqrank_candidates_retrieved", "histogram", "Candidates per Rank left after filtering, before re-ranking.",
    (), COUNT_BOUNDARIES,
)
FILTERED = MetricSpec(
    "seqrank_items_filtered", "histogram",
    "Index results per Rank dropped because they were excluded or already seen.", (), COUNT_BOUNDARIES,
)
HISTORY_LENGTH = MetricSpec(
    "seqrank_history_length", "histogram",
    "Events in the history behind a Rank, by source (store, inline; fallback records 0).",
    ("source",), COUNT_BOUNDARIES,
)
MODEL_INFO = MetricSpec(
    "seqrank_model_info", "gauge", "1 for the model version a replica serves, 0 for versions it replaced.",
    ("model_version",),
)
RELOADS = MetricSpec(
    "seqrank_model_reloads", "counter", "Artifact loads by reconfigure, by outcome (ok, failed: old version kept).",
    ("outcome",),
)
VERSION_RETRIES = MetricSpec(
    "seqrank_version_retries", "counter",
    "Rank requests re-encoded because retrieval did not hold the encoder's model version yet (rollouts only).",
)
HISTORY_DURABLE = MetricSpec(
    "seqrank_history_store_durable", "gauge",
    "Whether the history store keeps an acknowledged append through a crash, checked at replica start: 1 yes, "
    "0 no (e.g. Redis without appendonly yes + appendfsync always), -1 could not be checked.", ("backend",),
)
CATALOGUE_CHANGES = MetricSpec(
    "seqrank_catalogue_changes", "counter",
    "Live catalogue changes acknowledged by this ingress, by kind: created and updated (UpsertItems), hidden and "
    "restored (SetItemAvailability, items whose availability changed).", ("kind",),
)
# Online quality (serving/attribution.py): lists shown and the events that name them (Event.list_request_id).
LISTS_SHOWN = MetricSpec(
    "seqrank_lists_shown", "counter",
    "Rank lists this ingress answered and remembers for attribution, by the model version that produced them.",
    ("model_version",),
)
ATTRIBUTED_EVENTS = MetricSpec(
    "seqrank_attributed_events", "counter",
    "RecordEvents events naming a list this ingress remembers, by the list's model version, the item's position "
    "bucket on it (1, 2-3, 4-10, 11+; miss: not on the list) and the behaviour (unspecified for \"\").",
    ("model_version", "position_bucket", "behavior"),
)
UNATTRIBUTED_EVENTS = MetricSpec(
    "seqrank_unattributed_events", "counter",
    "RecordEvents events naming a list this ingress does not remember (served by another replica, expired, "
    "evicted or never served): stored, not counted.",
)
CANARY_PERCENT = MetricSpec(
    "seqrank_canary_percent", "gauge",
    "Share of users (percent) routed to the canary model version a replica holds; absent without a canary.",
    ("model_version",),
)
ALL_METRICS = (
    REQUESTS, REQUEST_LATENCY, STAGE_LATENCY, BATCH_SIZE, CANDIDATES, FILTERED, HISTORY_LENGTH, MODEL_INFO,
    RELOADS, VERSION_RETRIES, HISTORY_DURABLE, CATALOGUE_CHANGES, LISTS_SHOWN, ATTRIBUTED_EVENTS,
    UNATTRIBUTED_EVENTS, CANARY_PERCENT,
)


def _create(spec: MetricSpec):
    if spec.kind == "counter":
        return serve_metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return serve_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return serve_metrics.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys=spec.tag_keys)


class ServingMetrics:
    """The metrics of one replica; create it in the deployment's __init__ (Serve's labels come from there)."""

    def __init__(self) -> None:
        self._metrics = {spec.name: _create(spec) for spec in ALL_METRICS}
        self._serving_version: str | None = None
        self._durability: tuple[str, float] | None = None  # (backend, gauge value) once checked
        self._refresher: threading.Thread | None = None
        self._canary: tuple[str, float] | None = None  # (canary version, percent) while one is served

    def observe_rpc(self, outcome: RpcOutcome) -> None:
        self._metrics[REQUESTS.name].inc(tags={"method": outcome.method, "code": outcome.code.name})
        self._metrics[REQUEST_LATENCY.name].observe(outcome.duration_s * 1000.0, tags={"method": outcome.method})

    def observe_stage(self, stage: str, ms: float) -> None:
        self._metrics[STAGE_LATENCY.name].observe(ms, tags={"stage": stage})

    def observe_batch(self, stage: str, size: int) -> None:
        self._metrics[BATCH_SIZE.name].observe(size, tags={"stage": stage})

    def observe_retrieval(self, num_candidates: int, num_filtered: int) -> None:
        self._metrics[CANDIDATES.name].observe(num_candidates)
        self._metrics[FILTERED.name].observe(num_filtered)

    def observe_history(self, source: str, length: int) -> None:
        self._metrics[HISTORY_LENGTH.name].observe(length, tags={"source": source})

    def observe_version_retry(self, num_requests: int) -> None:
        self._metrics[VERSION_RETRIES.name].inc(num_requests)

    def observe_catalogue(self, kind: str, count: int) -> None:
        if count:
            self._metrics[CATALOGUE_CHANGES.name].inc(count, tags={"kind": kind})

    def observe_list_shown(self, model_version: str) -> None:
        self._metrics[LISTS_SHOWN.name].inc(tags={"model_version": model_version})

    def observe_attributions(self, attributions: Sequence[Attribution], unknown: int) -> None:
        for attribution in attributions:
            self._metrics[ATTRIBUTED_EVENTS.name].inc(tags={
                "model_version": attribution.model_version, "position_bucket": attribution.position_bucket,
                "behavior": attribution.behavior})
        if unknown:
            self._metrics[UNATTRIBUTED_EVENTS.name].inc(unknown)

    def observe_canary(self, model_version: str | None, percent: float) -> None:
        """The canary a replica serves after a reload (None: none); the old canary's gauge drops to 0."""
        if self._canary is not None and self._canary[0] != model_version:
            self._metrics[CANARY_PERCENT.name].set(0, tags={"model_version": self._canary[0]})
        self._canary = None if model_version is None else (model_version, percent)
        if self._canary is not None:
            self._metrics[CANARY_PERCENT.name].set(percent, tags={"model_version": model_version})
            self._start_refresher()

    def observe_durability(self, backend: str, durable: bool | None) -> None:
        self._durability = (backend, -1.0 if durable is None else float(durable))
        self._metrics[HISTORY_DURABLE.name].set(self._durability[1], tags={"backend": backend})
        self._start_refresher()

    def observe_reload(self, outcome: str, old_version: str | None, new_version: str | None) -> None:
        self._metrics[RELOADS.name].inc(tags={"outcome": outcome})
        if new_version is None:
            return
        if old_version is not None and old_version != new_version:
            self._metrics[MODEL_INFO.name].set(0, tags={"model_version": old_version})
        self._serving_version = new_version
        self._metrics[MODEL_INFO.name].set(1, tags={"model_version": new_version})
        self._start_refresher()

    def _start_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._keep_gauges_alive, name="gauges", daemon=True)
            self._refresher.start()

    def _keep_gauges_alive(self) -> None:
        """Ray's metrics agent evicts a gauge not re-reported within two export intervals, so an idle replica would
        stop saying which version it serves: re-assert the gauges well inside that window."""
        while True:
            time.sleep(MODEL_INFO_REFRESH_S)
            if self._serving_version is not None:
                self._metrics[MODEL_INFO.name].set(1, tags={"model_version": self._serving_version})
            canary = self._canary
            if canary is not None:
                self._metrics[CANARY_PERCENT.name].set(canary[1], tags={"model_version": canary[0]})
            if self._durability is not None:
                backend, value = self._durability
                self._metrics[HISTORY_DURABLE.name].set(value, tags={"backend": backend})
