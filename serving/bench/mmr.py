"""`seqrank bench mmr`: wall time of `seqrank.serving.rerank.mmr` on one thread, C candidates down to k.

The target: 1,000 candidates to 50 in at most 1 ms on one core. Candidates are clustered vectors
(the generator of `seqrank bench ann`) with relevance = inner product with a query from the same mixture, as
retrieval hands them over; BLAS is limited to one thread, the calls are timed one by one after a warm-up.
Two clocks per call: wall time, and the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), which leaves out
the time the thread waited for a core: on a shared machine the wall-time tail measures the neighbours.
"""

from __future__ import annotations

import time

import numpy as np

from seqrank.serving.bench.ann import clustered_vectors, one_thread
from seqrank.serving.bench.loadgen import nearest_rank
from seqrank.serving.rerank import mmr

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
            wall_ms, cpu_ms = [], []
            for _ in range(repeats):
                wall_started, cpu_started = time.perf_counter(), time.thread_time()
                mmr(relevance, candidates, k, diversity)
                cpu_ms.append((time.thread_time() - cpu_started) * 1000.0)
                wall_ms.append((time.perf_counter() - wall_started) * 1000.0)
            row = {"diversity": diversity}
            for clock, values in (("wall", sorted(wall_ms)), ("cpu", sorted(cpu_ms))):
                row.update({f"{clock}_median_ms": nearest_rank(values, 50), f"{clock}_p90_ms": nearest_rank(values, 90),
                            f"{clock}_p99_ms": nearest_rank(values, 99), f"{clock}_max_ms": values[-1]})
            rows.append(row)
    return {"candidates": num_candidates, "k": k, "dim": dim, "repeats": repeats, "threads": 1,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": rows}


def format_mmr(report: dict) -> str:
    lines = [f"MMR {report['candidates']} candidates -> {report['k']}, dim {report['dim']}, one thread, "
             f"{report['repeats']} calls each; wall time (CPU time of the thread)",
             "| diversity | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [f"{r[f'wall_{q}_ms']:.3f} ({r[f'cpu_{q}_ms']:.3f})" for q in ("median", "p90", "p99", "max")]
        lines.append(f"| {r['diversity']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
