"""`seqrank bench new-items`: items the model never trained on, placed by their attribute values, on a real log.

`prepare` picks a fraction of the items at random (fixed seed) as "new" and writes the log without any of their
events (an S3-Rec `user item item ...` file), ready for `seqrank train`. `run` then takes the artifact trained on
that log and, for comparison, one trained on the whole log, and ranks every test user of the whole log against the
whole catalogue: the trained items plus the new ones upserted with their attribute values, through the same live
catalogue code a running service uses (`LiveItems`, `RetrievalStage`; their vectors from `training/cold_items.py`).
For the users whose test item is a new item it reports NDCG@10 / HR@10 for: the upserted attribute vectors, most
popular, random, and the model trained with those items' events (an upper bound); for the other users, the model
without the new items' events against the one with them (the old items lose nothing).

The user's history is their whole-log history before the test item; the model without the new items reads only
its trained items (as the encoder does with items it does not know), seen items are excluded as in evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

K = 10
ENCODE_BATCH = 512
NEW_ITEMS_FILE = "new_items.json"


def prepare(data_path: str | Path, out_dir: str | Path, fraction: float = 0.1, seed: int = 0) -> dict:
    """Writes out_dir/<log name> without the chosen items' events and out_dir/new_items.json."""
    lines = Path(data_path).read_text().split("\n")
    rows = [line.split() for line in lines if line.strip()]
    items = sorted({item for row in rows for item in row[1:]}, key=int)
    rng = np.random.default_rng(seed)
    new = sorted(rng.choice(items, size=int(round(fraction * len(items))), replace=False).tolist(), key=int)
    chosen = set(new)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = [[row[0], *(item for item in row[1:] if item not in chosen)] for row in rows]
    log = out_dir / Path(data_path).name
    log.write_text("\n".join(" ".join(row) for row in kept if len(row) > 1) + "\n")
    summary = {"source": str(data_path), "fraction": fraction, "seed": seed, "items": len(items),
               "new_items": new, "events_dropped": sum(len(row) - len(k) for row, k in zip(rows, kept))}
    (out_dir / NEW_ITEMS_FILE).write_text(json.dumps(summary))
    return {**summary, "log": str(log), "new_items": len(new)}


@dataclass
class Tally:
    ndcg: float = 0.0
    hr: float = 0.0
    users: int = 0

    def add(self, listed: list[str], target: str) -> None:
        self.users += 1
        if target in listed[:K]:
            rank = listed.index(target)
            self.ndcg += 1.0 / np.log2(rank + 2)
            self.hr += 1.0

    def row(self, name: str) -> dict:
        users = max(self.users, 1)
        return {"ranking": name, "users": self.users, "NDCG@10": self.ndcg / users, "HR@10": self.hr / users}


class StaticItems:
    """A store's items_since over a fixed set of upserts: what the service holds after UpsertItems."""

    def __init__(self, states: list) -> None:
        self._states = states

    def items_since(self, version: int):
        return (self._states if version < 1 else []), 1


def _stage(artifact, upserts: dict[str, list[str]] | None):
    from seqrank.serving.config import RetrievalArgs
    from seqrank.serving.history.events import ItemState
    from seqrank.serving.live_catalogue import LiveItemsSync
    from seqrank.serving.metrics import ServingMetrics
    from seqrank.serving.retrieval import RetrievalStage

    live = None
    if upserts:
        states = [ItemState(raw, tuple(values), True, 1) for raw, values in upserts.items()]
        live = LiveItemsSync(StaticItems(states).items_since, interval_s=3600, owner="bench")
        live.refresh()
    stage = RetrievalStage(RetrievalArgs(placement="ingress"), ServingMetrics(), live=live)
    stage.models.reload({"artifact_path": str(artifact.path)})
    return stage


def _ranked(stage, artifact, vector, history: list[str], catalogue_size: int) -> list[str]:
    from seqrank.serving.catalogue import History
    from seqrank.serving.messages import EncodedUser, RetrievalRequest

    request = RetrievalRequest(user=EncodedUser(vector, artifact.model_version),
                               history=History(tuple(history), ("",) * len(history)), exclude_item_ids=(),
                               exclude_seen=True, num_candidates=K, k=K, diversity=0.0,
                               catalogue_version=1)
    (candidates,) = stage.retrieve([request])
    return [str(raw) for raw in candidates.item_ids]


def run(artifact_without: str | Path, artifact_with: str | Path, data_path: str | Path,
        attributes_path: str | Path, new_items_path: str | Path, seed: int = 0) -> dict:
    from seqrank.training.artifact import load_artifact
    from seqrank.training.model import encode_histories, load_encoder

    new = set(json.loads(Path(new_items_path).read_text())["new_items"])
    attributes = {str(raw): [str(v) for v in values] for raw, values in
                  json.loads(Path(attributes_path).read_text()).items()}
    rows = [line.split() for line in Path(data_path).read_text().split("\n") if line.strip()]
    users = [(row[1:-1], row[-1]) for row in rows if len(row) >= 4]  # history before the test item, the test item
    models = {}
    plain_stage = None  # the model without the new items, before they are upserted: what upserting costs the rest
    for name, path, upserts in (("without", artifact_without, {raw: attributes.get(raw, []) for raw in new}),
                                ("with", artifact_with, None)):
        artifact = load_artifact(path)
        missing = new - set(artifact.item_ids) if name == "with" else new & set(artifact.item_ids)
        if missing:
            raise ValueError(f"--artifact-{name}: {len(missing)} new items {'missing from' if name == 'with' else 'trained in'} it")
        models[name] = (artifact, load_encoder(artifact.encoder_config, artifact.encoder_weights_path),
                        _stage(artifact, upserts))
        if name == "without":
            plain_stage = _stage(artifact, None)
    everything = [raw for raw in models["with"][0].item_ids[1:]]
    popularity_rank = _popularity_order(models["without"][0], new)
    rng = np.random.default_rng(seed)
    tallies = {key: Tally() for key in ("new/upserted", "new/popular", "new/random", "new/with-events",
                                        "old/without-before", "old/without", "old/with")}
    for start in tqdm(range(0, len(users), ENCODE_BATCH), desc="users", unit="batch"):
        batch = users[start:start + ENCODE_BATCH]
        vectors, known = {}, {}
        for name, (artifact, model, _) in models.items():
            index_of = artifact.item_index_of
            histories = [np.array([index_of[raw] for raw in history if raw in index_of], dtype=np.int64)
                         for history, _ in batch]
            known[name] = [len(h) > 0 for h in histories]  # a history of new items only: the cold-start list
            encoded = encode_histories(model, [h for h in histories if len(h)]) if any(known[name]) else []
            rows = iter(encoded)
            vectors[name] = [next(rows) if ok else None for ok in known[name]]
        for row, (history, target) in enumerate(batch):
            seen = set(history)
            is_new = target in new
            for name, (artifact, _, stage) in models.items():
                if known[name][row]:
                    listed = _ranked(stage, artifact, vectors[name][row], history, len(everything))
                else:
                    listed = [raw for raw in popularity_rank if raw not in seen][:K]
                key = ("new/upserted" if name == "without" else "new/with-events") if is_new else f"old/{name}"
                tallies[key].add(listed, target)
                if name == "without" and not is_new:
                    before = (_ranked(plain_stage, artifact, vectors[name][row], history, len(everything))
                              if known[name][row] else listed)
                    tallies["old/without-before"].add(before, target)
            if is_new:
                tallies["new/popular"].add([raw for raw in popularity_rank if raw not in seen][:K], target)
                pool = [raw for raw in everything if raw not in seen]
                tallies["new/random"].add(list(rng.choice(pool, size=K, replace=False)), target)
    names = {"new/upserted": "new items: upserted attribute vectors", "new/popular": "new items: most popular",
             "new/random": "new items: random", "new/with-events": "new items: trained with their events (bound)",
             "old/without-before": "other users: model without them, before the upserts",
             "old/without": "other users: model without them, after the upserts",
             "old/with": "other users: model trained with them"}
    return {"new_items": len(new), "users": len(users), "rows": [tallies[key].row(names[key]) for key in names]}


def _popularity_order(artifact, new: set[str]) -> list[str]:
    """Trained items by popularity, then the new items (no events: popularity 0), as the service's fallback."""
    order = np.argsort(-artifact.item_popularity[1:], kind="stable") + 1
    return [artifact.item_ids[i] for i in order] + sorted(new, key=int)


def format_new_items(report: dict) -> str:
    lines = [f"{report['new_items']} new items; {report['users']} test users", f"{'ranking':<48}{'users':>7}"
             f"{'NDCG@10':>9}{'HR@10':>9}"]
    lines += [f"{row['ranking']:<48}{row['users']:>7}{row['NDCG@10']:>9.4f}{row['HR@10']:>9.4f}"
              for row in report["rows"]]
    return "\n".join(lines)
