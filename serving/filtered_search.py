"""Filtered top-k retrieval: the best k *allowed* items by inner product, exact for selective filters.

A caller restricts what may be shown ("only this category", "not this brand"): a boolean mask over the item
indices. Post-filtering the unfiltered top-k is wrong for such filters: at 0.5 % allowed, a top-100 holds about
half an allowed item, often none. `filtered_top_k` picks a strategy per call from the mask (`plan_search`):

- **exact** (at most `FilterPolicy.exact_max_items` allowed items, or a selectivity (allowed / I) at most
  `exact_max_fraction`, or any partial filter on an index that is not norm-augmented): one float32 matrix product
  over the allowed rows (`np.flatnonzero(allowed)`; over all rows, then masked, when more than half are allowed),
  argpartition, sort. Exact, and for narrow filters also the fastest: its cost is proportional to the allowed
  count, which is small exactly when graph search is expensive.
- **hnsw-filter** (wide filters on a norm-augmented index): hnswlib `knn_query(filter=...)`. hnswlib fills its
  result heap only with labels the filter passes and keeps expanding until it holds `ef` of them, so it visits
  about `ef / selectivity` nodes and calls the filter once per visited label, a Python call under the GIL
  (../shared/PLATFORM-NOTES.md, "1. Live catalogue (hnswlib)": k=5 at 10 % allowed made 90 calls; 200 queries on
  400×16 took 5.5 ms plain, 9.2 ms with an always-true filter, 13.3 ms at 10 %). Hence `num_threads=1` (threads
  would only queue for the GIL), a C-level callable (`bytes.__getitem__`, no Python frame), and exact scoring
  below the thresholds. The beam is widened for the filter (`FilterPolicy.beam_factor`): a filter correlated with
  the embedding (whole categories) makes the search cross disallowed regions, and needs about twice the beam of
  a random one for the same recall. hnswlib never returns short rows: with fewer than k reachable allowed labels
  it raises "Cannot return the results in a contiguous 2D array"; those queries are answered exactly instead.
- **hnsw** (everything allowed): plain `knn_query`, no filter callable.

Why not filtered graph search on a plain inner-product index: there, items with short vectors get few in-links
(their neighbours are the long vectors), and a measurable share is unreachable from the entry point, so under a
filter that leaves mostly such items no beam finds them: at 100k items, filtered HNSW on the plain index reached
recall@10 0.96 (random 5 %), 0.81 (random 0.5 %), 0.96 (whole clusters, 40 %) and 0.90 (clusters, 4 %) at beams
1,600-4,096, where the norm-augmented index reached 0.99-1.00 (docs/benchmarks/retrieval.md, "Filtered
retrieval"); at 20k items the random 5 % case stayed at 0.98 from ef 100 to 1,600. Unfiltered search rarely
notices, as those items are rarely anyone's top-k. `graph_filter_plain_index` opts in anyway.

Scores are always recomputed as `query · item_vectors[label]` (float32), so both paths report the same numbers
and hnswlib's `1 - <q, x>` rounding never reorders anything; ties go to the lower label.

What the mask must say: `allowed` has one entry per item index 0..I, `allowed[0]` (PAD) False. Items hidden in
the index with `mark_deleted` (sold out) are invisible to hnswlib but not to the exact path, which only reads
`allowed`: fold them into the mask (allowed=False) so the two paths agree. The index must hold items 1..I (an
unsharded `ItemIndex`); a shard's index holds a subset, so AND its membership into the mask.

Thread safety: hnswlib's beam (`ef`) is state of the index, not of a query. Each call sets the beam it needs and
restores the previous one under a lock per index, so concurrent calls of this function on one index take turns
in hnswlib (the filtered ones hold the GIL for their callbacks anyway); a plain `knn_query` by other code on the
same index during such a call searches with the temporary beam (wider or narrower, never wrong labels).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from seqrank.training.artifact import ItemIndex, augment_queries
from seqrank.training.vocab import PAD_INDEX

EXACT = "exact"
HNSW_FILTER = "hnsw-filter"
HNSW = "hnsw"
EMPTY = "empty"  # nothing allowed: (B, 0) results
STRATEGIES = (EXACT, HNSW_FILTER, HNSW, EMPTY)

SHORT_ROWS_ERROR = "Cannot return the results in a contiguous 2D array"  # hnswlib 0.8.0, fewer than k hits


@dataclass(frozen=True)
class FilterPolicy:
    """When to score exactly and how wide to search the graph under a filter. The defaults, measured at dim 64
    on one CPU-2 core (docs/benchmarks/retrieval.md, "Filtered retrieval"):

    exact_max_items = 64,000: exact scoring costs about 0.06 µs per allowed item and query (gather + mat-vec; 2.9 ms
        for 50k of 100k items), filtered HNSW about 1.5 µs per visited node (filter call + distance) and it visits
        about beam / selectivity nodes: at 100k items it lost to exact scoring at every filter measured (50 %
        random: 4.8 ms against 2.9 ms; 40 % whole clusters: 13 ms against 2.8 ms; 5 %: 60-100 ms against 0.5 ms).
        By those two costs they meet near 64k allowed items of 100k (an estimate: at 50 % exact still won).
    exact_max_fraction = 0.25: the graph's cost rises like 1 / selectivity² (its beam grows as the filter narrows)
        whatever the catalogue's size, exact scoring's like selectivity × I; by the per-item and per-visit costs
        above (an extrapolation, not measured at 1M) they meet near 25 % of a 1M catalogue. Beyond a few million
        items exact scoring at 25 % gets slower than the graph: lower this there.
    beam_factor = 80, max_ef = 4096: the filtered beam is max(ef, ceil(beam_factor * k / selectivity)), at most
        max_ef, at least k: 1,600 for k = 10 at 50 % allowed. At 100k items a whole-cluster (correlated) filter of
        40 % reached recall@10 0.956 at ef 400, 0.982 at 800, 0.990 at 1,600 and 0.9925 at its 1,987; a random 50 %
        filter 0.987 at 400 and 0.997 at 800. The cap bounds one query's work.
    graph_filter_plain_index = False: on an index that is not norm-augmented every partial filter is scored
        exactly (module docstring: unreachable items, no beam helps); True allows filtered HNSW there too.
    exact_chunk_bytes = 64 MiB: the exact path scores at most this many bytes of (queries, items) at once.
    """

    exact_max_items: int = 64_000
    exact_max_fraction: float = 0.25
    beam_factor: float = 80.0
    max_ef: int = 4096
    graph_filter_plain_index: bool = False
    exact_chunk_bytes: int = 1 << 26

    def __post_init__(self) -> None:
        if self.exact_max_items < 0:
            raise ValueError(f"exact_max_items: must be >= 0, got {self.exact_max_items}")
        if not 0.0 <= self.exact_max_fraction <= 1.0:
            raise ValueError(f"exact_max_fraction: must be in [0, 1], got {self.exact_max_fraction}")
        if not self.beam_factor > 0:
            raise ValueError(f"beam_factor: must be > 0, got {self.beam_factor}")
        if self.max_ef < 1:
            raise ValueError(f"max_ef: must be >= 1, got {self.max_ef}")
        if self.exact_chunk_bytes < 1:
            raise ValueError(f"exact_chunk_bytes: must be >= 1, got {self.exact_chunk_bytes}")


@dataclass(frozen=True)
class FilterPlan:
    """What `filtered_search` will do for one mask: the strategy, the beam (HNSW strategies) and k'."""

    strategy: str  # one of STRATEGIES
    num_allowed: int
    num_items: int
    k: int  # k' = min(k, num_allowed)
    ef: int | None  # hnswlib beam for the HNSW strategies; None for exact / empty

    @property
    def selectivity(self) -> float:
        return self.num_allowed / self.num_items if self.num_items else 0.0


@dataclass(frozen=True)
class FilteredResult:
    labels: np.ndarray  # (B, k') int64 item indices, best first
    scores: np.ndarray  # (B, k') float32 query · item vector
    plan: FilterPlan
    exact_fallbacks: int  # queries the HNSW strategies handed to exact search (hnswlib found fewer than k')


def plan_search(num_allowed: int, num_items: int, k: int, ef: int, policy: FilterPolicy,
                norm_augmented: bool) -> FilterPlan:
    """The strategy for `num_allowed` of `num_items` items over an index that is (not) norm-augmented (pure; see
    the module docstring and `FilterPolicy`)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if ef < 1:
        raise ValueError(f"ef: must be >= 1, got {ef}")
    if not 0 <= num_allowed <= num_items:
        raise ValueError(f"num_allowed: must be in [0, {num_items}], got {num_allowed}")
    k_eff = min(k, num_allowed)
    if num_allowed == 0:
        return FilterPlan(EMPTY, 0, num_items, 0, None)
    if num_allowed == num_items:
        return FilterPlan(HNSW, num_allowed, num_items, k_eff, max(ef, k_eff))
    selectivity = num_allowed / num_items
    if (num_allowed <= policy.exact_max_items or selectivity <= policy.exact_max_fraction
            or not (norm_augmented or policy.graph_filter_plain_index)):
        return FilterPlan(EXACT, num_allowed, num_items, k_eff, None)
    widened = math.ceil(policy.beam_factor * k_eff / selectivity)
    return FilterPlan(HNSW_FILTER, num_allowed, num_items, k_eff, max(min(max(ef, widened), policy.max_ef), k_eff))


def filtered_top_k(index: ItemIndex, item_vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray,
                   ef: int, policy: FilterPolicy = FilterPolicy()) -> tuple[np.ndarray, np.ndarray]:
    """The top-k allowed items per query by inner product, best first: (labels (B, k') int64, scores (B, k')
    float32), k' = min(k, allowed count). `allowed`: (I+1,) bool, allowed[0] (PAD) False. `ef`: the hnswlib beam
    for the HNSW strategies (widened under a filter, see `FilterPolicy`)."""
    result = filtered_search(index, item_vectors, queries, k, allowed, ef, policy)
    return result.labels, result.scores


def filtered_search(index: ItemIndex, item_vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray,
                    ef: int, policy: FilterPolicy = FilterPolicy()) -> FilteredResult:
    """`filtered_top_k` with what it did: the plan and how many queries fell back to exact search."""
    item_vectors, queries, allowed = _checked(item_vectors, queries, allowed)
    num_items = item_vectors.shape[0] - 1
    plan = plan_search(int(np.count_nonzero(allowed)), num_items, k, ef, policy, index.norm_augmented)
    if plan.strategy == EMPTY:
        return FilteredResult(np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32), plan, 0)
    if plan.strategy == EXACT or len(queries) == 0:
        labels, scores = _exact(item_vectors, queries, plan.k, allowed, policy.exact_chunk_bytes)
        return FilteredResult(labels, scores, plan, 0)
    # bytes.__getitem__: a C method returning 0/1, the cheapest callable hnswlib can call per visited label.
    accept = None if plan.strategy == HNSW else bytes(allowed.view(np.uint8)).__getitem__
    labels, failed = _hnsw(index, queries, plan.k, plan.ef, accept)
    scores = np.empty(labels.shape, np.float32)
    ok = np.flatnonzero(~failed)
    if len(ok):
        labels[ok], scores[ok] = _sorted_by_score(labels[ok], _scores_of(item_vectors, queries[ok], labels[ok]))
    if failed.any():
        labels[failed], scores[failed] = _exact(item_vectors, queries[failed], plan.k, allowed,
                                                policy.exact_chunk_bytes)
    return FilteredResult(labels, scores, plan, int(failed.sum()))


def exact_top_k_allowed(item_vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray,
                        chunk_bytes: int = FilterPolicy.exact_chunk_bytes) -> tuple[np.ndarray, np.ndarray]:
    """Exact filtered search, the oracle-like path: (labels (B, k') int64, scores (B, k') float32), best first,
    ties to the lower label; k' = min(k, allowed count). One matrix product over the allowed rows per chunk of
    queries of at most `chunk_bytes` of scores."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    item_vectors, queries, allowed = _checked(item_vectors, queries, allowed)
    return _exact(item_vectors, queries, min(k, int(np.count_nonzero(allowed))), allowed, chunk_bytes)


# ---- internals ----------------------------------------------------------------------------------------------

def _checked(item_vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray):
    item_vectors = np.asarray(item_vectors)
    if item_vectors.ndim != 2 or item_vectors.dtype != np.float32:
        raise ValueError(f"item_vectors: expected (I+1, D) float32, got {item_vectors.shape} {item_vectors.dtype}")
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != item_vectors.shape[1]:
        raise ValueError(f"queries: expected (B, {item_vectors.shape[1]}), got {queries.shape}")
    allowed = np.asarray(allowed)
    if allowed.dtype != np.bool_ or allowed.shape != (item_vectors.shape[0],):
        raise ValueError(f"allowed: expected ({item_vectors.shape[0]},) bool, got {allowed.shape} {allowed.dtype}")
    if allowed[PAD_INDEX]:
        raise ValueError(f"allowed[{PAD_INDEX}] is True: the PAD index is never an item")
    return item_vectors, queries, allowed


def _exact(item_vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray,
           chunk_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    if k == 0 or len(queries) == 0:
        return labels, scores
    rows = np.flatnonzero(allowed)  # (n,) ascending item indices
    masked = 2 * len(rows) > len(allowed)  # wide filter: score every row in place, cheaper than gathering most
    if masked:
        rows, candidates = np.arange(len(allowed)), item_vectors
    else:
        candidates = item_vectors[rows]  # (n, D): one gather per call, shared by every query
    chunk = max(1, chunk_bytes // (4 * len(rows)))
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk] @ candidates.T  # (b, n) float32
        if masked:
            block[:, ~allowed] = -np.inf  # k <= allowed count: never picked
        top = _top_positions(block, k)  # (b, k) positions into rows
        labels[start:start + chunk], scores[start:start + chunk] = _sorted_by_score(
            rows[top], np.take_along_axis(block, top, axis=1))
    return labels, scores


def _top_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """(b, n) -> (b, k) positions of the k largest per row, ties at the boundary going to the lower position."""
    n = scores.shape[1]
    if k >= n:
        return np.broadcast_to(np.arange(n), scores.shape).copy()
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, top, axis=1)  # (b, k)
    kth = picked.min(axis=1, keepdims=True)  # (b, 1) the k-th best score
    # argpartition picks among scores tied with the k-th in no set order: redo those rows with a stable sort.
    tied = np.flatnonzero((scores == kth).sum(axis=1) > (picked == kth).sum(axis=1))
    if len(tied):
        top[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return top


def _sorted_by_score(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by score descending, then label ascending."""
    order = np.lexsort((labels, -scores), axis=-1)
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _scores_of(item_vectors: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.einsum("bkd,bd->bk", item_vectors[labels], queries).astype(np.float32, copy=False)


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_of(index: ItemIndex) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(index)
        if lock is None:
            lock = _locks[index] = threading.Lock()
        return lock


def _hnsw(index: ItemIndex, queries: np.ndarray, k: int, ef: int, accept) -> tuple[np.ndarray, np.ndarray]:
    """(labels (B, k) int64, failed (B,) bool): hnswlib's answer per query; failed rows (short: fewer than k
    allowed labels reachable) hold zeros and are for the caller to answer exactly."""
    raw = index.index
    vectors = augment_queries(queries) if index.norm_augmented else queries
    labels = np.zeros((len(queries), k), np.int64)
    failed = np.zeros(len(queries), bool)
    with _lock_of(index):
        previous = raw.ef
        raw.set_ef(ef)
        try:
            try:
                found, _ = raw.knn_query(vectors, k=k, num_threads=1, filter=accept)
                labels[:] = found
            except RuntimeError as exc:  # one short row fails the whole batch: find which, one query at a time
                if SHORT_ROWS_ERROR not in str(exc):
                    raise
                for row in range(len(vectors)):
                    try:
                        found, _ = raw.knn_query(vectors[row:row + 1], k=k, num_threads=1, filter=accept)
                        labels[row] = found[0]
                    except RuntimeError as row_exc:
                        if SHORT_ROWS_ERROR not in str(row_exc):
                            raise
                        failed[row] = True
        finally:
            raw.set_ef(previous)
    return labels, failed
