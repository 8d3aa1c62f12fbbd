"""A hand-made artifact for serving unit tests: no training, known vectors, popularity and behaviours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqrank.training.artifact import IndexParams, write_artifact

NUM_ITEMS = 12
DIM = 4
BEHAVIORS = ["pv", "cart", "fav", "buy"]


def item_ids() -> list[str]:
    return [""] + [f"sku-{i}" for i in range(1, NUM_ITEMS + 1)]


def write_small_artifact(out_dir: Path, *, version: str = "small-v1", seed: int = 0, transitions=None) -> Path:
    """12 items in 4 dims; popularity 12, 11, ..., 1 for items 1..12 (item 1 most popular)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(NUM_ITEMS + 1, DIM)).astype(np.float32)
    vectors[0] = 0.0
    weights = out_dir.parent / f"{out_dir.name}-weights.safetensors"
    weights.write_bytes(b"not a real encoder")  # these tests never load the encoder
    return write_artifact(
        out_dir,
        encoder_weights=weights,
        item_vectors=vectors,
        item_ids=item_ids(),
        item_attributes=None,
        item_popularity=np.concatenate([[0.0], np.arange(NUM_ITEMS, 0, -1)]).astype(np.float32),
        index_params=IndexParams(M=8, ef_construction=50, ef_search=50),
        manifest_fields={
            "model_version": version,
            "data_fingerprint": "f" * 64,
            "metrics": {"NDCG@10": 0.5},
            "encoder_config": {"num_items": NUM_ITEMS, "max_len": 7},
            "behavior_names": BEHAVIORS,
        },
        transitions=transitions,
    )
