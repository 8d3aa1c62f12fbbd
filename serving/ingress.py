"""The gRPC ingress: RankingService and grpc.health.v1 Check; each RPC validates, orchestrates and converts.

Rank: validate (serving/validation.py) -> history (inline events, else the store) -> encode -> retrieve and
re-rank -> RankResponse. Encoding and retrieval run in this replica or in their own deployments
(`encoder.placement`, `retrieval.placement`; re-ranking inside retrieval or in its own deployment). Validated
requests that arrive together share a batch: one encoder call and one retrieval call per batch, not per request.
A user without usable history gets the cold-start list (`ingress.cold_start`). Domain errors, here or in a
downstream replica, become status codes in one place: `rpc_method`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from seqrank.serving import health
from seqrank.serving.attribution import ListMemory
from seqrank.serving.auth import authenticator
from seqrank.serving.batching import SlotBatcher
from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs
from seqrank.serving.errors import (
    INTERNAL_ERROR_DETAILS,
    InvalidArgument,
    NotFound,
    RpcHooks,
    ServingError,
    Unavailable,
    rpc_method,
    status_code_of,
    status_details,
)
from seqrank.serving.history import (
    Durability,
    Event,
    HistoryConfig,
    HistoryStore,
    ItemChange,
    StoredEvent,
    open_history_store,
    resolve_history_url,
)
from seqrank.serving.history.deadline import DeadlineStore
from seqrank.serving.live_catalogue import CatalogueView, LiveItemsSync, ViewCache
from seqrank.serving.messages import (
    CandidateSet,
    EncodedUser,
    EncodeRequest,
    RankedItem,
    RankedList,
    RerankRequest,
    RetrievalRequest,
)
from seqrank.serving.metrics import (
    STAGE_ENCODE,
    STAGE_FALLBACK,
    STAGE_HISTORY,
    STAGE_RANK,
    STAGE_RERANK,
    STAGE_RETRIEVE,
    STAGE_TOTAL,
    ServingMetrics,
)
from seqrank.serving.reload import ModelSlot, VersionUnavailable
from seqrank.serving.retrieval import RetrievalStage, fetch_size, rerank_all
from seqrank.serving.validation import (
    UNKNOWN_ITEM_REASON,
    Limits,
    RankQuery,
    validate_rank_batch_request,
    validate_rank_request,
    validate_record_events_request,
    validate_set_item_availability_request,
    validate_upsert_items_request,
)
from seqrank.training.metrics import TRAINING_SUMMARY_KEYS, is_evaluation_metric
from seqrank.training.vocab import PAD_INDEX
from seqrank.v1 import ranking_pb2

if TYPE_CHECKING:  # imported at run time only by an ingress that encodes (torch)
    from seqrank.serving.encoder import EncoderStage

logger = logging.getLogger(f"ray.serve.{__name__}")
T = TypeVar("T")
COLD_START_POPULAR = "popular"
HISTORY_SOURCE_NAMES = {
    ranking_pb2.HISTORY_SOURCE_STORE: "store",
    ranking_pb2.HISTORY_SOURCE_INLINE: "inline",
    ranking_pb2.HISTORY_SOURCE_FALLBACK: "fallback",
    ranking_pb2.HISTORY_SOURCE_STORE_UNAVAILABLE: "store_unavailable",
}
FALLBACK_SOURCES = (ranking_pb2.HISTORY_SOURCE_FALLBACK, ranking_pb2.HISTORY_SOURCE_STORE_UNAVAILABLE)  # popular list


@dataclass
class StageClock:
    """Wall time of each Rank stage, for RankResponse.timings and the stage-latency histogram."""

    metrics: ServingMetrics
    started: float = field(default_factory=time.perf_counter)
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, ms) in execution order

    def add(self, stage: str, ms: float) -> None:
        self.stages.append((stage, ms))
        self.metrics.observe_stage(stage, ms)

    def extend(self, stages: Sequence[tuple[str, float]]) -> None:
        for stage, ms in stages:
            self.add(stage, ms)

    def run(self, stage: str, function: Callable[..., T], *args) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000.0)

    async def time(self, stage: str, awaitable: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000.0)

    def total_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


@dataclass(frozen=True)
class UserHistory:
    history: History
    source: int  # ranking_pb2.HistorySource


@dataclass(frozen=True)
class RankWork:
    """A validated Rank with its history, waiting for the model stages."""

    query: RankQuery
    history: History
    exclude_item_ids: tuple[str, ...]  # raw ids of the known excluded items
    catalogue_version: int = 0  # the live catalogue the request was validated against
    model_version: str | None = None  # a canary's version for its users (serving/canary.py); None = current


@dataclass(frozen=True)
class RankOutcome:
    ranked: RankedList
    stages: tuple[tuple[str, float], ...]  # (stage, ms) of the batch the request rode in


async def timed(stages: list[tuple[str, float]], stage: str, awaitable: Awaitable[T]) -> T:
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        stages.append((stage, (time.perf_counter() - started) * 1000.0))


def history_of(events: Sequence[Event] | Sequence[StoredEvent]) -> History:
    return History(item_ids=tuple(e.raw_item_id for e in events), behaviors=tuple(e.behavior for e in events))


def choose_source(history: History, source: int, catalogue: Catalogue, cold_start: str, user_id: str) -> int:
    """`source`, or FALLBACK when no event names an item of the serving model (cold start); NotFound if so set."""
    if len(history) and catalogue.known(history.item_ids).any():
        return source
    if cold_start != COLD_START_POPULAR:
        raise NotFound("user_id", f"no history for user {user_id!r}: send recent_events or record events first")
    return ranking_pb2.HISTORY_SOURCE_FALLBACK


def fallback_list(view: CatalogueView, query: RankQuery) -> RankedList:
    """The cold-start list: the most popular allowed items (the caller's candidates when given) minus the
    exclusions. Not personalised, so not scored by the model: relevance and score are the item's share of the
    training events, in [0, 1], as the proto says (upserted items the model never trained on: 0). Only an attribute
    filter costs a pass over the catalogue; otherwise just the items looked at are checked."""
    base = view.base
    filtered = view.allowed(query.include_any, query.exclude_any) if query.filtered else None
    excluded = np.fromiter(query.exclude_item_indices, dtype=np.int64, count=len(query.exclude_item_indices))

    def allowed(indices: np.ndarray) -> np.ndarray:
        keep = ~view.hidden[indices] & ~np.isin(indices, excluded)
        return indices[keep & filtered[indices]] if filtered is not None else indices[keep]

    def popularity(indices: np.ndarray) -> np.ndarray:
        trained = indices <= base.num_items
        return np.where(trained, base.item_popularity[np.where(trained, indices, PAD_INDEX)], 0.0)

    def most_popular_first(indices: np.ndarray) -> np.ndarray:
        return indices[np.argsort(-popularity(indices), kind="stable")]  # ties: the given order

    if query.candidate_item_ids:
        pool = most_popular_first(allowed(view.indices(query.candidate_item_ids)))
    else:
        disallowed = view.num_items - int(filtered.sum()) if filtered is not None else len(excluded) + view.num_hidden
        pool = allowed(base.popular_items[: fetch_size(query.k, disallowed, base.num_items)])
        if len(pool) < query.k:  # a narrow filter: the allowed items that are left, most popular first
            pool = most_popular_first(allowed(np.arange(PAD_INDEX + 1, view.num_items + 1)))
    pool = pool[: query.k]
    shares = popularity(pool) / max(float(base.item_popularity.sum()), 1.0)
    items = tuple(RankedItem(item_id=str(view.item_ids[index]), score=float(share), relevance=float(share),
                             because_item_id="", explanation="") for index, share in zip(pool, shares))
    return RankedList(base.model_version, items, rerank_ms=0.0)


def batch_result(position: int, outcome: ranking_pb2.RankResponse | BaseException) -> ranking_pb2.RankResult:
    """One RankBatch entry: the response, or the status Rank would have answered, naming requests[position]."""
    if isinstance(outcome, ranking_pb2.RankResponse):
        return ranking_pb2.RankResult(response=outcome, status_code=grpc.StatusCode.OK.value[0])
    if isinstance(outcome, ServingError):
        return ranking_pb2.RankResult(status_code=status_code_of(outcome).value[0],
                                      status_message=f"requests[{position}].{status_details(outcome)}")
    if isinstance(outcome, asyncio.CancelledError):
        raise outcome
    logger.error("RankBatch request %d failed with an unexpected error", position, exc_info=outcome)
    return ranking_pb2.RankResult(status_code=grpc.StatusCode.INTERNAL.value[0],
                                  status_message=f"requests[{position}]: {INTERNAL_ERROR_DETAILS}")


def rank_response(ranked: RankedList, request_id: str, source: int, clock: StageClock,
                  unknown_candidate_ids: Sequence[str] = ()) -> ranking_pb2.RankResponse:
    total_ms = clock.total_ms()
    clock.metrics.observe_stage(STAGE_TOTAL, total_ms)
    return ranking_pb2.RankResponse(
        unknown_candidate_ids=unknown_candidate_ids,
        items=[
            ranking_pb2.RankedItem(item_id=item.item_id, score=item.score, relevance=item.relevance,
                                   because_item_id=item.because_item_id, explanation=item.explanation)
            for item in ranked.items
        ],
        model_version=ranked.model_version,
        timings=[ranking_pb2.StageTiming(stage=stage, ms=ms) for stage, ms in (*clock.stages, (STAGE_TOTAL, total_ms))],
        request_id=request_id,
        history_source=source,
    )


def open_checked_store(config: HistoryConfig, metrics: ServingMetrics) -> HistoryStore:
    """The configured store, its durability checked once at replica start: logged and exported
    (seqrank_history_store_durable); under history.require_durable a store that cannot promise it is refused."""
    store = open_history_store(resolve_history_url(config, os.environ))
    # One bounded look: a store that hangs must not hold the replica's start for its retries' whole length.
    checker = ThreadPoolExecutor(1, thread_name_prefix="history-durability")
    try:
        durability = checker.submit(store.durability).result(timeout=config.busy_timeout_s)
    except FutureTimeout:
        durability = Durability(None, f"{store.backend} store gave no answer within history.busy_timeout_s="
                                      f"{config.busy_timeout_s} s to the durability check")
    finally:
        checker.shutdown(wait=False)
    metrics.observe_durability(store.backend, durability.durable)
    if durability.durable:
        logger.info("history store: %s", durability.reason)
        return store
    if config.require_durable:
        store.close()
        raise RuntimeError(f"history.require_durable: {durability.reason}")
    logger.warning("history store may lose acknowledged events in a crash: %s", durability.reason)
    return store


def server_limits(limits: Limits, history: HistoryConfig) -> ranking_pb2.ServerLimits:
    return ranking_pb2.ServerLimits(
        default_k=limits.default_k, max_k=limits.max_k, default_candidate_pool_size=limits.default_candidates,
        max_candidate_pool_size=limits.max_candidates, default_diversity=limits.default_diversity,
        max_inline_events=limits.max_inline_events, max_exclude_item_ids=limits.max_exclude_ids,
        max_events_per_call=limits.max_events_per_call, max_users_per_call=limits.max_users_per_call,
        max_id_length=limits.max_id_length, max_future_seconds=limits.max_future_s,
        max_request_candidates=limits.max_request_candidates, max_filter_values=limits.max_filter_values,
        max_batch_requests=limits.max_batch_requests, max_items_per_call=limits.max_items_per_call,
        max_attributes_per_item=limits.max_attributes_per_item, catalogue_sync_ms=history.catalogue_sync_ms,
    )


def model_info(view: CatalogueView, limits: Limits, history: HistoryConfig) -> ranking_pb2.GetModelInfoResponse:
    catalogue = view.base
    manifest = catalogue.manifest
    index = manifest["index"]
    metrics = {name: float(value) for name, value in manifest.get("metrics", {}).items()}
    return ranking_pb2.GetModelInfoResponse(
        model_version=catalogue.model_version,
        num_items=catalogue.num_items,
        dim=manifest["dim"],
        index=ranking_pb2.IndexParams(space=index["space"], m=index["M"], ef_construction=index["ef_construction"],
                                      ef_search=index["ef_search"]),
        metrics={name: value for name, value in metrics.items() if is_evaluation_metric(name)},
        training_summary={name: value for name, value in metrics.items() if name in TRAINING_SUMMARY_KEYS},
        limits=server_limits(limits, history),
        catalogue=ranking_pb2.CatalogueInfo(items=view.num_items, upserted=len(view.new_items),
                                            hidden=view.num_hidden, version=view.live_version),
        behavior_names=catalogue.behavior_names,
        created_at=manifest.get("created_at", ""),
        data_fingerprint=manifest.get("data_fingerprint", ""),
        max_history_length=manifest["encoder_config"]["max_len"],
    )


class RemoteEncoder:
    """The Encoder deployment (encoder.placement: deployment): one call per batch."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def encode(self, requests: list[EncodeRequest]) -> list[EncodedUser]:
        return await self._handle.encode.remote(requests)


class LocalRetrieval:
    """Retrieval inside the ingress replica (retrieval.placement: ingress): a function call per batch."""

    def __init__(self, stage: RetrievalStage) -> None:
        self._stage = stage

    async def rank(self, requests: list[RetrievalRequest]) -> list[RankedList]:
        return rerank_all(self._stage.retrieve(requests), requests)

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        return self._stage.retrieve(requests)


class RemoteRetrieval:
    """The Retrieval deployment (retrieval.placement: deployment): one call per batch."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def rank(self, requests: list[RetrievalRequest]) -> list[RankedList]:
        return await self._handle.rank.remote(requests)

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        return await self._handle.retrieve.remote(requests)


@serve.deployment(max_ongoing_requests=100)
class RankingIngress:
    def __init__(
        self,
        args: IngressArgs,
        encoder_args: EncoderArgs,
        retrieval_args: RetrievalArgs,
        encoder: DeploymentHandle | None,  # None: the encoder runs in this replica
        retrieval: DeploymentHandle | None,  # None: retrieval runs in this replica
        reranker: DeploymentHandle | None,  # None: retrieval re-ranks
    ) -> None:
        self._args = args
        self._metrics = ServingMetrics()
        self._reranker = reranker
        self._local_encoder: EncoderStage | None = None  # this replica's model, when the encoder runs here
        if encoder is None:
            # Imported here, at replica start, so that an ingress with an Encoder deployment never loads torch.
            from seqrank.serving.encoder import EncoderStage

            self._local_encoder = EncoderStage(self._metrics, "ingress encoder", encoder_args.gpu_precision,
                                               encoder_args.inference)
            self._encoder: EncoderStage | RemoteEncoder = self._local_encoder
        else:
            self._encoder = RemoteEncoder(encoder)
        # The store first: the live catalogue's sync reads it, and a local retrieval stage shares that sync.
        self._store = DeadlineStore(open_checked_store(args.history, self._metrics), args.history.call_timeout_s,
                                    args.history.max_concurrent_calls)
        self._live = LiveItemsSync(self._store.store.items_since, args.history.catalogue_sync_ms / 1000.0,
                                   "ingress")
        self._live.start(wait_s=args.history.busy_timeout_s)
        self._views = ViewCache()
        self._local_retrieval: RetrievalStage | None = None  # this replica's index, when retrieval runs here
        if retrieval is None:
            self._local_retrieval = RetrievalStage(retrieval_args, self._metrics, "ingress retrieval",
                                                   live=self._live)
            self._retrieval: LocalRetrieval | RemoteRetrieval = LocalRetrieval(self._local_retrieval)
        else:
            self._retrieval = RemoteRetrieval(retrieval)
        # read by rpc_method; tokens from `env:`/`file:` are resolved here, in the replica, like the history url
        self.rpc_hooks = RpcHooks(authenticate=authenticator(args.auth, os.environ), observe=self._metrics.observe_rpc)
        # The replica is this setting's process edge: an `env:NAME` url (a Kubernetes Secret) is resolved here,
        # so the secret never enters the Serve config or the bound deployment arguments.
        self._catalogues: ModelSlot[Catalogue] = ModelSlot(
            "ingress", Catalogue.from_artifact, self._metrics.observe_reload
        )
        self._batcher = SlotBatcher(self._rank_batch, args.max_batch_size, args.max_concurrent_batches)
        self._lists = ListMemory(args.attribution)  # shown lists, for RecordEvents' list_request_id

    def reconfigure(self, user_config: dict) -> None:
        # Sync: Serve runs it in a worker thread while requests continue. Each slot keeps its old version if its
        # reload fails; the version protocol (serving/reload.py) keeps requests consistent either way.
        for stage in (self._local_encoder, self._local_retrieval):
            if stage is not None:
                stage.models.reload(user_config)
        self._catalogues.reload(user_config)
        loaded = self._catalogues.loaded
        self._metrics.observe_canary(loaded.canary.model_version if loaded.canary is not None else None,
                                     loaded.canary_percent)

    def check_health(self) -> None:
        self._catalogues.loaded  # raise until an artifact is loaded
        for stage in (self._local_encoder, self._local_retrieval):
            if stage is not None:
                stage.models.loaded

    def __del__(self) -> None:
        live = getattr(self, "_live", None)  # absent when __init__ failed
        if live is not None:
            live.stop()
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()

    def _view(self, catalogue: Catalogue | None = None) -> CatalogueView:
        """`catalogue` (default: the current model version) through the live catalogue as this replica knows it."""
        return self._views.view(catalogue or self._catalogues.current, self._live.current)

    async def _refresh(self) -> None:
        """Reads the catalogue changes this replica has not polled yet (another replica may just have taken one)."""
        states, latest = await self._store.items_since(self._live.current.version)
        self._live.apply(states, latest)

    async def _with_fresh_catalogue(self, validate: Callable[[CatalogueView], T]) -> T:
        """`validate(view)`, once more after reading the store when it names an item this replica does not know:
        an item upserted through another replica a moment ago is known to the store before this replica polls."""
        try:
            return validate(self._view())
        except InvalidArgument as error:
            if not error.reason.startswith(UNKNOWN_ITEM_REASON):
                raise
        await self._refresh()
        return validate(self._view())

    async def _catch_up(self, version: int) -> None:
        """This replica's live catalogue at `version` or later (read-your-writes after a catalogue write)."""
        if self._live.current.version < version:
            await self._refresh()

    @rpc_method(ranking_pb2.RankRequest, ranking_pb2.RankResponse)
    async def Rank(self, request: ranking_pb2.RankRequest, grpc_context) -> ranking_pb2.RankResponse:
        return await self._rank(request)

    @rpc_method(ranking_pb2.RankBatchRequest, ranking_pb2.RankBatchResponse)
    async def RankBatch(self, request: ranking_pb2.RankBatchRequest, grpc_context) -> ranking_pb2.RankBatchResponse:
        validate_rank_batch_request(request, self._args.limits)
        outcomes = await asyncio.gather(*(self._rank(one) for one in request.requests), return_exceptions=True)
        return ranking_pb2.RankBatchResponse(results=[
            batch_result(position, outcome) for position, outcome in enumerate(outcomes)])

    async def _rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        """One Rank: validate, history, then the fallback list or the model stages (batched with its peers)."""
        clock = StageClock(self._metrics)
        await self._catch_up(request.min_catalogue_version)  # read-your-writes; the field is validated below
        loaded = self._catalogues.loaded  # one read: a reload cannot split the choice below
        catalogue = loaded.for_user(request.user_id)  # the canary's for its users (serving/canary.py)
        pinned = catalogue.model_version if catalogue is loaded.canary else None  # None: the stages' current
        view = self._view(catalogue)
        query = validate_rank_request(request, self._args.limits, view.item_index_of, catalogue.behavior_names)
        user = await clock.time(STAGE_HISTORY, self._user_history(query, catalogue))
        if user.source in FALLBACK_SOURCES:
            ranked = clock.run(STAGE_FALLBACK, fallback_list, view, query)
        else:
            excluded_ids = tuple(view.item_ids[sorted(query.exclude_item_indices)])
            outcome = await self._batcher.submit(RankWork(query, user.history, excluded_ids, view.live_version,
                                                          pinned))
            clock.extend(outcome.stages)
            ranked = outcome.ranked
        response = rank_response(ranked, query.request_id or uuid.uuid4().hex, user.source, clock,
                                 query.unknown_candidate_ids)
        if self._lists.enabled:
            self._lists.remember(response.request_id, ranked.model_version, [item.item_id for item in ranked.items])
            self._metrics.observe_list_shown(ranked.model_version)
        logger.debug("Rank %s user %r: %s, %d items, %.1f ms", response.request_id, query.user_id,
                     ranked.model_version, len(ranked.items), response.timings[-1].ms)
        return response

    @rpc_method(ranking_pb2.UpsertItemsRequest, ranking_pb2.UpsertItemsResponse)
    async def UpsertItems(self, request: ranking_pb2.UpsertItemsRequest, grpc_context):
        upserts = validate_upsert_items_request(request, self._args.limits)
        view = self._view()
        created = sum(raw not in view.item_index_of for raw, _ in upserts.items)
        known_values = set(view.base.attribute_values or ())
        unknown = sorted({value for _, values in upserts.items for value in values if value not in known_values})
        write = await self._store.write_items([ItemChange(raw, attributes=values) for raw, values in upserts.items],
                                              upserts.idempotency_key)
        await self._catch_up(write.version)
        if not write.idempotent_replay:
            self._metrics.observe_catalogue("created", created)
            self._metrics.observe_catalogue("updated", len(upserts.items) - created)
        return ranking_pb2.UpsertItemsResponse(
            created=0 if write.idempotent_replay else created,
            updated=0 if write.idempotent_replay else len(upserts.items) - created,
            unknown_attribute_values=unknown, catalogue_version=write.version,
            idempotent_replay=write.idempotent_replay)

    @rpc_method(ranking_pb2.SetItemAvailabilityRequest, ranking_pb2.SetItemAvailabilityResponse)
    async def SetItemAvailability(self, request: ranking_pb2.SetItemAvailabilityRequest, grpc_context):
        change = await self._with_fresh_catalogue(lambda view: validate_set_item_availability_request(
            request, self._args.limits, view.item_index_of))
        write = await self._store.write_items([ItemChange(raw, available=change.available) for raw in change.item_ids],
                                              change.idempotency_key)
        await self._catch_up(write.version)
        if not write.idempotent_replay:
            self._metrics.observe_catalogue("restored" if change.available else "hidden", write.applied)
        return ranking_pb2.SetItemAvailabilityResponse(changed=write.applied, catalogue_version=write.version,
                                                       idempotent_replay=write.idempotent_replay)

    @rpc_method(ranking_pb2.RecordEventsRequest, ranking_pb2.RecordEventsResponse)
    async def RecordEvents(self, request: ranking_pb2.RecordEventsRequest, grpc_context):
        batch = await self._with_fresh_catalogue(lambda view: validate_record_events_request(
            request, self._args.limits, view.item_index_of, view.base.behavior_names))
        result = await self._store.append(batch.users, batch.idempotency_key)  # durable once it returns
        if batch.list_events and not result.idempotent_replay:  # a replayed call was counted the first time
            self._metrics.observe_attributions(*self._lists.attribute(batch.list_events))
        return ranking_pb2.RecordEventsResponse(
            accepted=result.accepted, stored=result.stored, duplicates_ignored=result.duplicates_ignored,
            idempotent_replay=result.idempotent_replay,
        )

    @rpc_method(ranking_pb2.GetModelInfoRequest, ranking_pb2.GetModelInfoResponse)
    async def GetModelInfo(self, request: ranking_pb2.GetModelInfoRequest, grpc_context):
        return model_info(self._view(), self._args.limits, self._args.history)

    @rpc_method(health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, public=True)  # probes carry no token
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context):
        return health.check(request.service, self._catalogues.is_loaded)

    async def _user_history(self, query: RankQuery, catalogue: Catalogue) -> UserHistory:
        """Inline events when given (not stored), else the stored history, bounded by the store.

        A store that cannot be read degrades Rank to the popular list marked STORE_UNAVAILABLE (the ranking
        stays available; writes fail loudly in RecordEvents), or raises Unavailable under cold_start not_found.
        """
        if query.inline_events:
            history, source = history_of(query.inline_events), ranking_pb2.HISTORY_SOURCE_INLINE
        else:
            limit = self._args.history.max_events_per_user
            try:
                stored = await self._store.recent(query.user_id, limit)
            except Unavailable as error:
                if self._args.cold_start != COLD_START_POPULAR:
                    raise
                logger.debug("Rank for user %r without stored history: %s", query.user_id, error)
                self._metrics.observe_history(HISTORY_SOURCE_NAMES[ranking_pb2.HISTORY_SOURCE_STORE_UNAVAILABLE], 0)
                return UserHistory(History(item_ids=(), behaviors=()), ranking_pb2.HISTORY_SOURCE_STORE_UNAVAILABLE)
            history, source = history_of(stored), ranking_pb2.HISTORY_SOURCE_STORE
        source = choose_source(history, source, catalogue, self._args.cold_start, query.user_id)
        if source == ranking_pb2.HISTORY_SOURCE_FALLBACK:
            history = History(item_ids=(), behaviors=())
        self._metrics.observe_history(HISTORY_SOURCE_NAMES[source], len(history))
        return UserHistory(history, source)

    async def _rank_batch(self, works: list[RankWork]) -> list[RankOutcome]:
        """Encode and retrieve for a batch of validated requests; an error fails the batch (downstream only).

        A downstream replica that dies during the call (crash, OOM kill, node loss; Serve replaces it) makes the
        batch UNAVAILABLE rather than INTERNAL: Rank reads nothing it could half-apply, so clients may retry.
        """
        try:
            return await self._encode_and_retrieve(works)
        except RayActorError as error:
            raise Unavailable("model_replica", f"a downstream replica died during the call "
                                               f"({type(error).__name__}); Serve replaces it: retry") from error

    async def _encode_and_retrieve(self, works: list[RankWork]) -> list[RankOutcome]:
        self._metrics.observe_batch(STAGE_RANK, len(works))
        stages: list[tuple[str, float]] = []
        encode = [EncodeRequest(work.history, model_version=work.model_version) for work in works]
        try:
            encoded = await timed(stages, STAGE_ENCODE, self._encoder.encode(encode))
        except VersionUnavailable as error:  # a canary the encoder does not hold (not yet, or no longer)
            self._metrics.observe_version_retry(len(works))
            encode = [replace(request, model_version=None) if request.model_version == error.requested else request
                      for request in encode]  # the encoder's current version; the response names it
            encoded = await timed(stages, STAGE_ENCODE, self._encoder.encode(encode))
        try:
            ranked = await timed(stages, STAGE_RETRIEVE, self._retrieve(works, encoded))
        except VersionUnavailable as error:  # mid-rollout: the encoder reloaded before retrieval did
            self._metrics.observe_version_retry(len(works))
            encode = [replace(request, model_version=error.held[0]) for request in encode]  # retrieval's newest
            encoded = await timed(stages, STAGE_ENCODE, self._encoder.encode(encode))
            ranked = await timed(stages, STAGE_RETRIEVE, self._retrieve(works, encoded))
        return [RankOutcome(item, (*stages, (STAGE_RERANK, item.rerank_ms))) for item in ranked]

    async def _retrieve(self, works: list[RankWork], encoded: list[EncodedUser]) -> list[RankedList]:
        requests = [
            RetrievalRequest(user=user, history=work.history, exclude_item_ids=work.exclude_item_ids,
                             exclude_seen=work.query.exclude_seen, num_candidates=work.query.num_candidates,
                             k=work.query.k, diversity=work.query.diversity,
                             candidate_item_ids=work.query.candidate_item_ids, include_any=work.query.include_any,
                             exclude_any=work.query.exclude_any, catalogue_version=work.catalogue_version)
            for work, user in zip(works, encoded)
        ]
        if self._reranker is None:
            return await self._retrieval.rank(requests)
        candidate_sets = await self._retrieval.retrieve(requests)
        return await self._reranker.rerank.remote([
            RerankRequest(candidates, request.k, request.diversity)
            for candidates, request in zip(candidate_sets, requests)
        ])
