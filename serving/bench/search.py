"""`seqrank bench search`: personalised search re-ranking on a real log, the service's own code path in-process.

For every test user (leave-one-out: the last event is the target), the "query" is the target item's first
attribute value (on Amazon Beauty, its first category id), and the candidates are all items having that value, in
ascending id order, as a search service would hand them over. Ranked three ways, top-10 of the candidates with the
user's seen items removed (as the service and offline evaluation do):
- the service's candidate re-ranking: the user vector from the artifact's encoder (training/model.py
  `encode_histories`, as the Encoder does), then `RetrievalStage` with `candidate_item_ids` and `rerank` (MMR) at
  the given diversity, exactly as a Rank with candidates runs;
- most popular within the candidates (the artifact's popularity);
- the candidates' given order.
HR@10 and NDCG@10 of the target (a target the user has seen before counts as a miss for all three).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
K = 10
ENCODE_BATCH = 512


def _ndcg_hr(rank: int | None) -> tuple[float, float]:
    """rank 0-based within the top K, None when absent."""
    if rank is None or rank >= K:
        return 0.0, 0.0
    return 1.0 / np.log2(rank + 2), 1.0


def _numeric_order(raw_ids):
    return sorted(raw_ids, key=lambda raw: (0, int(raw)) if str(raw).isdigit() else (1, str(raw)))


def bench_search(artifact_path: str | Path, data_path: str | Path, attributes_path: str | Path,
                 diversities: tuple[float, ...] = (0.0, 0.3), max_users: int = 0, seed: int = 0) -> dict:
    from seqrank.serving.catalogue import History
    from seqrank.serving.config import RetrievalArgs
    from seqrank.serving.messages import EncodedUser, RetrievalRequest
    from seqrank.serving.metrics import ServingMetrics
    from seqrank.serving.rerank import rerank
    from seqrank.serving.retrieval import RetrievalStage
    from seqrank.training.artifact import load_artifact
    from seqrank.training.config import DataConfig
    from seqrank.training.data import history_bounds, targets
    from seqrank.training.model import encode_histories, load_encoder
    from seqrank.training.sources import load_sequences

    artifact = load_artifact(artifact_path)
    data = load_sequences(DataConfig(path=str(data_path), attributes=str(attributes_path)))
    if data.fingerprint != artifact.manifest.get("data_fingerprint"):
        raise ValueError(f"--data: {data_path} is not the log the artifact was trained on (fingerprint differs)")
    attributes = json.loads(Path(attributes_path).read_text())
    first_value = {str(raw): str(values[0]) for raw, values in attributes.items() if values}
    with_value: dict[str, list[str]] = defaultdict(list)
    for raw in _numeric_order(artifact.item_ids[1:]):
        if raw in first_value:
            with_value[first_value[raw]].append(raw)

    start, end = history_bounds(data, "test")
    target = targets(data, "test")
    users = np.arange(data.num_users)
    if max_users and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    users = np.array([u for u in users if str(data.item_ids[target[u]]) in first_value])
    model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    stage = RetrievalStage(RetrievalArgs(placement="ingress"), ServingMetrics())
    stage.models.reload({"artifact_path": str(artifact.path)})
    popularity = {raw: float(artifact.item_popularity[i]) for i, raw in enumerate(artifact.item_ids) if i}

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    candidates_seen = []
    for batch in tqdm(np.array_split(users, max(1, len(users) // ENCODE_BATCH)), desc="users", unit="batch"):
        histories = [data.items[start[u]:end[u]] for u in batch]
        vectors = encode_histories(model, [np.asarray(h, dtype=np.int64) for h in histories])
        for user, history, vector in zip(batch, histories, vectors):
            raw_target = str(data.item_ids[target[user]])
            candidates = with_value[first_value[raw_target]]
            raw_history = [str(data.item_ids[i]) for i in history]
            seen = set(raw_history)
            candidates_seen.append(len(candidates))
            request = RetrievalRequest(
                user=EncodedUser(vector, artifact.model_version),
                history=History(tuple(raw_history), ("",) * len(raw_history)), exclude_item_ids=(),
                exclude_seen=True, num_candidates=len(candidates), k=K, diversity=0.0,
                candidate_item_ids=tuple(candidates))
            (candidate_set,) = stage.retrieve([request])
            for diversity in diversities:
                listed = [item.item_id for item in rerank(candidate_set, K, diversity).items]
                _add(totals[f"service re-ranking (diversity {diversity:g})"], listed, raw_target)
            unseen = [raw for raw in candidates if raw not in seen]
            _add(totals["most popular within the candidates"],
                 sorted(unseen, key=lambda raw: -popularity[raw])[:K], raw_target)
            _add(totals["the candidates' given order"], unseen[:K], raw_target)
    count = len(users)
    rows = [{"ranking": name, "NDCG@10": ndcg / count, "HR@10": hr / count} for name, (ndcg, hr) in totals.items()]
    return {"artifact": str(artifact_path), "users": count, "queries": len(with_value),
            "candidates_median": float(np.median(candidates_seen)), "candidates_max": int(max(candidates_seen)),
            "rows": rows}


def _add(total: list[float], listed: list[str], target: str) -> None:
    ndcg, hr = _ndcg_hr(listed.index(target) if target in listed else None)
    total[0] += ndcg
    total[1] += hr


def format_search(report: dict) -> str:
    lines = [f"{report['users']} test users, {report['queries']} queries (first attribute value), candidates per "
             f"query median {report['candidates_median']:.0f}, max {report['candidates_max']}",
             f"{'ranking':<44}{'NDCG@10':>9}{'HR@10':>9}"]
    lines += [f"{row['ranking']:<44}{row['NDCG@10']:>9.4f}{row['HR@10']:>9.4f}" for row in report["rows"]]
    return "\n".join(lines)
