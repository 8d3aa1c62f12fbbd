"""Histories and the reference rankings the end-to-end tests compare the service with (training code only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from seqrank.serving.history import Event
from seqrank.training.artifact import IndexParams
from seqrank.training.config import load_config
from seqrank.training.export import exact_top_k, export_run
from seqrank.training.model import encode_histories, load_encoder_dir
from seqrank.training.run_dir import TRANSITIONS_FILE as TRANSITIONS_RUN_FILE
from seqrank.training.sources import load_sequences
from seqrank.training.transitions import count_transitions


def random_history(item_ids, behavior_names, seed, length=12) -> list[Event]:
    rng = np.random.default_rng(seed)
    items = rng.choice(np.arange(1, len(item_ids)), size=length, replace=False)
    behaviors = rng.choice(behavior_names, size=length)
    return [Event(item_ids[i], str(b)) for i, b in zip(items, behaviors)]


def trained_user_vector(tiny_run, manifest, item_ids, events) -> np.ndarray:
    """The user vector as training computes it: the run's checkpoint and training.model.encode_histories."""
    model = load_encoder_dir(tiny_run)
    items = np.array([item_ids.index(e.raw_item_id) for e in events])
    behaviors = np.array([manifest["behavior_names"].index(e.behavior) + 1 for e in events])
    return encode_histories(model, [items], [behaviors])[0]


def exact_ranking(user_vector, item_vectors, item_ids, events) -> list[str]:
    """Every item the history has not seen, by exact inner product, best first (raw ids)."""
    order = exact_top_k(user_vector[None], item_vectors, len(item_ids) - 1)[0]
    seen = {item_ids.index(e.raw_item_id) for e in events}
    return [item_ids[i] for i in order if i not in seen]


def run_with_prior(tiny_run: Path, directory: Path, weight: float, name: str) -> tuple[Path, Path]:
    """A copy of the session's tiny run in `directory` with a transition prior at `weight` (as `fit` writes one),
    and its exported artifact: (run, artifact)."""
    run = directory / "run"
    shutil.copytree(tiny_run, run)
    prior = count_transitions(load_sequences(load_config(run / "config.yaml").data)).with_weight(weight)
    prior.save(run)
    (run / TRANSITIONS_RUN_FILE).write_text(json.dumps({"weight": weight}))
    return run, export_run(run, directory / "artifact", IndexParams(M=16, ef_construction=200, ef_search=400),
                           name=name)
