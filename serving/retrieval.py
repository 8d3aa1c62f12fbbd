"""Candidate retrieval: pure exclusion helpers, the cold-start list, then the hnswlib deployment around them.

Exclusions (items seen, items the caller excludes) are applied after the index search rather than inside it,
so the index stays shared and read-only. To still return k items, the search over-fetches: see `fetch_size`.
Queries of concurrent requests run as one batched `knn_query`; by default the same replica then re-ranks
(`seqrank.serving.rerank.rerank`, a function call instead of another deployment hop). With `retrieval.num_shards` > 1
the index lives in RetrievalShard deployments (serving/shards.py) and this stage asks each shard for the same
over-fetch and merges, so exclusions and re-ranking work unchanged.

Exact search (`retrieval.search`, `use_exact_search`): up to EXACT_SEARCH_MAX_ITEMS trained items the batch's
queries are scored against every item vector in one float32 matrix product instead of the graph. It answers the
same question as the index (the best `fetch` items by inner product, exclusions applied afterwards), so everything
downstream is unchanged, with two differences that only make it more exact: with a transition prior the `fetch`
items are chosen by inner product + the prior's term after the newest item (the offline score, training/evaluate.py)
rather than by inner product alone, and ties go to the lower item index.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from itertools import compress
from typing import AbstractSet

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from seqrank.serving.batching import count_items, flatten, group_by_model, split
from seqrank.serving.catalogue import Catalogue, History
from seqrank.serving.config import RetrievalArgs
from seqrank.serving.filtered_search import FilterPolicy, filtered_top_k
from seqrank.serving.history import HistoryConfig, open_history_store, resolve_history_url
from seqrank.serving.live_catalogue import (
    BuiltOnce,
    CatalogueView,
    LiveItems,
    LiveItemsSync,
    ViewCache,
)
from seqrank.serving.messages import CandidateSet, RankedList, RetrievalRequest
from seqrank.serving.metrics import STAGE_RETRIEVE, ServingMetrics
from seqrank.serving.reload import ModelSlot
from seqrank.serving.rerank import rerank
from seqrank.serving.shards import RemoteShards
from seqrank.training.artifact import Artifact, ItemIndex
from seqrank.training.cold_items import placed_item_vectors
from seqrank.training.transitions import TransitionPrior


@dataclass(frozen=True)
class Candidates:
    """Retrieved items, best first."""

    item_indices: np.ndarray  # (n,) int64 internal item indices (1..num_items)
    scores: np.ndarray  # (n,) float64 inner product of user vector and item vector


MAX_HIDDEN_AS_EXCLUSIONS = 1000  # more hidden items than this: a filtered search instead of over-fetching past them

SEARCH_AUTO, SEARCH_EXACT, SEARCH_HNSW = "auto", "exact", "hnsw"  # `retrieval.search`
# `retrieval.search: auto` scores exactly up to this many trained items, and searches the graph beyond. Measured
# with `seqrank bench exact` (docs/benchmarks/retrieval.md, "Exact search against HNSW by catalogue size"): D = 256,
# one thread, fetch 200, against hnswlib M = 32 at ef 200 (the export defaults). One query per call (a lone
# request), exact search is as fast as the graph at 2,000 items (0.09-0.10 ms against 0.10-0.13 ms) and slower from
# 3,000 on (0.16-0.20 against 0.10-0.16 ms); in batches of 16 it stays faster per query up to 5,000 generated and
# past 12,000 trained item vectors, so this bound is where exact search wins for every batch size and recall is 1.
EXACT_SEARCH_MAX_ITEMS = 2048
EXACT_SCORE_BYTES = 1 << 26  # exact search scores at most this many bytes of (queries, items) at once


def use_exact_search(search: str, num_items: int, sharded: bool = False) -> bool:
    """Whether `retrieval.search` = `search` scores `num_items` trained items exactly. auto: exact up to
    EXACT_SEARCH_MAX_ITEMS, never with shards (they exist because the index is large; `exact` still answers from the
    merging replica's own item vectors, which it holds anyway)."""
    if search == SEARCH_EXACT:
        return True
    if search == SEARCH_HNSW:
        return False
    if search == SEARCH_AUTO:
        return not sharded and num_items <= EXACT_SEARCH_MAX_ITEMS
    raise ValueError(f"retrieval.search: expected one of auto, exact, hnsw, got {search!r}")


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


def exact_top_k(item_vectors: np.ndarray, queries: np.ndarray, fetch: int, num_items: int,
                allowed: np.ndarray | None = None,
                priors: list[tuple[np.ndarray, np.ndarray] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best `fetch` of items 1..num_items per query, exactly: (labels (B, f) int64, inner products (B, f) float64),
    best first, f = min(fetch, allowed count).

    item_vectors: (>= num_items + 1, D) float32, row 0 PAD; queries (B, D). allowed: (>= num_items + 1,) bool, one
    mask for every query (None: all). priors: per query None or (items, terms): a term added to those items' scores
    for choosing and ordering only (the transition prior after the newest item); the returned scores stay inner
    products. One float32 matrix product per chunk of queries, argpartition, then the chosen ones sorted; ties go to
    the lower label. Scores are float32 inner products (as precise as the index's), returned as float64.
    """
    if fetch < 1:
        raise ValueError(f"fetch: must be >= 1, got {fetch}")
    queries = np.asarray(queries, dtype=np.float32).reshape(-1, item_vectors.shape[1])
    items = item_vectors[1:num_items + 1]  # (N, D) a view: row r is item r + 1
    keep = None if allowed is None else np.asarray(allowed[1:num_items + 1], dtype=bool)
    count = min(fetch, num_items if keep is None else int(np.count_nonzero(keep)))
    labels = np.empty((len(queries), count), np.int64)
    scores = np.empty((len(queries), count), np.float64)
    if count == 0 or len(queries) == 0:
        return labels, scores
    chunk = max(1, EXACT_SCORE_BYTES // (4 * max(num_items, 1)))
    hidden = None if keep is None or keep.all() else ~keep
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        block = queries[start:stop] @ items.T  # (b, N) float32
        boosted = [] if priors is None else [(row, prior) for row, prior in enumerate(priors[start:stop])
                                             if prior is not None and len(prior[0])]
        selection = block.copy() if boosted else block  # what chooses and orders: with the prior's terms
        for row, (successors, terms) in boosted:
            selection[row, successors - 1] += terms
        if hidden is not None:
            selection[:, hidden] = -np.inf  # count <= allowed items: never chosen
        if len(block) == 1:  # one query (a lone request): 1-D operations cost half as much as the 2-D ones
            top = _best_positions_1d(selection[0], count)
            labels[start], scores[start] = top + 1, block[0, top]
            continue
        top = _best_positions(selection, count)  # (b, count) positions, unordered
        order = np.lexsort((top, -np.take_along_axis(selection, top, axis=1)), axis=-1)
        top = np.take_along_axis(top, order, axis=1)
        labels[start:stop], scores[start:stop] = top + 1, np.take_along_axis(block, top, axis=1)
    return labels, scores


def _best_positions_1d(scores: np.ndarray, count: int) -> np.ndarray:
    """(n,) -> (count,) positions of the `count` largest, best first, ties to the lower position."""
    n = len(scores)
    if count >= n:
        return np.argsort(-scores, kind="stable")
    top = np.argpartition(scores, n - count)[n - count:]
    chosen = scores[top]
    if np.count_nonzero(scores >= chosen.min()) > count:  # ties at the cut: choose among them by position
        top = np.argsort(-scores, kind="stable")[:count]
        chosen = scores[top]
    return top[np.lexsort((top, -chosen))]


def _best_positions(scores: np.ndarray, count: int) -> np.ndarray:
    """(b, n) -> (b, count) positions of the `count` largest per row (unordered); ties at the boundary go to the
    lower position."""
    n = scores.shape[1]
    if count >= n:
        return np.broadcast_to(np.arange(n), scores.shape).copy()
    top = np.argpartition(scores, n - count, axis=1)[:, n - count:]
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1, keepdims=True)  # (b, 1) the count-th best score
    # argpartition takes any of the scores tied with the count-th: a row with more such scores than places re-chooses
    tied = np.flatnonzero(np.count_nonzero(scores >= kth, axis=1) > count)
    if len(tied):
        top[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :count]
    return top


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
    artifact: Artifact | None = None  # for upserted items' vectors (its attribute embeddings)
    # (raw id, attribute values) -> that upserted item's vector under this model: a catalogue change (a hide, one
    # more upsert) re-embeds only the items it touched, not every upserted item.
    placed: dict = field(default_factory=dict, repr=False, compare=False)
    exact: bool = False  # unfiltered (and filtered) searches score item_vectors exactly instead of using the index

    @property
    def model_version(self) -> str:
        return self.catalogue.model_version

    @classmethod
    def from_artifact(cls, artifact: Artifact, ef: int | None, sharded: bool = False,
                      search: str = SEARCH_HNSW) -> LoadedIndex:
        """`search`: `retrieval.search`, resolved here for this artifact's size (`use_exact_search`). The index is
        loaded either way unless shards hold it (small where exact search is chosen by size, and `ef` stays
        switchable)."""
        index = None
        if not sharded:
            index = artifact.load_index(ef)
            index.set_num_threads(1)  # one query row per request: batch rows are cheap, threads would contend
        return cls(catalogue=Catalogue.from_artifact(artifact), index=index, item_vectors=artifact.item_vectors,
                   transitions=artifact.transitions, artifact=artifact,
                   exact=use_exact_search(search, artifact.num_items, sharded))


@dataclass(frozen=True)
class LiveIndex:
    """One model version seen through the live catalogue: the view (ids, hidden, attributes) and every item's
    vector, the artifact's rows first, then the upserted items' vectors from the model's attribute embeddings."""

    loaded: LoadedIndex
    view: CatalogueView
    item_vectors: np.ndarray  # (I+N+1, D) float32

    @property
    def num_trained(self) -> int:
        return self.loaded.catalogue.num_items


def build_live_index(loaded: LoadedIndex, view: CatalogueView, live: LiveItems) -> LiveIndex:
    if not len(view.new_items):
        return LiveIndex(loaded, view, loaded.item_vectors)
    keys = [(raw, live.attributes[raw]) for raw in view.new_items]
    missing = [key for key in keys if key not in loaded.placed]
    if missing:
        vectors = placed_item_vectors(loaded.artifact, [values for _, values in missing]).vectors
        loaded.placed.update(zip(missing, vectors.astype(np.float32, copy=False)))
    new_vectors = np.stack([loaded.placed[key] for key in keys])
    return LiveIndex(loaded, view, np.concatenate([loaded.item_vectors, new_vectors]))


@dataclass(frozen=True)
class IndexSearch:
    """One request's query, ready for the batched search. Exactly one way to find candidates applies: the
    caller's own (`given`), a filtered search (`allowed`), or the shared index with over-fetch (neither)."""

    live: LiveIndex
    user_vector: np.ndarray  # (D,)
    fetch: int  # neighbours to ask the index for so that num_candidates survive the exclusions
    excluded: np.ndarray  # (E,) distinct item indices never to return (the caller's, seen, hidden)
    num_candidates: int
    history: History  # the events this version knows
    history_items: np.ndarray  # (H,) their item indices
    given: np.ndarray | None = None  # (G,) the caller's candidate indices: scored exactly, no index
    allowed: np.ndarray | None = None  # (I+N+1,) bool: a filter (or many hidden items); excluded removed

    @property
    def loaded(self) -> LoadedIndex:
        return self.live.loaded


def exact_scores(item_vectors: np.ndarray, indices: np.ndarray, user_vector: np.ndarray) -> np.ndarray:
    """Inner products of the user vector with the given items' vectors, float64."""
    return item_vectors[indices].astype(np.float64) @ user_vector.astype(np.float64)


def top_by_score(labels: np.ndarray, scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` best (labels, scores), best first; ties keep their given order."""
    order = np.argsort(-scores, kind="stable")[:count]
    return labels[order], scores[order]


class RetrievalStage:
    """Retrieval for one replica, wherever it runs: the versioned index through the live catalogue, exclusions
    and filters, one knn_query per batch for the unfiltered requests.

    The Retrieval deployment wraps it; with `retrieval.placement: ingress` the ingress holds one itself and shares
    its catalogue sync. `prepare` does every per-request check, so the batched `search` only sees valid queries.
    """

    def __init__(self, args: RetrievalArgs, metrics: ServingMetrics, owner: str = "retrieval",
                 shards: RemoteShards | None = None, live: LiveItemsSync | None = None) -> None:
        self._metrics = metrics
        self._shards = shards  # None: this replica holds the whole index
        self._transition_candidates = args.transition_candidates
        self._filter_policy = FilterPolicy()
        self._ef = args.ef  # None: each artifact's ef_search
        self.live = live  # None: the artifact's catalogue as it is (no store)
        self._views = ViewCache()
        self._live_indexes: BuiltOnce[tuple[str, int], LiveIndex] = BuiltOnce()
        self.models: ModelSlot[LoadedIndex] = ModelSlot(
            owner, lambda artifact: LoadedIndex.from_artifact(artifact, args.ef, sharded=shards is not None,
                                                              search=args.search),
            metrics.observe_reload,
        )

    def live_index(self, loaded: LoadedIndex, catalogue_version: int = 0) -> LiveIndex:
        """`loaded` through the live catalogue at `catalogue_version` or later (built once, then cached)."""
        live = self.live.catch_up(catalogue_version) if self.live is not None else LiveItems()
        return self._live_indexes.get((loaded.model_version, live.version), lambda: build_live_index(
            loaded, self._views.view(loaded.catalogue, live), live))

    def prepare(self, request: RetrievalRequest) -> IndexSearch:
        """Resolves the model version (VersionUnavailable), the live catalogue, exclusions and filters; sizes the
        over-fetch."""
        live = self.live_index(self.models.resolve(request.user.model_version), request.catalogue_version)
        view = live.view
        history = _restrict(view, request.history)
        history_items = view.indices(history.item_ids)
        excluded = view.indices(request.exclude_item_ids)
        if request.exclude_seen:
            excluded = np.concatenate([excluded, history_items])
        hidden = view.hidden_items
        given = allowed = None
        if request.candidate_item_ids:
            given = view.indices(request.candidate_item_ids)
        elif request.include_any or request.exclude_any or len(hidden) > MAX_HIDDEN_AS_EXCLUSIONS:
            allowed = view.allowed(request.include_any, request.exclude_any)
            allowed[excluded] = False
        excluded = np.unique(np.concatenate([excluded, hidden]))
        fetch = fetch_size(request.num_candidates, int(np.count_nonzero(excluded <= live.num_trained)),
                           live.num_trained)
        return IndexSearch(live, request.user.user_vector, fetch, excluded, request.num_candidates, history,
                           history_items, given, allowed)

    def search(self, searches: list[IndexSearch]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(labels, inner products) per query from the trained items, best first: the caller's candidates scored
        exactly, filtered queries one by one, the rest one knn_query per model version in the batch."""
        self._metrics.observe_batch(STAGE_RETRIEVE, len(searches))
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(searches)  # type: ignore[list-item]
        plain = [position for position, search in enumerate(searches) if not self._searched_alone(search, results,
                                                                                                     position)]
        for loaded, positions, vectors, fetch in _model_groups(searches, plain):
            if loaded.exact:
                labels, scores = self._exact(searches, positions, vectors, fetch)
            else:
                labels, distances = loaded.index.knn_query(vectors, k=fetch)  # (b, fetch), best first
                scores = ip_scores(distances)
            _assign(results, searches, positions, labels, scores)
        return results

    async def search_async(self, searches: list[IndexSearch]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search`, or with shards one call per shard per model version in the batch, merged."""
        if self._shards is None:
            return self.search(searches)
        self._metrics.observe_batch(STAGE_RETRIEVE, len(searches))
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(searches)  # type: ignore[list-item]
        plain = [position for position, search in enumerate(searches) if not self._searched_alone(search, results,
                                                                                                     position)]
        for loaded, positions, vectors, fetch in _model_groups(searches, plain):
            if loaded.exact:  # `retrieval.search: exact`: this replica holds every item vector, the shards' answer
                labels, scores = self._exact(searches, positions, vectors, fetch)
            else:
                labels, scores = await self._shards.knn(loaded.model_version, vectors, fetch)  # (b, fetch)
            _assign(results, searches, positions, labels, scores)
        return results

    def _exact(self, searches: list[IndexSearch], positions: list[int], vectors: np.ndarray,
               fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """`exact_top_k` for one model version's queries, each with its prior after its newest item."""
        live = searches[positions[0]].live
        return exact_top_k(live.loaded.item_vectors, vectors, fetch, live.num_trained,
                           priors=[self._prior_of(searches[p]) for p in positions])

    @staticmethod
    def _prior_of(search: IndexSearch) -> tuple[np.ndarray, np.ndarray] | None:
        """The transition prior's (successors, terms) after the request's newest item, when it applies."""
        prior = search.loaded.transitions
        if prior is None or not prior.weight or not len(search.history_items) or \
                search.history_items[-1] > search.live.num_trained:
            return None
        return prior.successors_of(int(search.history_items[-1]))

    def _searched_alone(self, search: IndexSearch, results: list, position: int) -> bool:
        """Answers a request that needs no shared knn_query (caller candidates, a filter); False for the rest."""
        live = search.live
        if search.given is not None:
            trained = search.given[search.given <= live.num_trained]
            results[position] = (trained, exact_scores(live.item_vectors, trained, search.user_vector))
            return True
        if search.allowed is None:
            return False
        allowed = search.allowed[: live.num_trained + 1]
        k = min(search.num_candidates, int(allowed.sum()))
        if k == 0:
            results[position] = (np.zeros(0, np.int64), np.zeros(0))
        elif search.loaded.exact or search.loaded.index is None:  # sharded: the vectors are here, the index not
            labels, scores = exact_top_k(live.loaded.item_vectors, search.user_vector[None, :], k, live.num_trained,
                                         allowed, [self._prior_of(search)])
            results[position] = (labels[0], scores[0])
        else:
            ef = self._ef or search.loaded.artifact.index_params.ef_search
            labels, scores = filtered_top_k(search.loaded.index, live.loaded.item_vectors, search.user_vector[None, :],
                                            k, allowed, ef, self._filter_policy)
            results[position] = (labels[0].astype(np.int64), scores[0].astype(np.float64))
        return True

    def candidates(self, search: IndexSearch, labels: np.ndarray, scores: np.ndarray) -> CandidateSet:
        live = search.live
        loaded = live.loaded
        if search.given is not None:
            labels = np.concatenate([labels, search.given[search.given > live.num_trained]])
            scores = np.concatenate([scores, exact_scores(live.item_vectors, labels[len(scores):], search.user_vector)])
            if loaded.transitions is not None and len(search.history_items):
                scores = scores + _boost(loaded.transitions, int(search.history_items[-1]), labels, live.num_trained)
            labels, scores = top_by_score(labels, scores, len(labels))
        else:
            if loaded.transitions is not None and len(search.history_items) and \
                    search.history_items[-1] <= live.num_trained:
                labels, scores = add_transition_prior(labels, scores, search.user_vector, int(search.history_items[-1]),
                                                      loaded.transitions, loaded.item_vectors,
                                                      self._transition_candidates)
            new = np.arange(live.num_trained + 1, live.view.num_items + 1, dtype=np.int64)
            if len(new):  # upserted items: few next to the index, scored exactly and merged
                labels = np.concatenate([labels, new])
                scores = np.concatenate([scores, exact_scores(live.item_vectors, new, search.user_vector)])
                labels, scores = top_by_score(labels, scores, len(labels))
        if search.allowed is not None:
            keep = search.allowed[labels]
            labels, scores = labels[keep], scores[keep]
        candidates = filter_candidates(labels, scores, search.excluded, search.num_candidates)
        self._metrics.observe_retrieval(len(candidates.item_indices), int(np.isin(labels, search.excluded).sum()))
        return CandidateSet(
            model_version=loaded.model_version,
            item_ids=live.view.item_ids[candidates.item_indices],
            relevance=candidates.scores,
            item_vectors=live.item_vectors[candidates.item_indices],
            history=search.history,
            history_vectors=live.item_vectors[search.history_items],
        )

    def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        """prepare, search and filter in one go: for a caller that already holds the whole batch."""
        searches = [self.prepare(request) for request in requests]
        results = self.search(searches)
        return [self.candidates(search, labels, scores) for search, (labels, scores) in zip(searches, results)]


def _restrict(view: CatalogueView, history: History) -> History:
    """The events whose item the view knows (trained or upserted), in order."""
    keep = [raw in view.item_index_of for raw in history.item_ids]
    if all(keep):
        return history
    return History(tuple(compress(history.item_ids, keep)), tuple(compress(history.behaviors, keep)))


def _boost(prior: TransitionPrior, newest_item: int, labels: np.ndarray, num_trained: int) -> np.ndarray:
    """The prior's term for each label; items it never saw (upserted ones, beyond the artifact) get 0."""
    if newest_item > num_trained:
        return np.zeros(len(labels))
    boost = np.zeros(len(labels))
    trained = labels <= num_trained
    boost[trained] = prior.boost(newest_item, labels[trained])
    return boost


def _model_groups(searches: list[IndexSearch], positions: list[int]):
    """(loaded, positions, vectors (b, D), fetch) per model version among `positions`; fetch = the longest asked."""
    chosen = [searches[p] for p in positions]
    for loaded, group in group_by_model(chosen, lambda search: search.loaded):
        members = [positions[g] for g in group]
        fetch = max(searches[p].fetch for p in members)
        yield loaded, members, np.stack([searches[p].user_vector for p in members]), fetch


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

    def __init__(self, args: RetrievalArgs, history: HistoryConfig, *shards: DeploymentHandle) -> None:
        # The live catalogue comes from the history store the ingress writes it to: each replica polls it, and
        # catches up at once when a request names a newer version than it holds.
        self._store = open_history_store(resolve_history_url(history, os.environ))
        live = LiveItemsSync(self._store.items_since, history.catalogue_sync_ms / 1000.0, "retrieval")
        live.start(wait_s=history.busy_timeout_s)
        self._stage = RetrievalStage(args, ServingMetrics(), shards=RemoteShards(shards) if shards else None,
                                     live=live)
        self._search_batch.set_max_batch_size(args.max_batch_size)
        self._search_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        self._stage.models.reload(user_config)  # sync: Serve runs it in a worker thread while requests continue

    def check_health(self) -> None:
        self._stage.models.loaded  # raises until an artifact is loaded

    async def rank(self, requests: list[RetrievalRequest]) -> list[RankedList]:
        return rerank_all(await self.retrieve(requests), requests)

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[CandidateSet]:
        newest = max(request.catalogue_version for request in requests)
        await asyncio.to_thread(self._stage.live.catch_up, newest)  # off the event loop: a store read
        searches = [self._stage.prepare(request) for request in requests]  # VersionUnavailable before batching
        results = await self._search_batch(searches)
        return [self._stage.candidates(search, labels, scores) for search, (labels, scores) in zip(searches, results)]

    @serve.batch(batch_size_fn=count_items)
    async def _search_batch(self, calls: list[list[IndexSearch]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        return split(await self._stage.search_async(flatten(calls)), calls)
