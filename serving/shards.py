"""Sharded retrieval: the item index split into S shards, each searched on its own, the results merged.

Item i (1..I) belongs to shard (i - 1) % S: shard sizes differ by at most one item for any catalogue, and items
that enter the catalogue together (contiguous indices) spread over all shards. Each shard answers its own top
`fetch` for a query; the merged top `fetch` by inner product is then what one index over all items would
return (exactly so for exact search), so the retrieval stage's over-fetch still leaves k items after the
exclusions (serving/retrieval.py `fetch_size`).

The pure helpers come first (memory estimate, shard plan, membership, merge), then `ShardIndex` (one shard's
hnswlib index, built from the artifact at load time), `ShardedIndex` (S of them in one process, queried like
one hnswlib index: the reference for tests and tools), and the `RetrievalShard` deployment: one deployment per
shard, bound by serving/app.py when `retrieval.num_shards` > 1; the Retrieval deployment fans out and merges.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from seqrank.serving.config import RetrievalArgs
from seqrank.serving.metrics import ServingMetrics
from seqrank.serving.reload import ModelSlot
from seqrank.training.artifact import Artifact, ItemIndex, build_hnsw_index
from seqrank.training.vocab import PAD_INDEX

SHARD_DEPLOYMENT_PREFIX = "RetrievalShard"  # shard s is the deployment RetrievalShard<s>
FLOAT32_BYTES = 4
HNSW_LINK_BYTES = 4  # hnswlib's tableint; link lists also start with a 4-byte count
HNSW_LABEL_BYTES = 8  # labeltype (size_t)
# Per element in memory but not in the file: the upper-level link-list pointer, the level, a lock and the
# label hash-map entry. Measured here: RSS growth of 30k-item builds minus index_file_size(), 119-159 B.
HNSW_BOOKKEEPING_BYTES = 140


def shard_deployment_name(shard: int) -> str:
    return f"{SHARD_DEPLOYMENT_PREFIX}{shard}"


def index_file_bytes(num_items: int, dim: int, M: int) -> float:
    """Expected `index_file_size()` of an hnswlib index: per element the vector, the label, the level-0 link
    list (2M links and a count) and the count of upper-level links; an element reaches level l with
    probability M^-l, so it holds 1/(M-1) upper-level lists of M links and a count on average."""
    level0 = dim * FLOAT32_BYTES + (2 * M + 1) * HNSW_LINK_BYTES + HNSW_LABEL_BYTES + HNSW_LINK_BYTES
    upper = (M + 1) * HNSW_LINK_BYTES / (M - 1)
    return num_items * (level0 + upper)


def estimate_index_bytes(num_items: int, dim: int, M: int) -> int:
    """Memory of a loaded hnswlib index: the file's contents plus per-element bookkeeping."""
    return int(index_file_bytes(num_items, dim, M) + num_items * HNSW_BOOKKEEPING_BYTES)


def plan_num_shards(num_items: int, dim: int, M: int, budget_mb: float | None, num_shards: int) -> int:
    """The number of shards: `num_shards`, raised until each shard's index fits `budget_mb` (None: no budget)."""
    if num_shards < 1:
        raise ValueError(f"retrieval.num_shards: must be >= 1, got {num_shards}")
    if budget_mb is None:
        return num_shards
    if budget_mb <= 0:
        raise ValueError(f"retrieval.shard_memory_budget_mb: must be > 0, got {budget_mb}")
    needed = math.ceil(estimate_index_bytes(num_items, dim, M) / (budget_mb * 2**20))
    if needed > num_items:
        raise ValueError(f"retrieval.shard_memory_budget_mb: {budget_mb} MB holds less than one item")
    return max(num_shards, needed)


def shard_items(num_items: int, num_shards: int, shard: int) -> np.ndarray:
    """Item indices (1..num_items) of one shard, ascending: (n_s,) int64."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard: must be in [0, {num_shards}), got {shard}")
    return np.arange(PAD_INDEX + 1 + shard, num_items + 1, num_shards, dtype=np.int64)


def merge_top_k(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k highest scores over all shards' results, best first.

    results: one (labels (B, F_s) int64, scores (B, F_s)) per shard, each row best first; F_s may differ
    (a shard smaller than the fetch returns all it has). Returns (labels (B, k'), scores (B, k')) with
    k' = min(k, sum F_s). Equal scores keep shard order, then in-shard order (a stable sort).
    """
    if not results:
        raise ValueError("results: no shard answered")
    labels = np.concatenate([np.asarray(shard_labels, dtype=np.int64) for shard_labels, _ in results], axis=1)
    scores = np.concatenate([np.asarray(shard_scores, dtype=np.float64) for _, shard_scores in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, k')
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(scores, order, axis=1)


# ---- one shard's index ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardIndex:
    """One model version's index over one shard's items; labels are the global item indices."""

    model_version: str
    index: ItemIndex  # read-only once built
    num_items: int  # items in this shard

    @classmethod
    def build(cls, artifact: Artifact, num_shards: int, shard: int, ef: int | None,
              num_threads: int = 1) -> ShardIndex:
        """Builds the shard's index from the artifact's vectors with the manifest's parameters (the artifact holds
        one index over all items; building a shard costs its share of an export's build)."""
        items = shard_items(artifact.num_items, num_shards, shard)
        index = build_hnsw_index(artifact.item_vectors, artifact.index_params, num_threads, items)
        index.set_ef(max(ef or artifact.index_params.ef_search, 1))
        index.set_num_threads(1)  # like the unsharded index: batch rows are cheap, threads would contend
        return cls(artifact.model_version, index, len(items))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (B, min(k, n_s)) int64, inner products (B, min(k, n_s)) float64), best first."""
        fetch = min(k, self.num_items)
        if fetch == 0:
            return np.empty((len(vectors), 0), np.int64), np.empty((len(vectors), 0))
        labels, distances = self.index.knn_query(vectors, k=fetch)
        return labels.astype(np.int64), 1.0 - distances.astype(np.float64)  # "ip" distance is 1 - <u, v>


class ShardedIndex:
    """S shard indexes in one process, queried like one hnswlib "ip" index (`knn_query`)."""

    def __init__(self, shards: list[ShardIndex]) -> None:
        self.shards = shards

    @classmethod
    def build(cls, artifact: Artifact, num_shards: int, ef: int | None = None) -> ShardedIndex:
        return cls([ShardIndex.build(artifact, num_shards, shard, ef) for shard in range(num_shards)])

    def knn_query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (B, k) int64, distances 1 - <u, v>), like hnswlib's knn_query."""
        labels, scores = merge_top_k([shard.search(vectors, k) for shard in self.shards], k)
        return labels, 1.0 - scores


# ---- deployments --------------------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=64)
class RetrievalShard:
    """One shard of the index (`retrieval.num_shards` > 1): `search` answers the shard's top-k per query.

    Requests name the model version, as everywhere (serving/reload.py): a shard that does not hold it raises
    VersionUnavailable, which reaches the ingress through the Retrieval deployment unchanged."""

    def __init__(self, args: RetrievalArgs, shard: int) -> None:
        metrics = ServingMetrics()
        self._models: ModelSlot[ShardIndex] = ModelSlot(
            shard_deployment_name(shard),
            lambda artifact: ShardIndex.build(artifact, args.num_shards, shard, args.ef),
            metrics.observe_reload,
        )

    def reconfigure(self, user_config: dict) -> None:
        self._models.reload(user_config)  # sync: Serve runs it in a worker thread while requests continue

    def check_health(self) -> None:
        self._models.loaded  # raises until an artifact is loaded

    def search(self, model_version: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._models.resolve(model_version).search(vectors, k)


class RemoteShards:
    """The Retrieval deployment's view of its shards: one call per shard per batch, merged."""

    def __init__(self, handles: tuple[DeploymentHandle, ...]) -> None:
        self._handles = handles

    async def knn(self, model_version: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (B, k), inner products (B, k)), best first, over all shards."""
        results = await asyncio.gather(*(handle.search.remote(model_version, vectors, k)
                                         for handle in self._handles))
        return merge_top_k(list(results), k)
