"""`seqrank bench mmr`: wall time of `serving.rerank.mmr` on one thread, C candidates down to k.

The target of issue 6: 1,000 candidates to 50 in at most 1 ms on one core. Candidates are clustered vectors
(the generator of `seqrank bench ann`) with relevance = inner product with a query from the same mixture, as
retrieval hands them over; BLAS is limited to one thread, the calls are timed one by one after a warm-up.
"""

from __future__ import annotations

import time

import numpy as np

from serving.bench_ann import clustered_vectors, one_thread
from serving.loadgen import nearest_rank
from serving.rerank import mmr

WARMUP_CALLS = 50


def bench_mmr(num_candidates: int, k: int, dim: int, diversities: list[float], repeats: int,
              seed: int = 0) -> dict:
    """Per diversity: median, p90, p99 and max milliseconds of `mmr` over `repeats` timed calls."""
    vectors = clustered_vectors(num_candidates * 20 + 1, dim, seed)  # 20 clusters' worth; candidates from them
    query, candidates = vectors[0], vectors[1 + np.random.default_rng(seed).choice(len(vectors) - 1,
                                                                                 num_candidates, replace=False)]
    relevance = candidates @ query  # (C,)
    rows = []
    with one_thread():
        for diversity in diversities:
            for _ in range(WARMUP_CALLS):
                mmr(relevance, candidates, k, diversity)
            times_ms = []
            for _ in range(repeats):
                started = time.perf_counter()
                mmr(relevance, candidates, k, diversity)
                times_ms.append((time.perf_counter() - started) * 1000.0)
            times_ms.sort()
            rows.append({"diversity": diversity, "median_ms": nearest_rank(times_ms, 50),
                         "p90_ms": nearest_rank(times_ms, 90), "p99_ms": nearest_rank(times_ms, 99),
                         "max_ms": times_ms[-1]})
    return {"candidates": num_candidates, "k": k, "dim": dim, "repeats": repeats, "threads": 1,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": rows}


def format_mmr(report: dict) -> str:
    lines = [f"MMR {report['candidates']} candidates -> {report['k']}, dim {report['dim']}, one thread, "
             f"{report['repeats']} calls each",
             "| diversity | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['diversity']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['max_ms']:.3f} |" for r in report["rows"]]
    return "\n".join(lines)
