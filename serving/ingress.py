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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence, TypeVar

import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from seqrank.serving import health
from seqrank.serving.auth import authenticator
from seqrank.serving.batching import SlotBatcher
from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs
from seqrank.serving.errors import NotFound, RpcHooks, Unavailable, rpc_method
from seqrank.serving.history import Event, StoredEvent, open_history_store, resolve_history_url
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
from seqrank.serving.retrieval import RetrievalStage, popular_candidates, rerank_all
from seqrank.serving.validation import RankQuery, validate_rank_request, validate_record_events_request
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


def fallback_list(catalogue: Catalogue, query: RankQuery) -> RankedList:
    """The cold-start list: most popular items minus the exclusions, scored by training event count."""
    excluded = np.fromiter(query.exclude_item_indices, dtype=np.int64, count=len(query.exclude_item_indices))
    popular = popular_candidates(catalogue, excluded, query.k)
    items = tuple(
        RankedItem(item_id=str(catalogue.item_ids[index]), score=float(count), relevance=float(count),
                   because_item_id="", explanation="")
        for index, count in zip(popular.item_indices, popular.scores)
    )
    return RankedList(catalogue.model_version, items, rerank_ms=0.0)


def rank_response(ranked: RankedList, request_id: str, source: int, clock: StageClock) -> ranking_pb2.RankResponse:
    total_ms = clock.total_ms()
    clock.metrics.observe_stage(STAGE_TOTAL, total_ms)
    return ranking_pb2.RankResponse(
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


def model_info(catalogue: Catalogue) -> ranking_pb2.GetModelInfoResponse:
    manifest = catalogue.manifest
    index = manifest["index"]
    return ranking_pb2.GetModelInfoResponse(
        model_version=catalogue.model_version,
        num_items=catalogue.num_items,
        dim=manifest["dim"],
        index=ranking_pb2.IndexParams(space=index["space"], m=index["M"], ef_construction=index["ef_construction"],
                                      ef_search=index["ef_search"]),
        metrics={name: float(value) for name, value in manifest.get("metrics", {}).items()},
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

            self._local_encoder = EncoderStage(self._metrics, "ingress encoder", encoder_args.gpu_precision)
            self._encoder: EncoderStage | RemoteEncoder = self._local_encoder
        else:
            self._encoder = RemoteEncoder(encoder)
        self._local_retrieval: RetrievalStage | None = None  # this replica's index, when retrieval runs here
        if retrieval is None:
            self._local_retrieval = RetrievalStage(retrieval_args, self._metrics, "ingress retrieval")
            self._retrieval: LocalRetrieval | RemoteRetrieval = LocalRetrieval(self._local_retrieval)
        else:
            self._retrieval = RemoteRetrieval(retrieval)
        # read by rpc_method; tokens from `env:`/`file:` are resolved here, in the replica, like the history url
        self.rpc_hooks = RpcHooks(authenticate=authenticator(args.auth, os.environ), observe=self._metrics.observe_rpc)
        # The replica is this setting's process edge: an `env:NAME` url (a Kubernetes Secret) is resolved here,
        # so the secret never enters the Serve config or the bound deployment arguments.
        self._store = open_history_store(resolve_history_url(args.history, os.environ))
        self._catalogues: ModelSlot[Catalogue] = ModelSlot(
            "ingress", Catalogue.from_artifact, self._metrics.observe_reload
        )
        self._batcher = SlotBatcher(self._rank_batch, args.max_batch_size, args.max_concurrent_batches)

    def reconfigure(self, user_config: dict) -> None:
        # Sync: Serve runs it in a worker thread while requests continue. Each slot keeps its old version if its
        # reload fails; the version protocol (serving/reload.py) keeps requests consistent either way.
        for stage in (self._local_encoder, self._local_retrieval):
            if stage is not None:
                stage.models.reload(user_config)
        self._catalogues.reload(user_config)

    def check_health(self) -> None:
        self._catalogues.loaded  # raise until an artifact is loaded
        for stage in (self._local_encoder, self._local_retrieval):
            if stage is not None:
                stage.models.loaded

    def __del__(self) -> None:
        store = getattr(self, "_store", None)  # absent when __init__ failed
        if store is not None:
            store.close()

    @rpc_method(ranking_pb2.RankResponse)
    async def Rank(self, request: ranking_pb2.RankRequest, grpc_context) -> ranking_pb2.RankResponse:
        clock = StageClock(self._metrics)
        catalogue = self._catalogues.current
        query = validate_rank_request(request, self._args.limits, catalogue.item_index_of, catalogue.behavior_names)
        user = await clock.time(STAGE_HISTORY, self._user_history(query, catalogue))
        if user.source in FALLBACK_SOURCES:
            ranked = clock.run(STAGE_FALLBACK, fallback_list, catalogue, query)
        else:
            excluded_ids = tuple(catalogue.item_ids[sorted(query.exclude_item_indices)])
            outcome = await self._batcher.submit(RankWork(query, user.history, excluded_ids))
            clock.extend(outcome.stages)
            ranked = outcome.ranked
        response = rank_response(ranked, query.request_id or uuid.uuid4().hex, user.source, clock)
        logger.debug("Rank %s user %r: %s, %d items, %.1f ms", response.request_id, query.user_id,
                     ranked.model_version, len(ranked.items), response.timings[-1].ms)
        return response

    @rpc_method(ranking_pb2.RecordEventsResponse)
    async def RecordEvents(self, request: ranking_pb2.RecordEventsRequest, grpc_context):
        catalogue = self._catalogues.current
        batch = validate_record_events_request(
            request, self._args.limits, catalogue.item_index_of, catalogue.behavior_names
        )
        result = await asyncio.to_thread(self._store.append, batch.users, batch.idempotency_key)  # fsyncs
        return ranking_pb2.RecordEventsResponse(
            accepted=result.accepted, stored=result.stored, duplicates_ignored=result.duplicates_ignored,
            idempotent_replay=result.idempotent_replay,
        )

    @rpc_method(ranking_pb2.GetModelInfoResponse)
    async def GetModelInfo(self, request: ranking_pb2.GetModelInfoRequest, grpc_context):
        return model_info(self._catalogues.current)

    @rpc_method(health_pb2.HealthCheckResponse, public=True)  # probes carry no token
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
                stored = await asyncio.to_thread(self._store.recent, query.user_id, limit)
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
        encode = [EncodeRequest(work.history) for work in works]
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
                             k=work.query.k, diversity=work.query.diversity)
            for work, user in zip(works, encoded)
        ]
        if self._reranker is None:
            return await self._retrieval.rank(requests)
        candidate_sets = await self._retrieval.retrieve(requests)
        return await self._reranker.rerank.remote([
            RerankRequest(candidates, request.k, request.diversity)
            for candidates, request in zip(candidate_sets, requests)
        ])
