"""`seqrank bench encoder --paths ...`: the encoder's inference paths (serving/inference.py) side by side.

Each path is built as a replica builds it (`build_path`), then timed through `encode_with`, the replica's own
history -> vector step (padding and the copy back to numpy included), on histories of 20-50 events drawn by the
artifact's training popularity (an artifact keeps no real histories). Paths are timed in turns, a slice of each in
every round, so a neighbour's load on a shared machine falls on all of them alike. Per path: p50 and p90 latency
per call, requests (histories) per second per core, the build time, and the max abs difference of its user vectors
from eager's on the same histories.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqrank.serving.inference import build_path, encode_with
from seqrank.training.vocab import PAD_INDEX

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parents[2] / "training" / "configs" / "amazon-towers.yaml"
RECIPE_NUM_ITEMS = 12_101  # Amazon Beauty's catalogue, when no artifact is given
HISTORY_LENGTHS = (20, 50)  # events per history, inclusive
ROUNDS = 10


@dataclass(frozen=True)
class PathTiming:
    path: str
    threads: int
    batch_size: int
    p50_ms: float
    p90_ms: float
    requests_per_s_per_core: float  # histories per second per torch/onnxruntime thread, at p50
    build_s: float  # building the path (export, compile and warm-up), once per thread count
    max_diff: float  # max abs difference from eager's user vectors on the benchmark's histories


def recipe_model(seed: int = 0):
    """A random-initialised encoder of the committed recipe's architecture over Beauty's catalogue size."""
    from seqrank.training.config import load_config
    from seqrank.training.model import EncoderConfig, build_encoder

    torch.manual_seed(seed)
    architecture = load_config(str(RECIPE), []).model.architecture()
    return build_encoder(EncoderConfig(**architecture, num_items=RECIPE_NUM_ITEMS)).eval(), None


def artifact_model(artifact_dir: str | Path):
    """(model, item popularity) of an artifact."""
    from seqrank.training.artifact import load_artifact
    from seqrank.training.model import load_encoder

    artifact = load_artifact(artifact_dir)
    model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    return model, np.asarray(artifact.item_popularity[PAD_INDEX + 1:], dtype=np.float64)


def sample_histories(model, popularity: np.ndarray | None, batch_size: int, count: int,
                     rng: np.random.Generator) -> list[tuple[list[np.ndarray], list[np.ndarray] | None]]:
    """`count` batches of `batch_size` histories of 20-50 items, by popularity (+1) or uniform without one."""
    num_items = model.config.num_items
    p = None if popularity is None else (popularity + 1.0) / (popularity + 1.0).sum()
    batches = []
    for _ in range(count):
        lengths = rng.integers(HISTORY_LENGTHS[0], HISTORY_LENGTHS[1] + 1, batch_size)
        histories = [rng.choice(num_items, size=n, p=p) + 1 for n in lengths]
        behaviors = ([rng.integers(1, model.config.num_behaviors + 1, n) for n in lengths]
                     if model.config.num_behaviors else None)
        batches.append((histories, behaviors))
    return batches


def bench_encoder_paths(model, popularity: np.ndarray | None, paths: list[str], threads: list[int],
                        batch_sizes: list[int], seconds: float = 2.0, seed: int = 0) -> list[PathTiming]:
    """Timings per thread count x batch size x path; `seconds` of timed calls per path and cell."""
    rows = []
    built: dict[str, tuple] = {}
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for name in paths:  # onnxruntime's threads are fixed per session; the others follow torch's
            if name not in built or name == "onnx":
                started = time.perf_counter()
                built[name] = build_path(model, name, thread_count), time.perf_counter() - started
                logger.info("built %s (%d threads) in %.1f s", name, thread_count, built[name][1])
        for batch_size in batch_sizes:
            rng = np.random.default_rng([seed, batch_size])
            batches = sample_histories(model, popularity, batch_size, 16, rng)
            reference = [encode_with(model.user_vectors, model, h, b) for h, b in batches]
            diffs = {name: max(float(np.abs(encode_with(built[name][0], model, h, b) - ref).max())
                               for (h, b), ref in zip(batches, reference)) for name in paths}
            durations: dict[str, list[float]] = {name: [] for name in paths}
            for round_number in range(ROUNDS):
                for name in paths:
                    fn = built[name][0]
                    encode_with(fn, model, *batches[round_number % len(batches)])  # warm this turn
                    deadline = time.perf_counter() + seconds / ROUNDS
                    calls = 0
                    while calls < 3 or time.perf_counter() < deadline:
                        histories, behaviors = batches[calls % len(batches)]
                        begin = time.perf_counter()
                        encode_with(fn, model, histories, behaviors)
                        durations[name].append(time.perf_counter() - begin)
                        calls += 1
            for name in paths:
                p50 = statistics.median(durations[name])
                p90 = float(np.quantile(durations[name], 0.9))
                rows.append(PathTiming(name, thread_count, batch_size, p50 * 1e3, p90 * 1e3,
                                       batch_size / p50 / thread_count, built[name][1], diffs[name]))
    return rows


def format_paths_table(rows: list[PathTiming]) -> str:
    eager = {(r.threads, r.batch_size): r.p50_ms for r in rows if r.path == "eager"}
    lines = ["| path | threads | batch | p50 ms | p90 ms | requests/s per core | × eager (p50) | build s | "
             "max diff vs eager |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = eager.get((r.threads, r.batch_size))
        lines.append(f"| {r.path} | {r.threads} | {r.batch_size} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | "
                     f"{r.requests_per_s_per_core:,.0f} | {f'{speedup / r.p50_ms:.1f}' if speedup else '-'} | "
                     f"{r.build_s:.1f} | {r.max_diff:.1e} |")
    return "\n".join(lines)
