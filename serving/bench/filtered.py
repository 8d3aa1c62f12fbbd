"""`seqrank bench filtered`: filtered top-k (`seqrank.serving.filtered_search`) against exact filtered search.

The catalogue and queries are `seqrank bench ann`'s (the Zipf-sized Gaussian mixture, queries held out of it);
one hnswlib "ip" index is built per index kind (plain, or norm-augmented as `seqrank export --norm-augment`
builds it) through `training.artifact.build_hnsw_index`, exactly as serving loads it. Masks, each with a fixed
seed: "random" (each item allowed with probability p) and "cluster" (whole mixture clusters allowed until about
p of the items are: the correlated case, where a query's own region is usually disallowed and graph search must
travel to the allowed clusters). For every mask:

- the policy's choice (`plan_search`) and what it returns: recall@10 against `exact_top_k_allowed` (the truth),
  mean milliseconds per query (one call per query, as a request sees it; best of `repeats` passes), and that
  time over unfiltered HNSW's on the same index in the same run;
- both strategies forced, side by side (exact scoring of the allowed rows; filtered HNSW with the policy's beam),
  so the thresholds can be read off the same table.

Everything runs on one thread (BLAS held to one by threadpoolctl, hnswlib told one), so times compare
strategies, not cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from seqrank.serving.bench.ann import ITEMS_PER_CLUSTER, clustered_vectors, one_thread, recall_at_k, split_queries
from seqrank.serving.filtered_search import (
    EXACT,
    HNSW_FILTER,
    FilterPolicy,
    exact_top_k_allowed,
    filtered_search,
    plan_search,
)
from seqrank.training.artifact import IndexParams, build_hnsw_index
from seqrank.training.vocab import PAD_INDEX

logger = logging.getLogger(__name__)

INDEX_KINDS = ("plain", "aug")  # aug: norm-augmented (IndexParams.norm_augmented)
MASK_KINDS = ("random", "cluster")
FORCE_EXACT = {"exact_max_items": 2**62, "exact_max_fraction": 1.0}
FORCE_HNSW = {"exact_max_items": 0, "exact_max_fraction": 0.0, "graph_filter_plain_index": True}


# ---- masks (pure) -------------------------------------------------------------------------------------------

def mixture_clusters(num_vectors: int, seed: int) -> np.ndarray:
    """(num_vectors,) the mixture cluster of each row of `clustered_vectors(num_vectors, dim, seed)`: its first
    draw, repeated (tests/serving/test_filtered_search.py checks that rows of one cluster share a centre)."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_vectors // ITEMS_PER_CLUSTER)
    shares = 1.0 / np.arange(1, num_clusters + 1)
    return rng.choice(num_clusters, size=num_vectors, p=shares / shares.sum())


def random_mask(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """(I+1,) bool: each item allowed with probability `fraction`; PAD never."""
    allowed = np.zeros(num_items + 1, bool)
    allowed[PAD_INDEX + 1:] = np.random.default_rng(seed).random(num_items) < fraction
    return allowed


def cluster_mask(clusters: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(I+1,) bool: whole clusters (`clusters`: (I,) cluster of item 1..I), in a seeded random order, each taken
    if it keeps the total within 1.25 × `fraction` of the items, until at least 0.8 × of them are allowed."""
    num_items = len(clusters)
    target = fraction * num_items
    sizes = np.bincount(clusters)
    chosen, count = [], 0
    for cluster in np.random.default_rng(seed).permutation(len(sizes)):
        if count >= 0.8 * target:
            break
        if sizes[cluster] and count + sizes[cluster] <= 1.25 * target:
            chosen.append(cluster)
            count += int(sizes[cluster])
    if not chosen:  # every cluster is larger than the target: the smallest one
        chosen = [int(np.argmin(np.where(sizes > 0, sizes, num_items + 1)))]
    allowed = np.zeros(num_items + 1, bool)
    allowed[PAD_INDEX + 1:] = np.isin(clusters, chosen)
    return allowed


# ---- measurement --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    recall_at_10: float
    ms_per_query: float  # mean over single-query calls, best pass
    fallbacks: int  # queries the HNSW strategies answered exactly (hnswlib found fewer than k)


def measure(search: Callable[[np.ndarray], tuple[np.ndarray, int]], queries: np.ndarray, truth: np.ndarray,
            repeats: int) -> Measured:
    """`search(one query (1, D)) -> (labels (1, k), fallbacks)` called once per query; labels of the first pass
    give recall@10 against `truth`, the fastest pass the time."""
    best_s = float("inf")
    labels, fallbacks = [], 0
    for attempt in range(repeats):
        started = time.perf_counter()
        for row in range(len(queries)):
            found, fell_back = search(queries[row:row + 1])
            if attempt == 0:
                labels.append(found[0])
                fallbacks += fell_back
        best_s = min(best_s, time.perf_counter() - started)
    k = min(10, truth.shape[1])
    return Measured(recall_at_k(np.stack(labels), truth, k), best_s * 1000.0 / len(queries), fallbacks)


@dataclass(frozen=True)
class Row:
    index: str  # plain / aug
    mask: str  # all, random, cluster
    target: float  # asked selectivity
    selectivity: float  # allowed / items
    allowed: int
    chosen: str  # the policy's strategy
    ef: int | None  # the policy's hnswlib beam (None: exact)
    recall_at_10: float  # the policy's answer against exact filtered search
    ms_per_query: float
    vs_unfiltered: float  # ms_per_query / unfiltered HNSW ms_per_query, same index, same run
    fallbacks: int
    exact_ms: float | None  # forced exact scoring (None: not measured)
    hnsw_recall_at_10: float | None  # forced filtered HNSW with the policy's beam
    hnsw_ms: float | None
    hnsw_ef: int | None


def bench_index(kind: str, items: np.ndarray, queries: np.ndarray, clusters: np.ndarray, *, k: int, ef: int, M: int,
                ef_construction: int, build_threads: int, selectivities: list[float], mask_kinds: list[str],
                policy: FilterPolicy, compare: bool, repeats: int, seed: int,
                on_row: Callable[[Row], None] = lambda row: None) -> tuple[list[Row], float]:
    """Builds one index (`kind`: plain or aug), then measures unfiltered search and every mask; (rows, build s)."""
    item_vectors = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])  # row PAD_INDEX: zeros
    num_items = len(items)
    started = time.perf_counter()
    index = build_hnsw_index(item_vectors, IndexParams(M=M, ef_construction=ef_construction, ef_search=ef,
                                                       norm_augmented=kind == "aug"), num_threads=build_threads)
    build_s = time.perf_counter() - started
    logger.info("%s: built %d items in %.1f s", kind, num_items, build_s)
    index.set_num_threads(1)

    def strategy(allowed: np.ndarray, chosen_policy: FilterPolicy):
        def search(query: np.ndarray) -> tuple[np.ndarray, int]:
            result = filtered_search(index, item_vectors, query, k, allowed, ef, chosen_policy)
            return result.labels, result.exact_fallbacks
        return search

    rows = []
    with one_thread():
        everything = np.ones(num_items + 1, bool)
        everything[PAD_INDEX] = False
        truth, _ = exact_top_k_allowed(item_vectors, queries, k, everything)
        plan = plan_search(num_items, num_items, k, ef, policy, index.norm_augmented)
        unfiltered = measure(strategy(everything, policy), queries, truth, repeats)
        rows.append(Row(kind, "all", 1.0, 1.0, num_items, plan.strategy, plan.ef, unfiltered.recall_at_10,
                        unfiltered.ms_per_query, 1.0, unfiltered.fallbacks, None, None, None, None))
        on_row(rows[-1])
        for mask_kind in mask_kinds:
            for n, fraction in enumerate(selectivities):
                mask_seed = seed + 1 + n
                allowed = (random_mask(num_items, fraction, mask_seed) if mask_kind == "random"
                           else cluster_mask(clusters, fraction, mask_seed))
                count = int(allowed.sum())
                truth, _ = exact_top_k_allowed(item_vectors, queries, k, allowed)
                plan = plan_search(count, num_items, k, ef, policy, index.norm_augmented)
                forced = {}
                if compare or plan.strategy == EXACT:
                    forced[EXACT] = measure(strategy(allowed, replace(policy, **FORCE_EXACT)), queries, truth, repeats)
                if compare or plan.strategy == HNSW_FILTER:
                    forced[HNSW_FILTER] = measure(strategy(allowed, replace(policy, **FORCE_HNSW)), queries, truth,
                                                  repeats)
                chosen = forced[plan.strategy]
                hnsw_ef = plan_search(count, num_items, k, ef, replace(policy, **FORCE_HNSW), index.norm_augmented).ef
                rows.append(Row(kind, mask_kind, fraction, count / num_items, count, plan.strategy, plan.ef,
                                chosen.recall_at_10, chosen.ms_per_query,
                                chosen.ms_per_query / unfiltered.ms_per_query, chosen.fallbacks,
                                forced[EXACT].ms_per_query if EXACT in forced else None,
                                forced[HNSW_FILTER].recall_at_10 if HNSW_FILTER in forced else None,
                                forced[HNSW_FILTER].ms_per_query if HNSW_FILTER in forced else None,
                                hnsw_ef if HNSW_FILTER in forced else None))
                logger.info("%s", rows[-1])
                on_row(rows[-1])
    return rows, build_s


def bench_filtered(*, num_items: int, dim: int, num_queries: int, k: int, ef: int, M: int, ef_construction: int,
                   build_threads: int, selectivities: list[float], mask_kinds: list[str], index_kinds: list[str],
                   policy: FilterPolicy, compare: bool, repeats: int, seed: int,
                   on_report: Callable[[dict], None] = lambda report: None) -> dict:
    """The whole run: one generated catalogue, one index per kind, every mask; returns the report (and passes
    it to `on_report` after each row, so a run stopped early keeps what it measured)."""
    for name, values, known in (("index kinds", index_kinds, INDEX_KINDS), ("mask kinds", mask_kinds, MASK_KINDS)):
        if set(values) - set(known):
            raise ValueError(f"{name}: unknown {sorted(set(values) - set(known))}; choose from {list(known)}")
    if not all(0.0 < s < 1.0 for s in selectivities):
        raise ValueError(f"selectivities: each must be in (0, 1), got {selectivities}")
    vectors = clustered_vectors(num_items + num_queries, dim, seed)
    rows_of, queries_of = split_queries(np.arange(len(vectors)), num_queries, seed)  # ann.py's split, by row
    items, queries = vectors[rows_of], vectors[queries_of]
    clusters = mixture_clusters(len(vectors), seed)[rows_of]
    report = {"vectors": f"generated: {num_items} clustered vectors, dim {dim}, "
                         f"{max(1, len(vectors) // ITEMS_PER_CLUSTER)} Zipf-sized clusters",
              "num_items": num_items, "dim": dim, "queries": num_queries, "k": k, "ef": ef, "M": M,
              "ef_construction": ef_construction, "build_threads": build_threads, "search_threads": 1,
              "repeats": repeats, "policy": asdict(policy), "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "build_s": {}, "rows": []}
    for kind in index_kinds:
        def on_row(row: Row) -> None:
            report["rows"].append(asdict(row))
            on_report(report)
        _, build_s = bench_index(kind, items, queries, clusters, k=k, ef=ef, M=M, ef_construction=ef_construction,
                                 build_threads=build_threads, selectivities=selectivities, mask_kinds=mask_kinds,
                                 policy=policy, compare=compare, repeats=repeats, seed=seed, on_row=on_row)
        report["build_s"][kind] = build_s
    report["target"] = target_check([Row(**row) for row in report["rows"]])
    on_report(report)
    return report


# ---- report -------------------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    header = ("| index | mask | allowed | policy chose | ef | recall@10 | ms/query | × unfiltered | exact ms | "
              "hnsw-filter ef | hnsw-filter recall@10 | hnsw-filter ms | fallbacks |")
    lines = [header, "|---" * 13 + "|"]
    for r in rows:
        allowed = "100 %" if r.mask == "all" else f"{100 * r.selectivity:.2f} % ({r.allowed:,})"
        lines.append(f"| {r.index} | {r.mask} | {allowed} | {r.chosen} | {num(r.ef, 'd')} | {r.recall_at_10:.4f} | "
                     f"{r.ms_per_query:.3f} | {r.vs_unfiltered:.1f}× | {num(r.exact_ms, '.3f')} | "
                     f"{num(r.hnsw_ef, 'd')} | {num(r.hnsw_recall_at_10, '.4f')} | {num(r.hnsw_ms, '.3f')} | "
                     f"{r.fallbacks} |")
    return "\n".join(lines)


def target_check(rows: list[Row], recall: float = 0.99) -> list[str]:
    """Recall@10 of the policy's answer >= `recall` for every filtered mask, per index kind."""
    lines = []
    for kind in dict.fromkeys(r.index for r in rows):
        filtered = [r for r in rows if r.index == kind and r.mask != "all"]
        if not filtered:
            continue
        worst = min(filtered, key=lambda r: r.recall_at_10)
        verdict = "meets" if worst.recall_at_10 >= recall else "misses"
        lines.append(f"{kind}: lowest policy recall@10 {worst.recall_at_10:.4f} ({worst.mask} "
                     f"{100 * worst.selectivity:.2f} %, {worst.chosen}): {verdict} the {recall} target")
    return lines


def write_report(path: str | Path | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
