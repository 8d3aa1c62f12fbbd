"""`seqrank bench exact`: serving's exact search against its hnswlib index, by catalogue size.

Both sides are the code retrieval runs (serving/retrieval.py): `exact_top_k` (one float32 matrix product over the
item vectors, argpartition, the chosen items sorted) and the artifact-format hnswlib index
(`training.artifact.build_hnsw_index`, `ItemIndex.knn_query`, as `LoadedIndex` loads it) at the export's defaults
(M 32, ef_construction 200, ef 200). Each asks for `k` items (retrieval's fetch: the request's candidate pool, 200
by default, plus its exclusions). Per catalogue: ms per query with one query per call (a lone request) and with
`batch` queries per call (the ingress batches concurrent requests), recall@100 of the graph's answer against exact
search's, and what `retrieval.search: auto` picks. One thread throughout (BLAS held by threadpoolctl, hnswlib told
one), times are the best of `repeats` passes.

Catalogues: the `seqrank bench ann` generator (clustered vectors, `--dim`) at each `--sizes`, and with
`--artifact` a trained artifact's own item vectors and its encoder's user vectors: the whole catalogue with its
exported index, and random subsets of `--artifact-sizes` items with an index built the same way (trained vectors
are harder for the graph than the generated ones: skewed norms, hubs); for an artifact with a
transition prior also the prior's cost per query: the HNSW path's merge (`add_transition_prior` with
`transition_candidates` successors) and the exact path's (the prior's terms added to the scores before choosing).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from seqrank.serving.bench.ann import generated_vectors, one_thread, recall_at_k
from seqrank.serving.retrieval import add_transition_prior, exact_top_k, ip_scores, use_exact_search
from seqrank.training.artifact import IndexParams, build_hnsw_index

SINGLE_QUERY_SAMPLE = 200  # queries timed one call each


@dataclass(frozen=True)
class Row:
    catalogue: str  # "generated" or the artifact's model version
    num_items: int
    dim: int
    build_s: float
    exact_ms_single: float  # ms per query, one query per call
    hnsw_ms_single: float
    batch: int
    exact_ms_batched: float  # ms per query, `batch` queries per call
    hnsw_ms_batched: float
    hnsw_recall_at_100: float  # the graph's top 100 against exact search's
    auto: str  # what retrieval.search: auto picks at this size


@dataclass(frozen=True)
class PriorCost:
    catalogue: str
    num_items: int
    transition_candidates: int
    merge_ms: float  # add_transition_prior after the index's answer, per query
    exact_ms: float  # exact_top_k with the prior's terms folded in, per query
    exact_without_ms: float  # exact_top_k alone, per query (same run)
    mean_successors: float  # successors of the queries' newest items


def per_query_ms(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, repeats: int) -> float:
    """Best-of-`repeats` ms per query, calling `search` on `batch` queries at a time."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(queries), batch):
            search(queries[start:start + batch])
        best = min(best, time.perf_counter() - started)
    return best * 1e3 / len(queries)


def measure(catalogue: str, item_vectors: np.ndarray, queries: np.ndarray, index, build_s: float, k: int,
            batch: int, repeats: int) -> Row:
    """item_vectors: (I+1, D) float32 with the PAD row; `index` an ItemIndex over items 1..I."""
    num_items = len(item_vectors) - 1
    fetch = min(k, num_items)

    def exact(block):
        return exact_top_k(item_vectors, block, fetch, num_items)

    def graph(block):
        labels, distances = index.knn_query(block, k=fetch)
        return labels, ip_scores(distances)

    with one_thread():
        sample = queries[:SINGLE_QUERY_SAMPLE]
        row = Row(catalogue, num_items, item_vectors.shape[1], build_s,
                  per_query_ms(exact, sample, 1, repeats), per_query_ms(graph, sample, 1, repeats), batch,
                  per_query_ms(exact, queries, batch, repeats), per_query_ms(graph, queries, batch, repeats),
                  recall_at_k(graph(queries)[0].astype(np.int64), exact(queries)[0], min(100, fetch)),
                  "exact" if use_exact_search("auto", num_items) else "hnsw")
    return row


def prior_cost(catalogue: str, item_vectors: np.ndarray, queries: np.ndarray, index, prior, newest: np.ndarray,
               k: int, transition_candidates: int, repeats: int) -> PriorCost:
    """Per query: the HNSW path's merge of the prior after the index's answer, and exact search with and without
    the prior folded in (one query per call, as retrieval runs the merge)."""
    num_items = len(item_vectors) - 1
    fetch = min(k, num_items)
    with one_thread():
        answers = [index.knn_query(queries[row:row + 1], k=fetch) for row in range(len(queries))]
        best_merge = best_exact = best_plain = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for row, (labels, distances) in enumerate(answers):
                add_transition_prior(labels[0].astype(np.int64), ip_scores(distances[0]), queries[row],
                                     int(newest[row]), prior, item_vectors, transition_candidates)
            best_merge = min(best_merge, time.perf_counter() - started)
            started = time.perf_counter()
            for row in range(len(queries)):
                exact_top_k(item_vectors, queries[row:row + 1], fetch, num_items,
                            priors=[prior.successors_of(int(newest[row]))])
            best_exact = min(best_exact, time.perf_counter() - started)
            started = time.perf_counter()
            for row in range(len(queries)):
                exact_top_k(item_vectors, queries[row:row + 1], fetch, num_items)
            best_plain = min(best_plain, time.perf_counter() - started)
    successors = np.mean([len(prior.successors_of(int(item))[0]) for item in newest])
    scale = 1e3 / len(queries)
    return PriorCost(catalogue, num_items, transition_candidates, best_merge * scale, best_exact * scale,
                     best_plain * scale, float(successors))


def with_pad(items: np.ndarray) -> np.ndarray:
    return np.vstack([np.zeros((1, items.shape[1]), np.float32), items]).astype(np.float32)


def bench_exact(*, sizes: list[int], dim: int, num_queries: int, k: int, batch: int, M: int, ef_construction: int,
                ef: int, build_threads: int, repeats: int, seed: int, artifact: str | None = None,
                artifact_sizes: tuple[int, ...] = (), transition_candidates: int = 50, on_row: Callable[[dict], None] = lambda report: None) -> dict:
    """The rows (generated sizes, then the artifact), the prior's cost where the artifact has one; `on_row(report so
    far)` after each row."""
    params = IndexParams(M=M, ef_construction=ef_construction, ef_search=ef)
    rows: list[Row] = []
    priors: list[PriorCost] = []

    def report() -> dict:
        return {"dim": dim, "queries": num_queries, "k": k, "batch": batch, "M": M, "ef_construction": ef_construction,
                "ef": ef, "build_threads": build_threads, "repeats": repeats,
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "rows": [asdict(r) for r in rows], "prior": [asdict(p) for p in priors]}

    for size in sizes:
        items, queries, _ = generated_vectors(size, dim, num_queries, seed)
        item_vectors = with_pad(items)
        started = time.perf_counter()
        index = build_hnsw_index(item_vectors, params, build_threads)
        build_s = time.perf_counter() - started
        index.set_ef(max(ef, min(k, size)))  # hnswlib needs ef >= k; serving's beam is max(ef, fetch) in effect
        index.set_num_threads(1)
        rows.append(measure("generated", item_vectors, queries, index, build_s, k, batch, repeats))
        on_row(report())
        del index
    if artifact:
        from seqrank.serving.bench.ann import artifact_vectors
        from seqrank.training.artifact import load_artifact

        loaded = load_artifact(artifact)
        _, queries, _ = artifact_vectors(artifact, num_queries, seed)
        for size in sorted(s for s in artifact_sizes if s < loaded.num_items):
            chosen = np.sort(np.random.default_rng(seed).choice(loaded.num_items, size, replace=False)) + 1
            item_vectors = with_pad(loaded.item_vectors[chosen])
            started = time.perf_counter()
            index = build_hnsw_index(item_vectors, loaded.index_params, build_threads)
            build_s = time.perf_counter() - started
            index.set_ef(max(ef, min(k, size)))
            index.set_num_threads(1)
            rows.append(measure(f"{loaded.model_version} (subset)", item_vectors, queries, index, build_s, k, batch,
                                repeats))
            on_row(report())
        index = loaded.load_index(ef)
        index.set_ef(max(ef, min(k, loaded.num_items)))
        index.set_num_threads(1)
        rows.append(measure(loaded.model_version, loaded.item_vectors, queries, index, 0.0, k, batch, repeats))
        on_row(report())
        if loaded.transitions is not None:
            rng = np.random.default_rng(seed)
            popularity = np.asarray(loaded.item_popularity[1:], np.float64) + 1.0
            newest = rng.choice(loaded.num_items, size=min(num_queries, SINGLE_QUERY_SAMPLE),
                                p=popularity / popularity.sum()) + 1  # newest items drawn like histories' items
            priors.append(prior_cost(loaded.model_version, loaded.item_vectors, queries[:len(newest)], index,
                                     loaded.transitions, newest, k, transition_candidates, repeats))
            on_row(report())
    return report()


def format_rows(rows: list[Row]) -> str:
    lines = ["| catalogue | items | D | exact ms, 1/call | HNSW ms, 1/call | exact ms/query, batch | HNSW ms/query, "
             "batch | HNSW recall@100 | auto picks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.catalogue} | {r.num_items:,} | {r.dim} | {r.exact_ms_single:.3f} | {r.hnsw_ms_single:.3f} "
                     f"| {r.exact_ms_batched:.3f} ({r.batch}) | {r.hnsw_ms_batched:.3f} ({r.batch}) | "
                     f"{r.hnsw_recall_at_100:.4f} | {r.auto} |")
    return "\n".join(lines)


def format_priors(priors: list[PriorCost]) -> str:
    if not priors:
        return ""
    lines = ["| catalogue | items | successors per newest item (mean) | HNSW path: merge of "
             "transition_candidates successors, ms | exact search with the prior, ms | exact search without, ms |",
             "|---|---|---|---|---|---|"]
    for p in priors:
        lines.append(f"| {p.catalogue} | {p.num_items:,} | {p.mean_successors:.1f} | {p.merge_ms:.3f} "
                     f"({p.transition_candidates}) | {p.exact_ms:.3f} | {p.exact_without_ms:.3f} |")
    return "\n".join(lines)
