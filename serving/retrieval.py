"""Candidate retrieval: pure exclusion helpers, the cold-start list, then the hnswlib deployment around them.

Exclusions (items seen, items the caller excludes) are applied after the index search rather than inside it,
so the index stays shared and read-only. To still return k items, the search over-fetches: see `fetch_size`.
Queries of concurrent requests run as one batched `knn_query`; by default the same replica then re-ranks
(`seqrank.serving.rerank.rerank`, a function call instead of another deployment hop). With `retrieval.num_shards` > 1
the index lives in RetrievalShard deployments (serving/shards.py) and this stage asks each shard for the same
over-fetch and merges, so exclusions and re-ranking work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from seqrank.serving.batching import count_items, flatten, group_by_model, split
from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.config import RetrievalArgs
from seqrank.serving.messages import CandidateSet, RankedList, RetrievalRequest
from seqrank.serving.metrics import STAGE_RETRIEVE, ServingMetrics
from seqrank.serving.reload import ModelSlot
from seqrank.serving.rerank import rerank
from seqrank.serving.shards import RemoteShards
from seqrank.training.artifact import Artifact, ItemIndex
from seqrank.training.transitions import TransitionPrior


@dataclass(frozen=True)
class Candidates:
    """Retrieved items, best first."""

    item_indices: np.ndarray  # (n,) int64 internal item indices (1..num_items)
    scores: np.ndarray  # (n,) float64 inner product of user vector and item vector


def fetch_size(k: int, num_excluded: int, num_items: int) -> int:
    """How many neighbours to ask the index for so that k survive the exclusions.

    Any `k + num_excluded` distinct items hold at least k non-excluded ones, whatever the (approximate) index
    returns, so no second search is needed. Capped at the catalogue size (hnswlib refuses more); then fewer than
    k remain only when the catalogue minus the exclusions holds fewer than k items.
    `num_excluded` counts distinct excluded items that are in the index.
    """
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if num_excluded < 0:
        raise ValueError(f"num_excluded: must be >= 0, got {num_excluded}")
    if num_items < 1:
        raise ValueError(f"num_items: must be >= 1, got {num_items}")
    return min(k + num_excluded, num_items)


def ip_scores(distances: np.ndarray) -> np.ndarray:
    """hnswlib "ip" space reports distance = 1 - <u, v>; this returns <u, v> as float64."""
    return 1.0 - np.asarray(distances, dtype=np.float64)


def filter_candidates(
    labels: np.ndarray, scores: np.ndarray, excluded: AbstractSet[int] | np.ndarray, k: int
) -> Candidates:
    """Drops excluded labels and keeps the first k of the rest, in their given (best-first) order.

    labels, scores: (F,) from one index query. Returns at most k candidates.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, got {labels.shape} and {scores.shape}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if isinstance(excluded, np.ndarray):
        excluded_array = excluded.astype(np.int64, copy=False).reshape(-1)
    else:
        excluded_array = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
    keep = np.flatnonzero(~np.isin(labels, excluded_array))[:k]  # positions, still in order
    return Candidates(item_indices=labels[keep], scores=scores[keep])


def add_transition_prior(labels: np.ndarray, scores: np.ndarray, user_vector: np.ndarray, newest_item: int,
                         prior: TransitionPrior, item_vectors: np.ndarray, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's (labels, inner products) with the prior's term after `newest_item` added, re-sorted best first.

    Up to `extra` of the newest item's most frequent successors join the candidates (scored exactly) even where
    the index did not return them, so a strong transition is not lost to the index's top list. The scores are
    then what offline evaluation ranks by: inner product + weight * log(1 + count).
    """
    successors, _ = prior.successors_of(newest_item, extra)
    missing = successors[~np.isin(successors, labels)]
    labels = np.concatenate([np.asarray(labels, dtype=np.int64), missing])
    scores = np.concatenate([scores, item_vectors[missing] @ user_vector.astype(np.float64)])
    scores = scores + prior.boost(newest_item, labels)
    order = np.argsort(-scores, kind="stable")
    return labels[order], scores[order]


def popular_candidates(catalogue: Catalogue, excluded: np.ndarray, k: int) -> Candidates:
    """The cold-start list: the k most trained-on items that are not excluded; scores are event counts."""
    fetched = catalogue.popular_items[: fetch_size(k, len(excluded), catalogue.num_items)]
    return filter_candidates(fetched, catalogue.item_popularity[fetched], excluded, k)


def excluded_indices(catalogue: Catalogue, exclude_item_ids: tuple[str, ...], seen: np.ndarray | None) -> np.ndarray:
    """Distinct item indices never to return: the known excluded ids plus, when given, the seen items."""
    excluded = catalogue.item_indices(exclude_item_ids)
    if seen is not None:
        excluded = np.concatenate([excluded, seen])
    return np.unique(excluded)


@dataclass(frozen=True)
class LoadedIndex:
    """One model version's retrieval state, built completely before it is swapped in."""

    catalogue: Catalogue
    index: ItemIndex | None  # hnswlib over items 1..I, read-only once built; None when shards hold it
    item_vectors: np.ndarray  # (I+1, D) float32
    transitions: TransitionPrior | None = None  # the artifact's item-to-item prior, when it has one

    @property
    def model_version(self) -> str:
        return self.catalogue.model_version

    @classmethod
    def from_artifact(cls, artifact: Artifact, ef: int | None, sharded: bool = False) -> LoadedIndex:
        index = None
        if not sharded:
            index = artifact.load_index(ef)
            index.set_num_threads(1)  # one query row per request: batch rows are cheap, threads would contend
        return cls(catalogue=Catalogue.from_artifact(artifact), index=index, item_vectors=artifact.item_vectors,
                   transitions=artifact.transitions)


@dataclass(frozen=True)
class IndexSearch:
    """One request's query, ready for the batched index search."""

    loaded: LoadedIndex
    user_vector: np.ndarray  # (D,)
    fetch: int  # neighbours to ask for so that num_candidates survive the exclusions
    excluded: np.ndarray  # (E,) distinct item indices
    num_candidates: int
    history: History  # the events this version knows
    history_items: np.ndarray  # (H,) their item indices


class RetrievalStage:
    """Retrieval for one replica, wherever it runs: the versioned index, exclusions, one knn_query per batch.

    The Retrieval deployment wraps it; with `retrieval.placement: ingress` the ingress holds one itself.
    `prepare` does every per-request check, so the batched `search` only sees valid queries.
    """

    def __init__(self, args: RetrievalArgs, metrics: ServingMetrics, owner: str = "retrieval",
                 shards: RemoteShards | None = None) -> None:
        self._metrics = metrics
        self._shards = shards  # None: this replica holds the whole index
        self._transition_candidates = args.transition_candidates
        self.models: ModelSlot[LoadedIndex] = ModelSlot(
            owner, lambda artifact: LoadedIndex.from_artifact(artifact, args.ef, sharded=shards is not None),
            metrics.observe_reload,
        )

    def prepare(self, request: RetrievalRequest) -> IndexSearch:
        """Resolves the model version (VersionUnavailable) and the exclusions; sizes the over-fetch."""
        loaded = self.models.resolve(request.user.model_version)
        catalogue = loaded.catalogue
        history = catalogue.restrict(request.history)
        history_items, _ = catalogue.history_indices(history)
        seen = history_items if request.exclude_seen else None
        excluded = excluded_indices(catalogue, request.exclude_item_ids, seen)
        fetch = fetch_size(request.num_candidates, len(excluded), catalogue.num_items)
        return IndexSearch(loaded, request.user.user_vector, fetch, excluded, request.num_candidates, history,
                       history_items)

    def search(self, searches: list[IndexSearch]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(labels, inner products) per query, best first: one knn_query per model version in the batch."""
        self._metrics.observe_batch(STAGE_RETRIEVE, len(searches))
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(searches)  # type: ignore[list-item]
        for loaded, positions, vectors, fetch in _model_groups(searches):
            labels, distances = loaded.index.knn_query(vectors, k=fetch)  # (b, fetch), best first
            _assign(results, searches, positions, labels, ip_scores(distances))
        return results

    async def search_async(self, searches: list[IndexSearch]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search`, or with shards one call per shard per model version in the batch, merged."""
        if self._shards is None:
            return self.search(searches)
        self._metrics.observe_batch(STAGE_RETRIEVE, len(searches))
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(searches)  # type: ignore[list-item]
        for loaded, positions, vectors, fetch in _model_groups(searches):
            labels, scores = await self._shards.knn(loaded.model_version, vectors, fetch)  # (b, fetch)
            _assign(results, searches, positions, labels, scores)
        return results

    def candidates(self, search: IndexSearch, labels: np.ndarray, scores: np.ndarray) -> CandidateSet:
        loaded = search.loaded
        if loaded.transitions is not None and len(search.history_items):
            labels, scores = add_transition_prior(labels, scores, search.user_vector, int(search.history_items[-1]),
                                                  loaded.transitions, loaded.item_vectors, self._transition_candidates)
        candidates = filter_candidates(labels, scores, search.excluded, search.num_candidates)
        self._metrics.observe_retrieval(len(candidates.item_indices), int(np.isin(labels, search.excluded).sum()))
        return CandidateSet(
            model_version=loaded.model_version,
            item_ids=loaded.catalogue.item_ids[candidates.item_indices],
            relevance=candidates.scores,
            item_vectors=loaded.item_vectors[candidates.item_indices],
            history=search.history,
            history_vectors=loaded.item_vectors[search.history_items],
        )

    def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        """prepare, search and filter in one go: for a caller that already holds the whole batch."""
        searches = [self.prepare(request) for request in requests]
        results = self.search(searches)
        return [self.candidates(search, labels, scores) for search, (labels, scores) in zip(searches, results)]


def _model_groups(searches: list[IndexSearch]):
    """(loaded, positions, vectors (b, D), fetch) per model version in the batch; fetch = the longest asked."""
    for loaded, positions in group_by_model(searches, lambda search: search.loaded):
        fetch = max(searches[p].fetch for p in positions)
        yield loaded, positions, np.stack([searches[p].user_vector for p in positions]), fetch


def _assign(results: list, searches: list[IndexSearch], positions: list[int], labels: np.ndarray,
            scores: np.ndarray) -> None:
    for row, position in enumerate(positions):
        own = searches[position].fetch  # a longer beam's first `own` results are at least as good
        results[position] = (labels[row, :own].astype(np.int64), scores[row, :own])


def rerank_all(candidate_sets: list[CandidateSet], requests: list[RetrievalRequest]) -> list[RankedList]:
    return [rerank(candidates, request.k, request.diversity) for candidates, request in zip(candidate_sets, requests)]


@serve.deployment(max_ongoing_requests=64)
class Retrieval:
    """The retrieval stage as its own deployment (`retrieval.placement: deployment`); `rank` also re-ranks
    (rerank.placement: retrieval), `retrieve` stops at candidates for the Reranker deployment. Given shard
    handles (`retrieval.num_shards` > 1) it holds no index itself and merges the shards' answers."""

    def __init__(self, args: RetrievalArgs, *shards: DeploymentHandle) -> None:
        self._stage = RetrievalStage(args, ServingMetrics(), shards=RemoteShards(shards) if shards else None)
        self._search_batch.set_max_batch_size(args.max_batch_size)
        self._search_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        self._stage.models.reload(user_config)  # sync: Serve runs it in a worker thread while requests continue

    def check_health(self) -> None:
        self._stage.models.loaded  # raises until an artifact is loaded

    async def rank(self, requests: list[RetrievalRequest]) -> list[RankedList]:
        return rerank_all(await self.retrieve(requests), requests)

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        searches = [self._stage.prepare(request) for request in requests]  # VersionUnavailable before batching
        results = await self._search_batch(searches)
        return [self._stage.candidates(search, labels, scores) for search, (labels, scores) in zip(searches, results)]

    @serve.batch(batch_size_fn=count_items)
    async def _search_batch(self, calls: list[list[IndexSearch]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        return split(await self._stage.search_async(flatten(calls)), calls)
