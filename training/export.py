"""Run directory → versioned serving artifact (see training/artifact.py for the format).

Item vectors are computed once here from the best checkpoint (id embedding + pooled attributes), so serving
retrieves against exactly the vectors the model scored with during evaluation.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from seqrank.training import run_dir as run_files
from seqrank.training.artifact import IndexParams, new_model_version, write_artifact
from seqrank.training.model import WEIGHTS_FILE, load_encoder_dir
from seqrank.training.vocab import PAD_INDEX


@torch.no_grad()
def export_run(run_dir: str | Path, out_dir: str | Path, index_params: IndexParams = IndexParams(),
               name: str = "seqrank") -> Path:
    run_dir = Path(run_dir)
    model = load_encoder_dir(run_dir, "cpu")
    num_items = model.config.num_items
    item_vectors = model.output_item_vectors()[: num_items + 1].float().numpy().copy()  # (I+1, D)
    item_vectors[PAD_INDEX] = 0.0
    data_info = run_files.read_data_info(run_dir)
    metrics = run_files.read_test_metrics(run_dir)
    attributes = model.item_attributes[: num_items + 1].numpy() if model.config.num_attributes else None
    return write_artifact(
        out_dir,
        encoder_weights=run_dir / WEIGHTS_FILE,
        item_vectors=item_vectors,
        item_ids=run_files.read_item_ids(run_dir),
        item_attributes=attributes,
        item_popularity=run_files.read_item_popularity(run_dir),
        index_params=index_params,
        manifest_fields={
            "model_version": new_model_version(name),
            "data_fingerprint": data_info.fingerprint,
            "data": asdict(data_info),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "encoder_config": asdict(model.config),
            "behavior_names": data_info.behavior_names,
        },
        transitions=run_files.load_run_transitions(run_dir),
    )


def exact_top_k(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int) -> np.ndarray:
    """Brute-force inner-product top-k over items 1..I (reference for index recall checks); (B, k) item indices."""
    scores = user_vectors @ item_vectors[PAD_INDEX + 1 :].T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, 1) + 1
