"""Run directory → versioned serving artifact (see training/artifact.py for the format).

Item vectors are computed once here from the best checkpoint (id embedding + pooled attributes), so serving
retrieves against exactly the vectors the model scored with during evaluation. A model with attributes also
exports its attribute vocabulary and attribute embeddings, so serving can place an item it never trained on
(training/cold_items.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from seqrank.training import run_dir as run_files
from seqrank.training.artifact import IndexParams, new_model_version, write_artifact
from seqrank.training.data import DataError, attribute_vocabulary, load_attributes
from seqrank.training.model import WEIGHTS_FILE, EncoderEnsemble, SequenceEncoder, load_encoder_dir
from seqrank.training.vocab import PAD_INDEX


@torch.no_grad()
def export_run(run_dir: str | Path, out_dir: str | Path, index_params: IndexParams = IndexParams(),
               name: str = "seqrank", attributes_path: str | Path | None = None) -> Path:
    """Write the artifact of `run_dir`'s best checkpoint to `out_dir`.

    A model with attributes needs the attributes file it was trained on, to name its attribute indices: the run's
    `data.attributes` unless `attributes_path` points elsewhere (the run moved machines). The file is re-indexed
    against the run's item ids and must give exactly the attribute matrix the model holds, else a DataError.
    """
    run_dir = Path(run_dir)
    model = load_encoder_dir(run_dir, "cpu")
    num_items = model.config.num_items
    item_vectors = model.output_item_vectors()[: num_items + 1].float().numpy().copy()  # (I+1, D)
    item_vectors[PAD_INDEX] = 0.0
    data_info = run_files.read_data_info(run_dir)
    metrics = run_files.read_test_metrics(run_dir)
    attributes = model.item_attributes[: num_items + 1].numpy() if model.config.num_attributes else None
    attribute_values = attribute_vectors = None
    if attributes is not None:
        attribute_values = run_attribute_values(run_dir, attributes, attributes_path)
        attribute_vectors = tower_attribute_vectors(model)
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
        attribute_values=attribute_values,
        attribute_vectors=attribute_vectors,
    )


def run_attribute_values(run_dir: Path, item_attributes: np.ndarray, attributes_path: str | Path | None) -> list[str]:
    """The raw value of each attribute index of the run's model, recomputed from its attributes file and item ids.

    The indices follow first appearance in the file, so the same file and item ids give the same names; a file
    that changed since training would name them wrongly, so it must reproduce the model's attribute matrix. (A
    file that renames values consistently reproduces it too: the matrix cannot tell.)
    """
    path = attributes_path or run_files.read_config(run_dir).data.attributes
    if not path:
        raise DataError(run_dir / run_files.CONFIG_FILE, "the model has attributes but data.attributes is empty; "
                                                          "pass the attributes file it was trained on")
    item_ids = np.asarray(run_files.read_item_ids(run_dir), dtype=object)
    matrix, _ = load_attributes(path, item_ids)
    if matrix.shape != item_attributes.shape or not np.array_equal(matrix, item_attributes):
        raise DataError(path, f"does not give the attribute indices the model in {run_dir} was trained with "
                              f"(shape {matrix.shape} vs {item_attributes.shape}); the file changed since training")
    return attribute_vocabulary(path, item_ids)


def tower_attribute_vectors(model: SequenceEncoder | EncoderEnsemble) -> np.ndarray:
    """(towers, A + 1, tower dim) float32: each tower's attribute table, PAD row included (a single model is one
    tower). The PAD row matters: item vectors add it for each empty attribute slot."""
    towers = model.towers if isinstance(model, EncoderEnsemble) else [model]
    return np.stack([tower.attribute_embedding.weight.detach().float().cpu().numpy() for tower in towers])


def exact_top_k(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int) -> np.ndarray:
    """Brute-force inner-product top-k over items 1..I (reference for index recall checks); (B, k) item indices."""
    scores = user_vectors @ item_vectors[PAD_INDEX + 1 :].T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, 1) + 1
