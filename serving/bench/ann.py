"""`seqrank bench ann`: hnswlib and Faiss HNSW against exact inner-product search, on the same vectors.

Read top to bottom: the clustered catalogue generator, exact search and recall (pure), the two HNSW methods,
the timed sweep, then the report (table, JSON, PNG). Every method runs on one thread (BLAS, OpenMP, torch,
hnswlib, Faiss), so queries/s compare algorithms, not cores. Two throughputs per method: single-query (one
call per query, as a request without batching sees it) and batched (all queries in one call, the most BLAS
can give exact search); the target compares like with like.

Why a Gaussian mixture: random Gaussian vectors in 64 dimensions have no neighbourhood structure (200k of them
give HNSW recall@100 0.59 at ef=200), while learned item embeddings cluster by category and taste. The mixture
has `n / 1000` clusters whose sizes follow a Zipf law (cluster c holds a share proportional to 1 / (c + 1)), so a
few head clusters are large and most are small, like catalogue categories; centres ~ N(0, I), members = centre +
N(0, sigma_c^2 I) with sigma_c log-uniform in [0.5, 1.0], which gives item norms that differ, as inner-product
search meets in trained models. Queries are held-out draws from the same mixture.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from seqrank.training.artifact import augment_items, augment_queries

logger = logging.getLogger(__name__)

ITEMS_PER_CLUSTER = 1000  # mean cluster size of the generated catalogue
CLUSTER_SCALE_RANGE = (0.5, 1.0)  # within-cluster standard deviation, log-uniform per cluster
EXACT_SCORE_BYTES = 1 << 28  # exact search scores at most this many bytes of (queries, items) at once
SINGLE_QUERY_SAMPLE = 200  # queries timed one call each (the slow path; the batched call uses all)
RECALL_KS = (10, 100)
METHODS = ("hnswlib", "faiss", "hnswlib-aug", "faiss-aug")  # -aug: training.artifact.augment_items vectors


# ---- vectors (pure) -----------------------------------------------------------------------------------------

def clustered_vectors(num_vectors: int, dim: int, seed: int) -> np.ndarray:
    """(num_vectors, dim) float32 from the long-tailed Gaussian mixture described in the module docstring."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_vectors // ITEMS_PER_CLUSTER)
    shares = 1.0 / np.arange(1, num_clusters + 1)
    cluster = rng.choice(num_clusters, size=num_vectors, p=shares / shares.sum())  # (N,)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    low, high = np.log(CLUSTER_SCALE_RANGE)
    scales = np.exp(rng.uniform(low, high, num_clusters)).astype(np.float32)
    noise = rng.standard_normal((num_vectors, dim), dtype=np.float32)
    return centres[cluster] + scales[cluster, None] * noise


def split_queries(vectors: np.ndarray, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue, queries): `num_queries` random rows held out of `vectors` as queries."""
    if not 0 < num_queries < len(vectors):
        raise ValueError(f"num_queries: must be in [1, {len(vectors) - 1}], got {num_queries}")
    order = np.random.default_rng(seed).permutation(len(vectors))
    return vectors[np.sort(order[num_queries:])], vectors[order[:num_queries]]


# ---- exact search and recall (pure) -------------------------------------------------------------------------

def exact_top_k(item_vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force maximum inner product: (labels (Q, k) int64 row positions, scores (Q, k) float32), best
    first. One matrix product per chunk of queries (float32 BLAS) and torch.topk per row."""
    import torch

    if not 1 <= k <= len(item_vectors):
        raise ValueError(f"k: must be in [1, {len(item_vectors)}], got {k}")
    items = torch.from_numpy(np.ascontiguousarray(item_vectors, dtype=np.float32))
    chunk = max(1, EXACT_SCORE_BYTES // (4 * len(item_vectors)))
    labels = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))
        top = torch.topk(block @ items.T, k, dim=1, largest=True, sorted=True)  # (b, N) -> (b, k)
        labels[start:start + chunk] = top.indices.numpy()
        scores[start:start + chunk] = top.values.numpy()
    return labels, scores


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k; found and truth are (Q, >= k) label arrays."""
    if found.shape[1] < k or truth.shape[1] < k:
        raise ValueError(f"k={k}: need at least k columns, got found {found.shape} and truth {truth.shape}")
    found, truth = found[:, :k], truth[:, :k]
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2)  # (Q, k): found label j is a true neighbour
    return float(hits.sum(axis=1).mean() / k)


# ---- methods ------------------------------------------------------------------------------------------------

Search = Callable[[np.ndarray, int], np.ndarray]  # (queries (Q, D), k) -> labels (Q, k) int64


@dataclass
class BuiltIndex:
    method: str
    M: int
    ef_construction: int
    build_s: float
    index_bytes: int  # the index in memory: graph and the vectors it keeps (hnswlib and Faiss copy them)
    set_ef: Callable[[int], None]
    search: Search


def build_hnswlib(item_vectors: np.ndarray, M: int, ef_construction: int, threads: int) -> BuiltIndex:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=item_vectors.shape[1])
    index.init_index(max_elements=len(item_vectors), M=M, ef_construction=ef_construction, random_seed=0)
    started = time.perf_counter()
    index.add_items(item_vectors, np.arange(len(item_vectors)), num_threads=threads)
    build_s = time.perf_counter() - started

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        labels, _ = index.knn_query(queries, k=k, num_threads=1)
        return labels.astype(np.int64)

    # index_file_size: vectors, level-0 and upper-level links, labels; what load_index allocates, give or take
    # the label hash map and the visited-list pool.
    return BuiltIndex("hnswlib", M, ef_construction, build_s, int(index.index_file_size()), index.set_ef, search)


def build_faiss(item_vectors: np.ndarray, M: int, ef_construction: int, threads: int) -> BuiltIndex:
    import faiss

    index = faiss.IndexHNSWFlat(item_vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    hnsw = index.hnsw
    index_bytes = (index.ntotal * index.d * 4 + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8
                   + hnsw.levels.size() * 4)

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return labels.astype(np.int64)

    return BuiltIndex("faiss", M, ef_construction, build_s, int(index_bytes), set_ef, search)


def augmented(build: Callable[..., BuiltIndex]) -> Callable[..., BuiltIndex]:
    """The same method over `augment_items` vectors; queries are augmented inside `search`."""
    def build_augmented(item_vectors: np.ndarray, M: int, ef_construction: int, threads: int) -> BuiltIndex:
        built = build(augment_items(item_vectors), M, ef_construction, threads)
        inner = built.search
        built.method += "-aug"
        built.search = lambda queries, k: inner(augment_queries(queries), k)
        return built
    return build_augmented


BUILDERS = {"hnswlib": build_hnswlib, "faiss": build_faiss,
            "hnswlib-aug": augmented(build_hnswlib), "faiss-aug": augmented(build_faiss)}


# ---- timing -------------------------------------------------------------------------------------------------

@contextmanager
def one_thread() -> Iterator[None]:
    """BLAS, OpenMP (Faiss, torch) and torch's intra-op pool limited to one thread inside the block."""
    import torch
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


@dataclass(frozen=True)
class Throughput:
    single_qps: float  # one call per query, over the first SINGLE_QUERY_SAMPLE queries
    batched_qps: float  # all queries in one call


def measure(search: Search, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, Throughput]:
    """Labels of all queries (from the batched call) and both throughputs, each the best of `repeats` passes:
    on a shared machine the fastest pass is the one least disturbed by other processes."""
    sample = queries[:SINGLE_QUERY_SAMPLE]
    single_s = batched_s = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for row in range(len(sample)):
            search(sample[row:row + 1], k)
        single_s = min(single_s, time.perf_counter() - started)
        started = time.perf_counter()
        labels = search(queries, k)
        batched_s = min(batched_s, time.perf_counter() - started)
    return labels, Throughput(len(sample) / single_s, len(queries) / batched_s)


@dataclass(frozen=True)
class Row:
    method: str  # exact, hnswlib, faiss
    num_items: int
    M: int | None
    ef_construction: int | None
    ef: int | None
    build_s: float
    index_mb: float
    recall_at_10: float
    recall_at_100: float
    single_qps: float
    batched_qps: float


def sweep(item_vectors: np.ndarray, queries: np.ndarray, methods: list[str], ms: list[int], ef_construction: int,
          efs: list[int], k: int, build_threads: int, repeats: int,
          on_row: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    """Exact search first (the truth and the baseline), then each method x M x ef; `on_row(rows so far)` after
    each row, so a run stopped early keeps what it measured."""
    k_max = max(k, *RECALL_KS)
    num_items = len(item_vectors)
    with one_thread():
        truth, exact = measure(lambda q, kk: exact_top_k(item_vectors, q, kk)[0], queries, k_max, repeats)
    rows = [Row("exact", num_items, None, None, None, 0.0, item_vectors.nbytes / 2**20, 1.0, 1.0,
                exact.single_qps, exact.batched_qps)]
    logger.info("exact: %.1f queries/s single, %.1f batched", exact.single_qps, exact.batched_qps)
    on_row(rows)
    for method in methods:
        for M in ms:
            built = BUILDERS[method](item_vectors, M, ef_construction, build_threads)
            logger.info("%s M=%d ef_construction=%d: built in %.1f s, %.0f MB", method, M, ef_construction,
                        built.build_s, built.index_bytes / 2**20)
            with one_thread():
                for ef in efs:
                    built.set_ef(max(ef, k_max))
                    labels, speed = measure(built.search, queries, k_max, repeats)
                    rows.append(Row(method, num_items, M, ef_construction, max(ef, k_max), built.build_s,
                                    built.index_bytes / 2**20, recall_at_k(labels, truth, 10),
                                    recall_at_k(labels, truth, 100), speed.single_qps, speed.batched_qps))
                    logger.info("%s", rows[-1])
                    on_row(rows)
            del built
    return rows


# ---- inputs -------------------------------------------------------------------------------------------------

def artifact_vectors(artifact_dir: str | Path, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(item vectors (I, D), user vectors (Q, D), description): the artifact's trained item vectors; queries
    are its encoder's user vectors for histories of 5-30 items drawn by training popularity (the artifact keeps
    no real user histories)."""
    from seqrank.training.artifact import load_artifact
    from seqrank.training.model import encode_histories, load_encoder
    from seqrank.training.vocab import PAD_INDEX

    artifact = load_artifact(artifact_dir)
    model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    rng = np.random.default_rng(seed)
    popularity = np.asarray(artifact.item_popularity[PAD_INDEX + 1:], dtype=np.float64) + 1.0
    histories = [rng.choice(artifact.num_items, size=rng.integers(5, 31), p=popularity / popularity.sum()) + 1
                 for _ in range(num_queries)]
    queries = encode_histories(model, histories)
    description = f"artifact {artifact.model_version}: {artifact.num_items} trained item vectors"
    return artifact.item_vectors[PAD_INDEX + 1:], queries, description


def generated_vectors(num_items: int, dim: int, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    vectors = clustered_vectors(num_items + num_queries, dim, seed)
    items, queries = split_queries(vectors, num_queries, seed)
    return items, queries, (f"generated: {num_items} clustered vectors, dim {dim}, "
                            f"{max(1, (num_items + num_queries) // ITEMS_PER_CLUSTER)} Zipf-sized clusters")


# ---- report -------------------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    lines = ["| method | items | M | ef_c | ef | build s | index MB | recall@10 | recall@100 | q/s single | "
             "q/s batched |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dash = lambda v: "–" if v is None else str(v)  # noqa: E731
        lines.append(f"| {r.method} | {r.num_items:,} | {dash(r.M)} | {dash(r.ef_construction)} | {dash(r.ef)} | "
                     f"{r.build_s:.1f} | {r.index_mb:.0f} | {r.recall_at_10:.4f} | {r.recall_at_100:.4f} | "
                     f"{r.single_qps:,.0f} | {r.batched_qps:,.0f} |")
    return "\n".join(lines)


def target_check(rows: list[Row], recall: float = 0.99, speedup: float = 10.0) -> list[str]:
    """For each method, the fastest configuration with recall@100 >= `recall`, and its speed-up over exact."""
    exact = next(r for r in rows if r.method == "exact")
    lines = []
    for method in sorted({r.method for r in rows} - {"exact"}):
        good = [r for r in rows if r.method == method and r.recall_at_100 >= recall]
        if not good:
            best = max((r for r in rows if r.method == method), key=lambda r: r.recall_at_100)
            lines.append(f"{method}: no configuration reaches recall@100 {recall} (best {best.recall_at_100:.4f} "
                         f"at M={best.M} ef={best.ef})")
            continue
        for mode in ("single", "batched"):
            fastest = max(good, key=lambda r: getattr(r, f"{mode}_qps"))
            ratio = getattr(fastest, f"{mode}_qps") / getattr(exact, f"{mode}_qps")
            verdict = "meets" if ratio >= speedup else "misses"
            lines.append(f"{method} {mode}: M={fastest.M} ef={fastest.ef} recall@100 {fastest.recall_at_100:.4f}"
                         f" at {ratio:.1f}x exact queries/s ({verdict} the {speedup:.0f}x target)")
    return lines


def plot(rows: list[Row], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    colours = {method: f"C{n}" for n, method in enumerate(METHODS)}
    styles = ["-", "--", ":", "-."]  # one per M, in the order the sweep ran them
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, mode in zip(axes, ("single", "batched")):
        exact = next(r for r in rows if r.method == "exact")
        axis.plot([getattr(exact, f"{mode}_qps")], [1.0], "k*", markersize=12, label="exact")
        ms = list(dict.fromkeys(r.M for r in rows if r.M is not None))
        for method in dict.fromkeys(r.method for r in rows if r.method != "exact"):
            for M in ms:
                points = [r for r in rows if r.method == method and r.M == M]
                if points:
                    axis.plot([getattr(r, f"{mode}_qps") for r in points], [r.recall_at_100 for r in points],
                              styles[ms.index(M) % len(styles)], marker="o", color=colours[method],
                              label=f"{method} M={M}")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(f"queries/s, one thread, {mode}")
        axis.set_title(mode)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@100 against exact search")
    axes[1].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bench_ann(*, artifact: str | None, num_items: int, dim: int, num_queries: int, methods: list[str],
              ms: list[int], ef_construction: int, efs: list[int], k: int, build_threads: int, repeats: int,
              seed: int, out_dir: Path) -> dict:
    """Runs the sweep, writes `ann.json` and `ann.png` into out_dir, returns the report."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    if artifact:
        items, queries, description = artifact_vectors(artifact, num_queries, seed)
    else:
        items, queries, description = generated_vectors(num_items, dim, num_queries, seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    def report_of(rows: list[Row]) -> dict:
        return {
            "vectors": description, "num_items": len(items), "dim": int(items.shape[1]), "queries": len(queries),
            "vectors_mb": items.nbytes / 2**20, "build_threads": build_threads, "search_threads": 1,
            "repeats": repeats, "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": [asdict(r) for r in rows],
            "target": target_check(rows),
        }

    def write(rows: list[Row]) -> None:
        (out_dir / "ann.json").write_text(json.dumps(report_of(rows), indent=2))

    rows = sweep(items, queries, methods, ms, ef_construction, efs, k, build_threads, repeats, on_row=write)
    report = report_of(rows)
    plot(rows, description, out_dir / "ann.png")
    return report
